package main

import (
	"context"
	"errors"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/engine/protocol"
	"github.com/xl-postcopy/xl-postcopy/xen/lab"
	"github.com/xl-postcopy/xl-postcopy/xen/migstate"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// records reads the state directory of this test.
func records(t *testing.T) []migstate.Record {
	t.Helper()
	recs, errs := migstate.List(migstate.Dir())
	require.Empty(t, errs)
	return recs
}

// The source's hook, fed the reports the engine gives every 200 ms: the
// record goes through QEMU's states, postcopy-paused included, and a
// failure after the switchover keeps it with where the domain is.
func TestSourceRecordFollowsProgress(t *testing.T) {
	t.Setenv(migstate.EnvDir, t.TempDir())
	tr := startRecord("migrate", migstate.Record{Domain: "vm1", Role: migstate.Source, Peer: "host-b", Mode: "postcopy"})
	feed := recordProgress(tr, wire.ModePostcopy, nil)
	for _, s := range []struct{ phase, state string }{
		{"setup", "setup"}, {"stop", "device"}, {"postcopy", "postcopy-active"},
		{"postcopy-paused", "postcopy-paused"}, {"postcopy", "postcopy-active"}, {"postcopy-paused", "postcopy-paused"},
	} {
		time.Sleep(migstate.MinInterval + 10*time.Millisecond)
		feed(engine.Progress{Phase: s.phase})
		recs := records(t)
		require.Len(t, recs, 1)
		require.Equal(t, s.state, recs[0].State, s.phase)
		require.Equal(t, os.Getpid(), recs[0].PID)
	}
	require.Equal(t, 1, records(t)[0].Recoveries)
	runErr := &engine.Error{Domain: "vm1", Where: engine.AfterGo, Err: errors.New("the destination did not come back")}
	endSourceRecord(tr, &engine.Stats{Recoveries: 1}, runErr, "")
	r := records(t)[0]
	require.Equal(t, migstate.StateFailed, r.State)
	require.Equal(t, "postcopy-paused", r.Phase)
	require.Equal(t, engine.AfterGo.String(), r.Where)
	require.Contains(t, r.WhatToDo, "check the destination")
}

// The receiver's end: a DestError's where; success removes the record.
func TestDestRecordEnd(t *testing.T) {
	t.Setenv(migstate.EnvDir, t.TempDir())
	tr := startRecord("migrate-receive", migstate.Record{Domain: "vm1", Role: migstate.Dest, Mode: "postcopy", RecoverToken: "tok"})
	tr.Mark(destPhase(wire.ModePostcopy), qemuState(destPhase(wire.ModePostcopy), wire.ModePostcopy))
	require.Equal(t, migstate.StatePostcopyActive, records(t)[0].State)
	endDestRecord(tr, nil, &engine.DestError{Domain: "vm1", Where: protocol.RunsHere, Missing: 7, Err: errors.New("source gone")})
	r := records(t)[0]
	require.Equal(t, migstate.StateFailed, r.State)
	require.Equal(t, protocol.RunsHere.String(), r.Where)
	require.Contains(t, r.WhatToDo, "7 pages still missing")
	require.Equal(t, "tok", r.RecoverToken)

	tr = startRecord("migrate-receive", migstate.Record{Domain: "vm2", Role: migstate.Dest, Mode: "precopy"})
	require.Len(t, records(t), 2)
	endDestRecord(tr, &engine.DestStats{}, nil)
	require.Len(t, records(t), 1)
}

// The hook on a real engine run (a lab domain, migrated in this process's
// children, with its link reset twice after the switchover): the record
// exists, as this process's, while the engine runs, follows its states,
// and is removed once the migration succeeded. A run cancelled before the
// switchover keeps a failed record saying the domain runs at the source.
func TestSourceRecordLabMigration(t *testing.T) {
	t.Setenv(migstate.EnvDir, t.TempDir())
	dom := lab.Config{Name: "t-state", Pages: 4096, Zero: 512, VCPUs: 1,
		Workload: lab.WorkloadSpec{Name: "zipf", WSPages: 1024, Seed: 1, OpCost: 50}}

	t.Run("succeeds", func(t *testing.T) {
		tr := startRecord("migrate", migstate.Record{Domain: dom.Name, Role: migstate.Source, Peer: "lab", Mode: "postcopy"})
		var mu sync.Mutex
		seen := map[string]bool{}
		var bad []string
		check := func(p engine.Progress) {
			recs, errs := migstate.List(migstate.Dir())
			mu.Lock()
			defer mu.Unlock()
			if len(errs) > 0 || len(recs) != 1 || recs[0].PID != os.Getpid() || recs[0].ProcessGone() {
				bad = append(bad, p.Phase)
				return
			}
			seen[recs[0].State] = true
		}
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		res, err := lab.Run(ctx, lab.RunConfig{Domain: dom,
			Engine: engine.Options{Mode: wire.ModePostcopy, Prepaging: "dual", BatchPages: 16, ProgressTimeout: 10 * time.Second,
				ProgressEvery: 20 * time.Millisecond, Progress: recordProgress(tr, wire.ModePostcopy, check)},
			Warmup: 200 * time.Millisecond, After: 100 * time.Millisecond,
			Recover: 20 * time.Second, ResetAfterGo: []uint64{256 << 10, 4 << 20}})
		require.NoError(t, err)
		require.Equal(t, 2, res.Resets)
		mu.Lock()
		require.Empty(t, bad, "reports that found no record of this process")
		// The run is short (under a second) and the record is written at
		// most every 200 ms: which states were on disk when the reports
		// came varies, but the switchover happened.
		require.True(t, seen[migstate.StatePostcopyActive] || seen[migstate.StatePostcopyPaused] || seen[migstate.StateDevice],
			"states on disk: %v", seen)
		mu.Unlock()
		t.Logf("states seen on disk: %v; recoveries %d", seen, res.Stats.Recoveries)
		endSourceRecord(tr, res.Stats, nil, "")
		require.Empty(t, records(t), "a migration that succeeded leaves no record")
	})

	t.Run("cancelled", func(t *testing.T) {
		tr := startRecord("migrate", migstate.Record{Domain: dom.Name, Role: migstate.Source, Peer: "lab", Mode: "hybrid"})
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		var once sync.Once
		stopInPrecopy := func(p engine.Progress) {
			if p.Phase == "precopy" {
				once.Do(cancel)
			}
		}
		res, err := lab.Run(ctx, lab.RunConfig{Domain: dom,
			Engine: engine.Options{Mode: wire.ModeHybrid, Prepaging: "dual", ProgressEvery: 5 * time.Millisecond,
				Progress: recordProgress(tr, wire.ModeHybrid, stopInPrecopy)},
			Warmup: 200 * time.Millisecond, After: 100 * time.Millisecond})
		require.Error(t, err)
		require.NotNil(t, res)
		// lab.Run words the engine's error its own way and gives where
		// beside it; migrate passes the engine's error on.
		endSourceRecord(tr, nil, err, res.Where.String())
		recs := records(t)
		require.Len(t, recs, 1)
		require.Equal(t, migstate.StateFailed, recs[0].State)
		require.Equal(t, engine.RunsAtSource.String(), recs[0].Where, "error: %v", err)
		require.NotEmpty(t, recs[0].WhatToDo)
	})
}
