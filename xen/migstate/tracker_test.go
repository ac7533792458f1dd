package migstate

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// fakeClock is a clock the test moves.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }
func onDisk(t *testing.T, dir string) []Record {
	t.Helper()
	r, errs := List(dir)
	require.Empty(t, errs)
	return r
}

// A source's reports, as the engine gives them every 200 ms, through a
// break after the switchover and its recovery: the record follows them,
// counts the recovery, and is removed when the migration succeeds.
func TestTrackerFollowsReports(t *testing.T) {
	dir := t.TempDir()
	clk := &fakeClock{t: time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)}
	tr := startAt(dir, Record{Domain: "vm1", Role: Source, Peer: "b", Mode: "postcopy"}, nil, clk.now)
	recs := onDisk(t, dir)
	require.Len(t, recs, 1)
	require.Equal(t, StateSetup, recs[0].State)
	require.Equal(t, os.Getpid(), recs[0].PID)
	require.False(t, recs[0].ProcessGone())

	steps := []struct{ phase, state string }{
		{"setup", StateSetup}, {"stop", StateDevice}, {"postcopy", StatePostcopyActive},
		{"postcopy-paused", StatePostcopyPaused}, {"postcopy-paused", StatePostcopyPaused},
		{"postcopy", StatePostcopyActive}, {"verify", StatePostcopyActive},
	}
	prev, wrote := recs[0], recs[0].UpdatedAt
	for _, s := range steps {
		clk.advance(200 * time.Millisecond)
		tr.Update(s.phase, s.state)
		r := onDisk(t, dir)[0]
		require.Equal(t, s.state, r.State, s.phase)
		require.Equal(t, s.phase, r.Phase)
		if s.phase != prev.Phase || s.state != prev.State {
			wrote = clk.t
		}
		require.Equal(t, wrote, r.UpdatedAt, "written on a change only")
		prev = r
	}
	require.Equal(t, 1, onDisk(t, dir)[0].Recoveries)
	tr.Done()
	require.Empty(t, onDisk(t, dir), "a migration that succeeded leaves no record")
	tr.Update("postcopy", StatePostcopyActive)
	require.Empty(t, onDisk(t, dir), "a report after the end writes nothing")
}

// At most one write a MinInterval; a change that came sooner is written
// by the next report, and a record without change is refreshed every
// Heartbeat.
func TestTrackerThrottles(t *testing.T) {
	dir := t.TempDir()
	clk := &fakeClock{t: time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)}
	tr := startAt(dir, Record{Domain: "vm1", Role: Source}, nil, clk.now)
	t0 := clk.t
	clk.advance(50 * time.Millisecond)
	tr.Update("precopy", StateActive)
	r := onDisk(t, dir)[0]
	require.Equal(t, StateSetup, r.State, "50 ms after the last write: not yet")
	clk.advance(150 * time.Millisecond)
	tr.Update("precopy", StateActive)
	r = onDisk(t, dir)[0]
	require.Equal(t, StateActive, r.State, "the held change goes with the next report")
	at := r.UpdatedAt
	clk.advance(time.Second)
	tr.Update("precopy", StateActive)
	require.Equal(t, at, onDisk(t, dir)[0].UpdatedAt, "no change, no write")
	clk.advance(Heartbeat)
	tr.Update("precopy", StateActive)
	require.Equal(t, clk.t, onDisk(t, dir)[0].UpdatedAt, "heartbeat")
	require.Equal(t, t0, onDisk(t, dir)[0].StartedAt)
}

// A failed migration keeps its record, with where the domain is and what
// to do; a recovery count from the engine's figures replaces the reports'.
func TestTrackerFailKeepsRecord(t *testing.T) {
	dir := t.TempDir()
	tr := Start(dir, Record{Domain: "vm1", Role: Dest, Mode: "hybrid"}, nil)
	tr.Set(func(r *Record) { r.RecoverToken = "tok" })
	tr.Update("postcopy-paused", StatePostcopyPaused)
	tr.Fail("source copy paused, destination may run it", "check the destination", 4)
	r := onDisk(t, dir)[0]
	require.Equal(t, StateFailed, r.State)
	require.Equal(t, "postcopy-paused", r.Phase, "the phase it failed in")
	require.Equal(t, "tok", r.RecoverToken)
	require.Equal(t, 4, r.Recoveries)
	require.Equal(t, "check the destination", r.WhatToDo)
	require.True(t, r.Ended())
	tr.Done()
	require.Len(t, onDisk(t, dir), 1, "the end is the first one")
}

// A state directory that cannot be written never stops the migration:
// the first error is reported, once.
func TestTrackerWarnsOnce(t *testing.T) {
	file := filepath.Join(t.TempDir(), "not-a-dir")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	var warned []error
	clk := &fakeClock{t: time.Now()}
	tr := startAt(file, Record{Domain: "vm1", Role: Source}, func(err error) { warned = append(warned, err) }, clk.now)
	for _, p := range []string{"precopy", "stop", "postcopy"} {
		clk.advance(time.Second)
		tr.Update(p, StateActive)
	}
	tr.Fail("runs at the source", "", -1)
	require.Len(t, warned, 1)
	require.ErrorContains(t, warned[0], "state directory")
	var nilTracker *Tracker
	nilTracker.Update("x", "y")
	nilTracker.Done()
}

// Mark writes at once, however soon after the last write: the destination
// has no periodic reports that would write a held change later.
func TestTrackerMarkWritesNow(t *testing.T) {
	dir := t.TempDir()
	clk := &fakeClock{t: time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)}
	tr := startAt(dir, Record{Domain: "vm1", Role: Dest}, nil, clk.now)
	clk.advance(time.Millisecond)
	tr.Mark("postcopy", StatePostcopyActive)
	require.Equal(t, StatePostcopyActive, onDisk(t, dir)[0].State)
	clk.advance(time.Millisecond)
	tr.Mark("postcopy-paused", StatePostcopyPaused)
	clk.advance(time.Millisecond)
	tr.Mark("postcopy", StatePostcopyActive)
	r := onDisk(t, dir)[0]
	require.Equal(t, StatePostcopyActive, r.State)
	require.Equal(t, 1, r.Recoveries)
}
