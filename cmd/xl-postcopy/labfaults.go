package main

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/xen/lab"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// `lab faults`: the fault-injection matrix of issue 13 on lab domains —
// the link reset at each protocol point, every run counted by what became
// of the domain.
func init() {
	var runs int
	var points, modes, mem, out string
	var recoverTO time.Duration
	register(&command{
		name: "lab faults",
		args: "[options]",
		summary: "Reset a lab migration's link (a TCP reset of both connections) at each protocol point, --runs times each, " +
			"and print a table of what became of the domain: exactly one copy running, recovered, ran on at the source, lost, both ran, " +
			"pages placed twice, wrong pages. Exits 1 if any run did not come out as its point demands. No Xen host needed.",
		setup: func(fs *pflag.FlagSet) {
			fs.IntVar(&runs, "runs", 10, "runs at each point")
			fs.StringVar(&points, "points", "all", "comma-separated fault points, or all: "+pointNames())
			fs.StringVar(&modes, "mode", "hybrid,postcopy", "comma-separated migration modes (hybrid passes every point; post-copy has no pre-copy round)")
			fs.StringVar(&mem, "mem", "16M", "lab domain memory")
			fs.DurationVar(&recoverTO, "recover-timeout", 10*time.Second, "how long the source tries a broken link again (the destination waits 5 s more)")
			fs.StringVarP(&out, "output", "o", "", "also write the table (Markdown) to this file")
		},
		run: func(fs *pflag.FlagSet, args []string) error {
			if len(args) != 0 {
				return usagef("unexpected argument %q", args[0])
			}
			if runs < 1 {
				return usagef("--runs %d: must be at least 1", runs)
			}
			if recoverTO <= 0 {
				return usagef("--recover-timeout %v: must be positive", recoverTO)
			}
			ps, err := lab.ParseFaultPoints(points)
			if err != nil {
				return usagef("--points: %v", err)
			}
			var ms []wire.Mode
			for _, m := range strings.Split(modes, ",") {
				mode, err := wire.ParseMode(strings.TrimSpace(m))
				if err != nil || mode == wire.ModePrecopy {
					return usagef("--mode %q: want hybrid or postcopy (a pre-copy migration has no GO to recover after)", m)
				}
				ms = append(ms, mode)
			}
			memB, err := parseSize(mem)
			if err != nil {
				return usagef("--mem: %v", err)
			}
			pages := memB / labPageSize
			cfg := lab.Config{Name: "lab-faults", Pages: pages, Zero: pages / 8, VCPUs: 1,
				Workload: lab.WorkloadSpec{Name: "zipf", WSPages: pages / 4, OpCost: 50}}
			if err := cfg.Validate(); err != nil {
				return usagef("--mem: %v", err)
			}
			in := catchInterrupts("lab faults")
			defer in.stop()
			var table bytes.Buffer
			failed := 0
			start := time.Now()
			for _, mode := range ms {
				// Post-copy sends no page batch before the pause except
				// early core pages: its pre-copy-round point is hybrid's.
				mps := ps
				if mode == wire.ModePostcopy {
					mps = nil
					for _, p := range ps {
						if p != lab.AtPrecopy {
							mps = append(mps, p)
						}
					}
				}
				rows, err := lab.RunMatrix(in.ctx, lab.MatrixConfig{Domain: cfg, Mode: mode, Points: mps, Runs: runs, Recover: recoverTO,
					Progress: func(p lab.FaultPoint, run int, o lab.RunOutcome) {
						verdict := "ok"
						if !o.Reached {
							verdict = "ok, but the run never passed the point (no reset)"
						}
						if !o.OK(p) {
							verdict = fmt.Sprintf("NOT AS DEMANDED (%s; reset %v, exactly once %v, recovered %v, ran on at source %v, lost %v, both ran %v, redundant %d, wrong %d): %v",
								p.Demand(), o.Reached, o.ExactlyOnce, o.Recovered, o.RanOn, o.Lost, o.BothRan, o.Redundant, o.Wrong, o.Err)
						}
						fmt.Fprintf(os.Stderr, "%s %s run %d/%d: recoveries %d, paused %.1f ms: %s\n", mode, p, run+1, runs, o.Recoveries, o.PausedMs, verdict)
					}})
				if err != nil {
					if sig := in.signal(); sig != nil {
						return fmt.Errorf("lab faults: %v: stopped; the lab guests of the run in progress were ended", sig)
					}
					return err
				}
				fmt.Fprintf(&table, "\n%s, %d runs a point, lab domain of %s (`xl-postcopy lab faults --runs %d --mode %s --points %s`):\n\n",
					mode, runs, mem, runs, mode, points)
				if err := lab.WriteMatrix(&table, rows); err != nil {
					return err
				}
				for _, r := range rows {
					failed += r.Failed
				}
			}
			fmt.Fprintf(&table, "\n%d runs not as demanded; %.0f s.\n", failed, time.Since(start).Seconds())
			os.Stdout.Write(table.Bytes())
			if out != "" {
				if err := os.WriteFile(out, table.Bytes(), 0o644); err != nil {
					return fmt.Errorf("write the table: %w", err)
				}
			}
			if failed > 0 {
				return fmt.Errorf("%d runs did not come out as their point demands (see the lines above)", failed)
			}
			return nil
		},
	})
}

func pointNames() string {
	var n []string
	for _, p := range lab.FaultPoints {
		n = append(n, string(p))
	}
	return strings.Join(n, ", ")
}
