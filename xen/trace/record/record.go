// Package record records a memory-access trajectory from a dirty log: it
// reads the log once every interval and lists each round's pages as
// trace.Access values, the trajectory that the pre-record planner reads
// and that the trace format stores. The engine's pre-record policies,
// `xl-postcopy trace` (Xen log-dirty) and `xl-postcopy lab trace` (lab
// domains backed by userfaultfd) all record with it.
package record

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

// DirtyLog is the write tracking a Recorder samples. engine.Source and
// lab.Source implement it; `xl-postcopy trace` adapts Xen's log-dirty
// CLEAN to it.
type DirtyLog interface {
	// DirtyPages returns the pfns written since the previous call (or
	// since tracking started), reusing dst, and clears the log.
	DirtyPages(dst []uint64) ([]uint64, error)
}

// Recorder builds a trajectory from rounds of a DirtyLog: round r is the
// r-th read of the log (0-based), and its pages are the accesses of round
// r, stamped with the round's start (the previous read, or the start of
// recording for round 0), so that round 0 starts at 0 as in the trace
// format.
//
// A Recorder consumes the log it reads, so it keeps the pages it has read
// for whoever else needs them (DirtyPages). Its methods are safe for
// concurrent use: the engine samples from a Run goroutine while its
// pre-copy rounds read DirtyPages and its switchover calls Sample.
type Recorder struct {
	log      DirtyLog
	interval time.Duration
	start    time.Time

	mu         sync.Mutex
	buf        []uint64
	traj       []trace.Access
	round      uint32
	roundStart time.Duration       // since start: when the current round began
	seen       map[uint64]struct{} // every page recorded so far
	fresh      []int               // per round: pages recorded for the first time
	pending    map[uint64]struct{} // pages recorded since the last DirtyPages
	late       int
	err        error
}

// New returns a Recorder of log whose recording starts now. interval is
// the length of a round for Run (and the reference for late rounds); the
// log must already be tracking writes, and everything in it before now
// counts as round 0.
func New(log DirtyLog, interval time.Duration) *Recorder {
	return &Recorder{log: log, interval: interval, start: time.Now(),
		seen: map[uint64]struct{}{}, pending: map[uint64]struct{}{}}
}

// Run samples the log every interval until duration has passed since the
// start of recording (0: no limit), ctx is done or a sample fails. It
// returns nil once duration has passed, ctx.Err() once ctx is done, and
// the failed sample's error otherwise. Run does not sample again when ctx
// is done: the pages of the round it cut short stay in the log, for a
// Sample to close the round or for the caller to leave.
func (r *Recorder) Run(ctx context.Context, duration time.Duration) error {
	if r.interval <= 0 {
		return fmt.Errorf("record trajectory: interval %v is not positive", r.interval)
	}
	timer := time.NewTimer(r.interval)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-timer.C:
		}
		if _, err := r.sample(true); err != nil {
			return err
		}
		if duration > 0 && time.Since(r.start) >= duration {
			return nil
		}
		// Schedule the next sample one interval after this one, so that a
		// slow read of the log (a CLEAN hypercall over a large bitmap)
		// shortens no round: rounds stay >= interval.
		timer.Reset(r.interval)
	}
}

// Sample reads one round now, off Run's schedule (the last round before a
// plan is built, the round that closes an interrupted recording), and
// returns its pages in ascending order.
func (r *Recorder) Sample() ([]uint64, error) {
	return r.sample(false)
}

