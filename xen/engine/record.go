package engine

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/prepage"
	"github.com/xl-postcopy/xl-postcopy/xen/prerecord"
	"github.com/xl-postcopy/xl-postcopy/xen/trace"
	"github.com/xl-postcopy/xl-postcopy/xen/trace/record"
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

// recorder is the pre-record policies' recording: a record.Recorder that
// samples the domain's dirty log every interval on its own goroutine until
// finish. Since the recording consumes the dirty log, pre-copy rounds
// running at the same time read their dirty pages from the recorder
// (DirtyPages) instead, and get every page the recording saw.
type recorder struct {
	rec   *record.Recorder
	start time.Time // when recording started
	// round is the number of rounds recorded (Stats.RecordRounds), up to
	// date once finish or sampleRound has returned.
	round uint32
	stop  context.CancelFunc
	done  chan struct{} // closed when the sampling goroutine has returned
}

func startRecorder(dom Source, interval time.Duration) *recorder {
	ctx, stop := context.WithCancel(context.Background())
	rec := record.New(dom, interval)
	r := &recorder{rec: rec, start: rec.Start(), stop: stop, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		// A failed sample ends the sampling; rec keeps its error for
		// finish and DirtyPages to report.
		_ = rec.Run(ctx, 0)
	}()
	return r
}

// sample reads one round of the dirty log into the trajectory now.
func (r *recorder) sample() error {
	_, err := r.sampleRound()
	return err
}

// sampleRound reads one round of the dirty log into the trajectory and
// returns its pages (ascending).
func (r *recorder) sampleRound() ([]uint64, error) {
	pages, err := r.rec.Sample()
	r.round = r.rec.Rounds()
	return pages, err
}

// converged reports whether the trajectory has converged
// (record.Converged): recording may end before the --record window.
func (r *recorder) converged() bool { return r.rec.Converged() }

// finish stops sampling and returns the trajectory, or the error of the
// first failed sample.
// finish is idempotent, so error paths may call it again.
func (r *recorder) finish() ([]trace.Access, error) {
	r.stop()
	<-r.done
	r.round = r.rec.Rounds()
	return r.rec.Accesses(), r.rec.Err()
}

// DirtyPages hands the pages seen since the last call (pre-copy rounds
// running during recording).
func (r *recorder) DirtyPages(dst []uint64) ([]uint64, error) {
	return r.rec.DirtyPages(dst)
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
