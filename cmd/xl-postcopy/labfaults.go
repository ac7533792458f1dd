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
	var points, modes, mem, out, faults string
	var recoverTO time.Duration
	register(&command{
		name: "lab faults",
		args: "[options]",
		summary: "Reset a lab migration's link (a TCP reset of both connections) or take it down for a while (silent: no FIN, no RST) at each protocol point, --runs times each, " +
			"and print a table of what became of the domain: exactly one copy running, recovered, survived (a short outage: no recovery needed), ran on at the source, lost, both ran, " +
			"pages placed twice, wrong pages, how soon an outage was noticed. Exits 1 if any run did not come out as demanded. No Xen host needed.",
		setup: func(fs *pflag.FlagSet) {
			fs.IntVar(&runs, "runs", 10, "runs at each point")
			fs.StringVar(&points, "points", "all", "comma-separated fault points, or all: "+pointNames())
			fs.StringVar(&modes, "mode", "hybrid,postcopy", "comma-separated migration modes (hybrid passes every point; post-copy has no pre-copy round)")
			fs.StringVar(&mem, "mem", "16M", "lab domain memory")
			fs.StringVar(&faults, "faults", "reset", fmt.Sprintf("comma-separated faults: reset, or an outage's length such as 2s or 60s (one under %v must pass unnoticed; a longer one must be noticed within the link timeout, %v, and recovered after GO)", lab.LabLinkTimeout/2, lab.LabLinkTimeout))
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
			fts, err := lab.ParseFaults(faults)
			if err != nil {
				return usagef("--faults: %v", err)
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
			for _, ft := range fts {
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
					rto := recoverTO
					if !fs.Changed("recover-timeout") {
						rto = 0 // the matrix's default: 10 s, or the outage and 30 s
					}
					mc := lab.MatrixConfig{Domain: cfg, Mode: mode, Points: mps, Runs: runs, Recover: rto, Fault: ft}
					mc.Progress = func(p lab.FaultPoint, run int, o lab.RunOutcome) {
						verdict := "ok"
						if !o.Reached {
							verdict = "ok, but the run never passed the point (no fault)"
						}
						if d := mc.Demand(p); !o.OK(d) {
							verdict = fmt.Sprintf("NOT AS DEMANDED (%s; fault %v, exactly once %v, recovered %v, survived %v, ran on at source %v, lost %v, both ran %v, redundant %d, wrong %d): %v",
								d, o.Reached, o.ExactlyOnce, o.Recovered, o.Survived, o.RanOn, o.Lost, o.BothRan, o.Redundant, o.Wrong, o.Err)
						}
						noticed := ""
						if o.Detected > 0 {
							noticed = fmt.Sprintf(", noticed after %.1f s", o.Detected.Seconds())
						}
						fmt.Fprintf(os.Stderr, "%s %s %s run %d/%d: recoveries %d, paused %.1f ms%s: %s\n", ft, mode, p, run+1, runs, o.Recoveries, o.PausedMs, noticed, verdict)
					}
					rows, err := lab.RunMatrix(in.ctx, mc)
					if err != nil {
						if sig := in.signal(); sig != nil {
							return fmt.Errorf("lab faults: %v: stopped; the lab guests of the run in progress were ended", sig)
						}
						return err
					}
					fmt.Fprintf(&table, "\n%s, %s, %d runs a point, lab domain of %s (`xl-postcopy lab faults --faults %s --runs %d --mode %s --points %s`):\n\n",
						ft, mode, runs, mem, faultArg(ft), runs, mode, points)
					if err := lab.WriteMatrix(&table, rows); err != nil {
						return err
					}
					for _, r := range rows {
						failed += r.Failed
					}
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

func faultArg(f lab.Fault) string {
	if f.Outage <= 0 {
		return "reset"
	}
	return f.Outage.String()
}

func pointNames() string {
	var n []string
	for _, p := range lab.FaultPoints {
		n = append(n, string(p))
	}
	return strings.Join(n, ", ")
}