// sample reads one round; scheduled says that Run asked for it, so that a
// late read counts as a late round. Run's samples return r.buf itself,
// valid until the next sample; Sample's get a copy taken under the lock,
// since Run may be sampling into the buffer again at the same time.
func (r *Recorder) sample(scheduled bool) ([]uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var err error
	r.buf, err = r.log.DirtyPages(r.buf)
	if err != nil {
		err = fmt.Errorf("record trajectory: round %d: %w", r.round, err)
		if r.err == nil {
			r.err = err
		}
		return nil, err
	}
	// The trace format has microsecond resolution; keep what it keeps, so
	// that a trajectory read back from a file equals the one recorded.
	now := time.Since(r.start).Truncate(time.Microsecond)
	if scheduled && now-r.roundStart > r.interval+r.interval/2 {
		r.late++
	}
	// A round is a bitmap: its pages carry no order of their own. List
	// them once each, ascending, as one pass over Xen's log-dirty bitmap
	// does; a lab scan that took two passes would otherwise look like two
	// touches in time order to the planner.
	slices.Sort(r.buf)
	r.buf = slices.Compact(r.buf)
	fresh := 0
	for _, p := range r.buf {
		r.traj = append(r.traj, trace.Access{T: r.roundStart, Round: r.round, PFN: p, Write: true})
		r.pending[p] = struct{}{}
		if _, ok := r.seen[p]; !ok {
			r.seen[p] = struct{}{}
			fresh++
		}
	}
	r.fresh = append(r.fresh, fresh)
	r.round++
	r.roundStart = now
	if !scheduled {
		return slices.Clone(r.buf), nil
	}
	return r.buf, nil
}

// DirtyPages makes a Recorder a DirtyLog itself: it returns, ascending,
// the pages recorded since its previous call, so that a consumer of the
// dirty log running during the recording (the engine's pre-copy rounds)
// misses none of the pages the recording took from the log. The error is
// that of the first failed sample, if any, returned with the pages.
func (r *Recorder) DirtyPages(dst []uint64) ([]uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	dst = dst[:0]
	for p := range r.pending {
		dst = append(dst, p)
	}
	clear(r.pending)
	slices.Sort(dst)
	return dst, r.err
}

// Accesses returns the trajectory recorded so far, in round order. Later
// samples do not change the returned slice.
func (r *Recorder) Accesses() []trace.Access {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clip(r.traj)
}

// Err returns the error of the first failed sample, or nil.
func (r *Recorder) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// Start returns when recording started (New).
func (r *Recorder) Start() time.Time { return r.start }

// Interval returns the round length Run samples at.
func (r *Recorder) Interval() time.Duration { return r.interval }

// Rounds returns the number of rounds recorded.
func (r *Recorder) Rounds() uint32 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.round
}

// Late returns the number of Run's rounds that ended more than half an
// interval late (a busy host, a slow read of the log).
func (r *Recorder) Late() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.late
}

// Distinct returns the number of distinct pages recorded.
func (r *Recorder) Distinct() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.seen)
}

// Converged reports whether the trajectory recorded so far has converged
// (see the package function Converged).
func (r *Recorder) Converged() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return Converged(r.fresh)
}

// Convergence: recording may end before the --record window once more of
// it would add almost nothing. After at least convergeMinRounds rounds,
// the trajectory has converged when its last convergeRounds rounds
// together found fewer new pages than convergeFraction of all pages
// recorded: the guest keeps writing the pages already known, so more
// recording would only delay the migration. A guest that keeps finding
// new pages (a stream, a scan of a buffer larger than the window covers)
// is recorded for the whole window.
const (
	// convergeMinRounds: 10 rounds (200 ms at the engine's 20 ms) leave a
	// path of prerecord's MinPathRounds rounds room to show, and a
	// hotspot time to be written more than once.
	convergeMinRounds = 10
	// convergeRounds: 5 rounds (100 ms at 20 ms) of quiet, so that one
	// process sleeping through a round does not end recording.
	convergeRounds = 5
	// convergeFraction: 1 %: the pages still to be found then weigh less
	// than the fault bubbles will find anyway.
	convergeFraction = 0.01
)

// Converged applies the convergence rule to fresh, the number of pages
// each round recorded for the first time.
func Converged(fresh []int) bool {
	if len(fresh) < max(convergeMinRounds, convergeRounds) {
		return false
	}
	total, recent := 0, 0
	for i, n := range fresh {
		total += n
		if i >= len(fresh)-convergeRounds {
			recent += n
		}
	}
	return total > 0 && float64(recent) < convergeFraction*float64(total)
}
