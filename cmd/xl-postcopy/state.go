package main

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/migstate"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// The state records of migrate and migrate-receive (xen/migstate): what
// `xl-postcopy list` shows. Writing them never fails a migration.

// startRecord begins this side's record in the state directory. A write
// that fails is said once on stderr, as cmd's, and the migration goes on.
func startRecord(cmd string, rec migstate.Record) *migstate.Tracker {
	return migstate.Start(migstate.Dir(), rec, func(err error) {
		fmt.Fprintf(os.Stderr, "xl-postcopy %s: cannot record the migration's state (%v); it goes on without (not said again)\n", cmd, err)
	})
}

// recordProgress feeds the engine's reports to tr as QEMU-like states,
// then to next (nil: none). The engine reports every 200 ms; tr writes
// only changes, at most that often.
func recordProgress(tr *migstate.Tracker, mode wire.Mode, next func(engine.Progress)) func(engine.Progress) {
	return func(p engine.Progress) {
		tr.Update(p.Phase, qemuState(p.Phase, mode))
		if next != nil {
			next(p)
		}
	}
}

// endSourceRecord ends the source's record: a success removes it; a
// failure keeps it, failed, with where the engine says the domain is (or
// where, when the engine did not say) and the command's error, which says
// what to do.
func endSourceRecord(tr *migstate.Tracker, st *engine.Stats, err error, where string) {
	if err == nil {
		tr.Done()
		return
	}
	if w, ok := engine.WhereOf(err); ok {
		where = w.String()
	}
	recoveries := -1
	if st != nil {
		recoveries = st.Recoveries
	}
	tr.Fail(where, err.Error(), recoveries)
}

// endDestRecord is endSourceRecord for the receiver.
func endDestRecord(tr *migstate.Tracker, st *engine.DestStats, err error) {
	if err == nil {
		tr.Done()
		return
	}
	where := ""
	var de *engine.DestError
	if errors.As(err, &de) {
		where = de.Where.String()
	}
	recoveries := -1
	if st != nil {
		recoveries = st.Recoveries
	}
	tr.Fail(where, err.Error(), recoveries)
}

// destPhase is the receiver's phase once the domain runs here: memory
// still comes in post-copy and hybrid; a pre-copy has it all.
func destPhase(mode wire.Mode) string {
	if mode == wire.ModePrecopy {
		return "verify"
	}
	return "postcopy"
}

// receiverPeer names the source for the receiver's record: this host for
// a local receiver (-s ”), else the client of the ssh that started it.
func receiverPeer(local bool) string {
	if local {
		return "localhost"
	}
	if f := strings.Fields(os.Getenv("SSH_CONNECTION")); len(f) > 0 {
		return f[0]
	}
	return ""
}
