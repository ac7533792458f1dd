package engine

import (
	"fmt"
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

	mu      sync.Mutex
	pending map[uint64]struct{}
	traj    []trace.Access
	round   uint32
	start   time.Time
	err     error
	stop    chan struct{}
	done    chan struct{}
	buf     []uint64
}

func startRecorder(dom Source, interval time.Duration) *recorder {
	r := &recorder{dom: dom, interval: interval, pending: map[uint64]struct{}{}, start: time.Now(),
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
	r.mu.Lock()
	defer r.mu.Unlock()
	var err error
	r.buf, err = r.dom.DirtyPages(r.buf)
	if err != nil {
		r.err = fmt.Errorf("record trajectory: %w", err)
		return r.err
	}
	now := time.Since(r.start)
	for _, p := range r.buf {
		r.traj = append(r.traj, trace.Access{T: now, Round: r.round, PFN: p, Write: true})
		r.pending[p] = struct{}{}
	}
	r.round++
	return nil
}

// finish stops sampling and returns the trajectory.
func (r *recorder) finish() ([]trace.Access, error) {
	close(r.stop)
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

// plan turns a trajectory into the priority list.
func planFromTrajectory(ps policySpec, traj []trace.Access, npages uint64) prerecord.Plan {
	opt := prerecord.DefaultOptions()
	opt.LR, opt.DBSCAN = ps.lr, ps.db
	return prerecord.Build(traj, npages, opt)
}
