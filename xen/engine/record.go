package engine

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/prepage"
	"github.com/xl-postcopy/xl-postcopy/xen/prerecord"
	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

// PolicyNames lists every --prepaging value: the bubble policies, and the
// pre-record ones (Shan 2020), which record the trajectory before the
// switchover and send recorded pages first, then regression windows
// (+lr) and hotspot neighbourhoods (+dbscan), with dual bubbles around
// faults still active.
var PolicyNames = append(append([]string(nil), prepage.Names...), "record", "record+lr", "record+dbscan", "record+lr+dbscan")

// policySpec is a parsed --prepaging value.
type policySpec struct {
	bubble         string
	record, lr, db bool
}

func parsePolicy(name string) (policySpec, error) {
	for _, n := range prepage.Names {
		if n == name {
			return policySpec{bubble: name}, nil
		}
	}
	if name == "record" || strings.HasPrefix(name, "record+") {
		ps := policySpec{bubble: "dual", record: true}
		for _, part := range strings.Split(name, "+")[1:] {
			switch part {
			case "lr":
				ps.lr = true
			case "dbscan":
				ps.db = true
			default:
				return ps, fmt.Errorf("unknown pre-record part %q in %q", part, name)
			}
		}
		return ps, nil
	}
	return policySpec{}, fmt.Errorf("unknown pre-paging policy %q (want %s)", name, strings.Join(PolicyNames, ", "))
}

// ValidatePolicy checks a --prepaging value.
func ValidatePolicy(name string) error {
	_, err := parsePolicy(name)
	return err
}

// recorder samples the dirty log every interval, building the trajectory,
// and keeps the union of pages seen so that pre-copy rounds running at the
// same time still get every dirty page from DirtyPages.
type recorder struct {
	dom      Source
	interval time.Duration

	mu       sync.Mutex
	pending  map[uint64]struct{}
	seen     map[uint64]struct{} // every page recorded so far
	fresh    []int               // per round: pages recorded for the first time
	traj     []trace.Access
	round    uint32
	start    time.Time
	err      error
	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}
	buf      []uint64
}

func startRecorder(dom Source, interval time.Duration) *recorder {
	r := &recorder{dom: dom, interval: interval, pending: map[uint64]struct{}{}, seen: map[uint64]struct{}{}, start: time.Now(),
		stop: make(chan struct{}), done: make(chan struct{})}
	go r.loop()
	return r
}

func (r *recorder) loop() {
	defer close(r.done)
	t := time.NewTicker(r.interval)
	defer t.Stop()
	for {
		select {
		case <-r.stop:
			return
		case <-t.C:
		}
		if err := r.sample(); err != nil {
			return
		}
	}
}

func (r *recorder) sample() error {
	_, err := r.sampleRound()
	return err
}

// sampleRound reads one round of the dirty log into the trajectory and
// returns its pages (ascending; the slice is reused by the next sample).
func (r *recorder) sampleRound() ([]uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var err error
	r.buf, err = r.dom.DirtyPages(r.buf)
	if err != nil {
		r.err = fmt.Errorf("record trajectory: %w", err)
		return nil, r.err
	}
	now := time.Since(r.start)
	// A round is a bitmap: its pages carry no order of their own. List
	// them once each, ascending, as one pass over Xen's log-dirty bitmap
	// does; a lab scan that took two passes would otherwise look like two
	// touches in time order to the planner.
	slices.Sort(r.buf)
	r.buf = slices.Compact(r.buf)
	fresh := 0
	for _, p := range r.buf {
		r.traj = append(r.traj, trace.Access{T: now, Round: r.round, PFN: p, Write: true})
		r.pending[p] = struct{}{}
		if _, ok := r.seen[p]; !ok {
			r.seen[p] = struct{}{}
			fresh++
		}
	}
	r.fresh = append(r.fresh, fresh)
	r.round++
	return r.buf, nil
}

// Convergence: recording may end before the --record window once more of
// it would add almost nothing. After at least convergeMinRounds rounds, the
// trajectory has converged when its last convergeRounds rounds together
// found fewer new pages than convergeFraction of all pages recorded: the
// guest keeps writing the pages already known, so more recording would
// only delay the migration. A guest that keeps finding new pages (a stream,
// a scan of a buffer larger than the window covers) is recorded for the
// whole window.
const (
	// convergeMinRounds: 10 rounds (200 ms at 20 ms) leave a path of
	// MinPathRounds rounds room to show, and a hotspot time to be written
	// more than once.
	convergeMinRounds = 10
	// convergeRounds: 5 rounds (100 ms at 20 ms) of quiet, so that one
	// process sleeping through a round does not end recording.
	convergeRounds = 5
	// convergeFraction: 1 %: the pages still to be found then weigh less
	// than the fault bubbles will find anyway.
	convergeFraction = 0.01
)

// converged applies the convergence rule to the per-round counts of new
// pages.
func converged(fresh []int) bool {
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

// converged reports whether the trajectory has converged (see converged).
func (r *recorder) converged() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return converged(r.fresh)
}

// finish stops sampling and returns the trajectory.
// finish is idempotent, so error paths may call it again.
func (r *recorder) finish() ([]trace.Access, error) {
	r.stopOnce.Do(func() { close(r.stop) })
	<-r.done
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.traj, r.err
}

// DirtyPages hands the pages seen since the last call (pre-copy rounds
// running during recording).
func (r *recorder) DirtyPages(dst []uint64) ([]uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	dst = dst[:0]
	for p := range r.pending {
		dst = append(dst, p)
	}
	clear(r.pending)
	return dst, r.err
}

// planOptions are the planner options of a pre-record policy.
func planOptions(ps policySpec) prerecord.Options {
	opt := prerecord.DefaultOptions()
	opt.LR, opt.DBSCAN = ps.lr, ps.db
	return opt
}

// planFromTrajectory turns a trajectory into the priority list.
func planFromTrajectory(ps policySpec, traj []trace.Access, npages uint64) prerecord.Plan {
	return prerecord.Build(traj, npages, planOptions(ps))
}
