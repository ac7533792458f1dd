package main

import (
	"encoding/json"
	"io"
	"sync"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// progressEvent is one line of --json-progress (docs: README, "Watching a
// migration from orchestration"). State follows QEMU's migration states:
// setup, active (pre-copy rounds), device (the stop phase: the domain is
// paused), postcopy-active (the domain runs at the destination, memory
// still coming), postcopy-paused (the link broke after the switchover and
// is being tried again; see --recover-timeout), completed, failed.
type progressEvent struct {
	Event string `json:"event"` // "progress", then one "completed" or "failed"
	State string `json:"state"`
	// Phase is the engine's own name for where it is (setup, record,
	// precopy, stop, postcopy, postcopy-paused, verify, done).
	Phase          string   `json:"phase,omitempty"`
	ElapsedMs      float64  `json:"elapsed_ms"`
	Round          int      `json:"round"`
	Pages          uint64   `json:"pages"`
	PagesSent      uint64   `json:"pages_sent"`
	PagesRemaining uint64   `json:"pages_remaining"`
	Bytes          uint64   `json:"bytes"`
	Faults         uint64   `json:"faults"`
	DowntimeMs     *float64 `json:"downtime_ms,omitempty"` // once the destination resumed
	// On "failed": the error and where the domain is (engine.Where).
	Error string `json:"error,omitempty"`
	Where string `json:"where,omitempty"`
	// On "completed" (and "failed" when the migration got to its end):
	// the figures --json prints.
	Stats any `json:"stats,omitempty"`
}

// qemuState maps an engine phase to QEMU's migration state.
func qemuState(phase string, mode wire.Mode) string {
	switch phase {
	case "setup", "record":
		return "setup"
	case "precopy":
		return "active"
	case "stop":
		return "device"
	case "postcopy":
		return "postcopy-active"
	case "postcopy-paused":
		return "postcopy-paused"
	case "verify", "done":
		if mode == wire.ModePrecopy {
			return "active"
		}
		return "postcopy-active"
	}
	return "active"
}

// jsonProgress writes --json-progress lines; safe for the engine's
// progress goroutine and the command's own final line.
type jsonProgress struct {
	mu   sync.Mutex
	enc  *json.Encoder
	mode wire.Mode
	last engine.Progress
}

func newJSONProgress(w io.Writer, mode wire.Mode) *jsonProgress {
	return &jsonProgress{enc: json.NewEncoder(w), mode: mode}
}

func eventOf(p engine.Progress, mode wire.Mode) progressEvent {
	ev := progressEvent{Event: "progress", State: qemuState(p.Phase, mode), Phase: p.Phase,
		ElapsedMs: float64(p.Elapsed.Microseconds()) / 1000, Round: p.Round, Pages: p.Pages,
		PagesSent: p.PagesSent, PagesRemaining: p.Remaining, Bytes: p.Bytes, Faults: p.Faults}
	if p.Downtime > 0 {
		d := float64(p.Downtime.Microseconds()) / 1000
		ev.DowntimeMs = &d
	}
	return ev
}

// report is engine.Options.Progress.
func (j *jsonProgress) report(p engine.Progress) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.last = p
	_ = j.enc.Encode(eventOf(p, j.mode))
}

// end writes the last line: completed with the figures, or failed with
// the error and where the domain is.
func (j *jsonProgress) end(st *engine.Stats, stats any, err error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	ev := eventOf(j.last, j.mode)
	if st != nil && st.TotalTimeMs > 0 {
		ev.Phase, ev.ElapsedMs, ev.Bytes, ev.PagesRemaining = "done", st.TotalTimeMs, st.TotalBytes, 0
		ev.Pages, ev.PagesSent, ev.Faults, ev.Round = st.Pages, st.PagesSent, st.NetworkFaults, st.PrecopyRounds
		if st.DowntimeMs > 0 {
			d := st.DowntimeMs
			ev.DowntimeMs = &d
		}
		ev.Stats = stats
	}
	ev.Event, ev.State = "completed", "completed"
	if err != nil {
		ev.Event, ev.State, ev.Error = "failed", "failed", err.Error()
		if where, ok := engine.WhereOf(err); ok {
			ev.Where = where.String()
		}
	}
	_ = j.enc.Encode(ev)
}
