package migstate

import (
	"os"
	"sync"
	"time"
)

// MinInterval is the shortest time between two writes of one record for
// a change of phase or state: the engine reports every 200 ms, and a
// record is for an administrator, not a trace. A change that comes
// sooner is written with the next report after it.
const MinInterval = 200 * time.Millisecond

// Heartbeat is how often a record is written without a change, so that
// its updated_at says the process still reports.
const Heartbeat = 10 * time.Second

// Tracker keeps one migration's record up to date for the process that
// runs it. Its methods are safe for concurrent use and a nil *Tracker
// does nothing, so a command can go without one. A Tracker never fails
// the migration: a write error goes to the warn function, once.
type Tracker struct {
	dir  string
	warn func(error)
	now  func() time.Time

	mu      sync.Mutex
	rec     Record
	last    time.Time // of the last write attempted
	pending bool      // a change not written yet (MinInterval)
	warned  bool
	ended   bool
}

// Start fills in the process (pid and start time) and the times of rec,
// writes it in dir and returns its Tracker. warn (may be nil) hears of the
// first write that fails.
func Start(dir string, rec Record, warn func(error)) *Tracker {
	return startAt(dir, rec, warn, time.Now)
}

func startAt(dir string, rec Record, warn func(error), now func() time.Time) *Tracker {
	t := &Tracker{dir: dir, warn: warn, now: now}
	rec.PID = os.Getpid()
	// Without /proc the pid alone identifies the process.
	rec.PIDStart, _ = ProcStart(rec.PID)
	rec.StartedAt = now().UTC()
	if rec.State == "" {
		rec.State = StateSetup
	}
	if rec.Phase == "" {
		rec.Phase = "setup"
	}
	t.rec = rec
	t.mu.Lock()
	t.writeLocked()
	t.mu.Unlock()
	return t
}

// Record returns the record as last set.
func (t *Tracker) Record() Record {
	if t == nil {
		return Record{}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.rec
}

// Update is one progress report: the engine's phase and the QEMU-like
// state. A change is written (at most every MinInterval); leaving
// postcopy-paused for anything but failed counts a recovery.
func (t *Tracker) Update(phase, state string) {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ended {
		return
	}
	t.changeLocked(phase, state)
	now := t.now()
	switch {
	case t.pending && now.Sub(t.last) >= MinInterval:
	case now.Sub(t.last) >= Heartbeat:
	default:
		return
	}
	t.writeLocked()
}

// Mark is an event that changes the phase and state (a resume, a break),
// from a side without a periodic feed: written now, whatever the last
// write's time.
func (t *Tracker) Mark(phase, state string) {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ended {
		return
	}
	t.changeLocked(phase, state)
	t.writeLocked()
}

// Set changes the record with f (e.g. the recover token once known) and
// writes it now.
func (t *Tracker) Set(f func(*Record)) {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ended {
		return
	}
	f(&t.rec)
	t.writeLocked()
}

// Fail ends the record as failed, with where the domain is and what to do
// (the command's last word), and keeps it for `list` until cleaned. A
// negative recoveries keeps the count the reports gave.
func (t *Tracker) Fail(where, whatToDo string, recoveries int) {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ended {
		return
	}
	t.ended = true
	t.rec.State, t.rec.Where, t.rec.WhatToDo = StateFailed, where, whatToDo
	if recoveries >= 0 {
		t.rec.Recoveries = recoveries
	}
	t.writeLocked()
}

// Done ends a migration that succeeded: its record is removed (nothing is
// left for the administrator to do).
func (t *Tracker) Done() {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ended {
		return
	}
	t.ended = true
	if err := Remove(t.dir, t.rec.Domain, t.rec.Role); err != nil {
		t.warnLocked(err)
	}
}

// changeLocked sets phase and state; leaving postcopy-paused for anything
// but failed is a recovery.
func (t *Tracker) changeLocked(phase, state string) {
	if phase == t.rec.Phase && state == t.rec.State {
		return
	}
	if t.rec.State == StatePostcopyPaused && state != StatePostcopyPaused && state != StateFailed {
		t.rec.Recoveries++
	}
	t.rec.Phase, t.rec.State = phase, state
	t.pending = true
}

func (t *Tracker) writeLocked() {
	now := t.now()
	t.last, t.pending = now, false
	t.rec.UpdatedAt = now.UTC()
	if err := Write(t.dir, t.rec); err != nil {
		t.warnLocked(err)
	}
}

func (t *Tracker) warnLocked(err error) {
	if t.warned || t.warn == nil {
		return
	}
	t.warned = true
	t.warn(err)
}
