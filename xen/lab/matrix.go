package lab

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// The fault-injection matrix (issue 13): lab migrations whose link is
// reset at each protocol point, counted by what became of the domain.

// MatrixConfig is one matrix: every point in Points, Runs times each.
type MatrixConfig struct {
	Domain  Config
	Mode    wire.Mode
	Points  []FaultPoint
	Runs    int
	Recover time.Duration // recovery time at the source (default 10 s, or the outage and 30 s)
	// Fault is what is done at each point (default: a reset).
	Fault Fault
	// NoRecovery turns recovery off: the control that shows the matrix
	// counting what a reset after GO does without it.
	NoRecovery bool
	// Progress, if set, hears of every run as it ends.
	Progress func(p FaultPoint, run int, o RunOutcome)
}

// RunOutcome is what one run of the matrix came to.
type RunOutcome struct {
	Reached     bool // the link was reset at the point (else the run passed it by)
	ExactlyOnce bool // exactly one copy of the guest ran at the end
	Recovered   bool // after GO: completed, verified, with every reset recovered
	Survived    bool // completed, verified, with no recovery (a short outage)
	// Detected is how long after an outage began the source gave the
	// link up; 0: it did not while the link was down.
	Detected   time.Duration
	RanOn      bool // before GO: the migration failed and the guest ran on at the source
	Lost       bool // no copy ran
	BothRan    bool // both copies ran
	Redundant  uint64
	Wrong      uint64 // pages that did not match, and the guest's own integrity errors
	Recoveries int
	PausedMs   float64
	Err        error
}

// OK says the run came out as demanded (FaultPoint.DemandFor). A run
// that never passed its point (no demand fault in a hybrid migration,
// say) demands nothing but what any run does: one copy, nothing placed
// twice or wrong.
func (o RunOutcome) OK(d Demand) bool {
	if !o.ExactlyOnce || o.Redundant != 0 || o.Wrong != 0 {
		return false
	}
	if !o.Reached {
		return o.Err == nil
	}
	switch d {
	case DemandSurvived:
		return o.Survived
	case DemandRecovered:
		return o.Recovered
	case DemandRanOn:
		return o.RanOn
	}
	return o.Recovered || o.RanOn
}

// LabLinkTimeout is the link timeout of the matrix's migrations (the
// engine's default).
const LabLinkTimeout = engine.DefaultLinkTimeout

// Demand is what the matrix demands of a run at p.
func (mc MatrixConfig) Demand(p FaultPoint) Demand {
	return p.DemandFor(mc.Fault, LabLinkTimeout)
}

// MatrixRow sums one point's runs.
type MatrixRow struct {
	Point                                                       FaultPoint
	Fault                                                       Fault
	Demand                                                      Demand
	Runs, NotReached, ExactlyOnce, Recovered, RanOn, Lost, Both int
	Survived                                                    int
	// MaxDetected is the longest an outage went unnoticed by the source
	// (0: none was noticed while the link was down).
	MaxDetected      time.Duration
	Redundant, Wrong uint64
	Failed           int // runs not as the point demands
	MaxPausedMs      float64
	FirstFailure     string
}

// RunMatrix runs the matrix; a run's error is counted, not returned (only
// ctx's end stops it).
func RunMatrix(ctx context.Context, mc MatrixConfig) ([]MatrixRow, error) {
	if mc.Runs < 1 {
		mc.Runs = 1
	}
	if mc.Recover <= 0 {
		mc.Recover = max(10*time.Second, mc.Fault.Outage+30*time.Second)
	}
	var rows []MatrixRow
	for _, p := range mc.Points {
		row := MatrixRow{Point: p, Fault: mc.Fault, Demand: mc.Demand(p)}
		for i := 0; i < mc.Runs; i++ {
			if err := ctx.Err(); err != nil {
				return rows, err
			}
			o := runOnce(ctx, mc, p, i)
			row.Runs++
			if !o.Reached {
				row.NotReached++
			}
			if o.ExactlyOnce {
				row.ExactlyOnce++
			}
			if o.Recovered {
				row.Recovered++
			}
			if o.Survived {
				row.Survived++
			}
			row.MaxDetected = max(row.MaxDetected, o.Detected)
			if o.RanOn {
				row.RanOn++
			}
			if o.Lost {
				row.Lost++
			}
			if o.BothRan {
				row.Both++
			}
			row.Redundant += o.Redundant
			row.Wrong += o.Wrong
			row.MaxPausedMs = max(row.MaxPausedMs, o.PausedMs)
			if !o.OK(row.Demand) {
				row.Failed++
				if row.FirstFailure == "" {
					row.FirstFailure = fmt.Sprintf("run %d: reached %v exactly-once %v recovered %v ran-on %v: %v",
						i+1, o.Reached, o.ExactlyOnce, o.Recovered, o.RanOn, o.Err)
				}
			}
			if mc.Progress != nil {
				mc.Progress(p, i, o)
			}
		}
		rows = append(rows, row)
	}
	return rows, nil
}

func runOnce(ctx context.Context, mc MatrixConfig, p FaultPoint, i int) RunOutcome {
	d := mc.Domain
	d.Workload.Seed = int64(i + 1)
	rc := RunConfig{Domain: d,
		Engine: engine.Options{Mode: mc.Mode, Prepaging: "dual", BatchPages: 16, MaxRounds: 2, ProgressTimeout: 10 * time.Second},
		Warmup: 200 * time.Millisecond, After: 100 * time.Millisecond, Recover: mc.Recover, Outage: mc.Fault.Outage}
	if mc.NoRecovery {
		rc.Recover = 0
	}
	if p == AtMidPushByte {
		rc.ResetAfterGo = []uint64{256 << 10}
	} else {
		rc.ResetAt = []FaultPoint{p}
	}
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute+2*mc.Fault.Outage)
	defer cancel()
	res, err := Run(rctx, rc)
	o := RunOutcome{Err: err}
	if res == nil {
		return o
	}
	o.Reached = res.Resets > 0
	o.Detected = res.DetectedAfter
	o.ExactlyOnce = res.SourceRuns != res.DestRuns
	o.Lost = !res.SourceRuns && !res.DestRuns
	o.BothRan = res.SourceRuns && res.DestRuns
	if st := res.Stats; st != nil {
		o.Redundant = st.RedundantPages
		o.Wrong = st.MismatchedPages + st.IntegrityErrors
		o.Recoveries = st.Recoveries
		o.PausedMs = st.PostcopyPausedMs
		o.Recovered = err == nil && st.Verified && st.Recoveries == res.Resets && res.Continued
		o.Survived = err == nil && st.Verified && st.Recoveries == 0 && res.Continued
	}
	if err != nil {
		o.RanOn = res.Where == engine.RunsAtSource && res.SourceRuns && !res.DestRuns
	}
	return o
}

// WriteMatrix prints rows as a Markdown table.
func WriteMatrix(w io.Writer, rows []MatrixRow) error {
	if _, err := fmt.Fprintln(w, "| point | fault | demanded | runs | not reached | exactly once | recovered | survived | ran on at source | lost | both ran | redundant pages | wrong pages | not as demanded | longest pause ms | noticed after s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"); err != nil {
		return err
	}
	for _, r := range rows {
		noticed := "-"
		if r.MaxDetected > 0 {
			noticed = fmt.Sprintf("%.1f", r.MaxDetected.Seconds())
		}
		if _, err := fmt.Fprintf(w, "| %s | %v | %v | %d | %d | %d | %d | %d | %d | %d | %d | %d | %d | %d | %.1f | %s |\n",
			r.Point, r.Fault, r.Demand, r.Runs, r.NotReached, r.ExactlyOnce, r.Recovered, r.Survived, r.RanOn, r.Lost, r.Both,
			r.Redundant, r.Wrong, r.Failed, r.MaxPausedMs, noticed); err != nil {
			return err
		}
	}
	return nil
}
