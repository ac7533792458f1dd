package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/lab"
	"github.com/xl-postcopy/xl-postcopy/xen/link"
	"github.com/xl-postcopy/xl-postcopy/xen/prepage"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// labFlags are the options shared by `lab migrate` and `bench`.
type labFlags struct {
	mem, ws, free     string
	vcpus, opCost     int
	seed              int64
	traceFile         string
	link              string
	warmup, after     time.Duration
	batch             int
	window            string
	pivots, hybridRnd int
	maxRounds         int
	debug             bool
	record, recordInt time.Duration
}

func (f *labFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.mem, "mem", "256M", "guest memory of the lab domain (K/M/G suffix; plain number = MiB)")
	fs.StringVar(&f.ws, "working-set", "64M", "working set of the zipf, scan and stride workloads")
	fs.StringVar(&f.free, "free", "", "guest memory left free (zero pages, never touched); default mem/8")
	fs.IntVar(&f.vcpus, "vcpus", 1, "vCPU threads running the workload")
	fs.IntVar(&f.opCost, "op-cost", 300, "compute iterations per workload operation (how much work a vCPU does per cache line touched)")
	fs.Int64Var(&f.seed, "seed", 1, "workload layout seed")
	fs.StringVar(&f.traceFile, "trace", "", "trace file for --workload trace (from `xl-postcopy trace`)")
	fs.StringVar(&f.link, "link", "", "emulate a link of this rate between two network namespaces (e.g. 1gbit; needs root); default loopback")
	fs.DurationVar(&f.warmup, "warmup", time.Second, "how long the workload runs before the migration starts")
	fs.DurationVar(&f.after, "after", 300*time.Millisecond, "how long the destination runs after the migration, to check progress continues")
	fs.IntVar(&f.batch, "batch", 64, "pages per batch record")
	fs.StringVar(&f.window, "window", "1M", "bulk bytes in flight before the source waits for the destination")
	fs.IntVar(&f.pivots, "pivots", 4, "pivots of the multi pre-paging policy")
	fs.IntVar(&f.hybridRnd, "hybrid-rounds", 1, "pre-copy rounds before a hybrid migration switches to post-copy")
	fs.IntVar(&f.maxRounds, "max-rounds", 5, "pre-copy: most rounds before stop-and-copy (libxc's default is 5)")
	fs.DurationVar(&f.record, "record", time.Second, "pre-record policies: longest recording of the trajectory before the switchover (ends early once the trajectory converges)")
	fs.DurationVar(&f.recordInt, "record-interval", 20*time.Millisecond, "pre-record policies: dirty-log sampling interval")
	fs.BoolVar(&f.debug, "debug", false, "print the engine's switchover timings to stderr")
}

// domain builds the lab domain config for a workload.
func (f *labFlags) domain(workload string) (lab.Config, error) {
	mem, err := parseSize(f.mem)
	if err != nil {
		return lab.Config{}, usagef("--mem: %v", err)
	}
	ws, err := parseSize(f.ws)
	if err != nil {
		return lab.Config{}, usagef("--working-set: %v", err)
	}
	free := mem / 8
	if f.free != "" {
		if free, err = parseSize(f.free); err != nil {
			return lab.Config{}, usagef("--free: %v", err)
		}
	}
	cfg := lab.Config{
		Name: "lab-" + workload, Pages: mem / 4096, Zero: free / 4096, VCPUs: f.vcpus,
		Workload: lab.WorkloadSpec{Name: workload, WSPages: ws / 4096, Seed: f.seed, OpCost: f.opCost, TraceFile: f.traceFile},
	}
	if err := cfg.Validate(); err != nil {
		return cfg, usagef("%v", err)
	}
	return cfg, nil
}

func (f *labFlags) engine(mode wire.Mode, policy string) (engine.Options, error) {
	win, err := parseSize(f.window)
	if err != nil {
		return engine.Options{}, usagef("--window: %v", err)
	}
	if f.batch < 1 || f.batch > wire.MaxBatchPages {
		return engine.Options{}, usagef("--batch %d: want 1..%d", f.batch, wire.MaxBatchPages)
	}
	var logf func(string, ...any)
	if f.debug {
		logf = func(format string, args ...any) { fmt.Fprintf(os.Stderr, "debug: "+format+"\n", args...) }
	}
	return engine.Options{
		Logf: logf, Mode: mode, Prepaging: policy, BatchPages: f.batch, WindowBytes: int(win),
		Policy: prepage.Options{Pivots: f.pivots}, HybridRounds: f.hybridRnd, MaxRounds: f.maxRounds,
		Record: f.record, RecordInterval: f.recordInt,
	}, nil
}

// openLink sets up the emulated link, or loopback.
func (f *labFlags) openLink() (*link.Link, error) {
	if f.link == "" {
		return link.Loopback(), nil
	}
	rate, err := link.ParseRate(f.link)
	if err != nil {
		return nil, usagef("--link: %v", err)
	}
	_ = link.CleanupStale() // namespaces of runs that were killed
	return link.Setup(rate)
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// progressLine renders a live progress line.
func progressLine(p engine.Progress) string {
	pct := 0.0
	if p.Pages > 0 {
		pct = 100 * float64(p.PagesSent) / float64(p.Pages)
	}
	return fmt.Sprintf("\r%-8s round %-3d %5.1f%% of %d pages sent  %s  faults %d  %.1fs   ",
		p.Phase, p.Round, pct, p.Pages, fmtBytes(p.Bytes), p.Faults, p.Elapsed.Seconds())
}

// signalContext is cancelled on SIGINT/SIGTERM, so that links and guests
// are cleaned up.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func init() {
	var lf labFlags
	var mode, policy, workload string
	var asJSON bool
	register(&command{
		name:    "lab migrate",
		args:    "[options]",
		summary: "Live-migrate a lab domain (a domain living in a process: real page faults via userfaultfd, real sockets) and report the migration's figures. No Xen host needed.",
		setup: func(fs *pflag.FlagSet) {
			fs.StringVar(&mode, "mode", "postcopy", "precopy, postcopy or hybrid")
			fs.StringVar(&policy, "prepaging", "dual", "post-copy push order: "+strings.Join(engine.PolicyNames, ", "))
			fs.StringVar(&workload, "workload", "zipf", "what the vCPUs do: "+strings.Join(lab.WorkloadNames, ", "))
			lf.register(fs)
			fs.BoolVar(&asJSON, "json", false, "print the statistics as one JSON object on stdout")
		},
		run: func(fs *pflag.FlagSet, args []string) error {
			if len(args) != 0 {
				return usagef("unexpected argument %q", args[0])
			}
			m, err := wire.ParseMode(mode)
			if err != nil {
				return usagef("--mode: %v", err)
			}
			if err := engine.ValidatePolicy(policy); err != nil {
				return usagef("--prepaging: %v", err)
			}
			cfg, err := lf.domain(workload)
			if err != nil {
				return err
			}
			eo, err := lf.engine(m, policy)
			if err != nil {
				return err
			}
			l, err := lf.openLink()
			if err != nil {
				return err
			}
			defer l.Close()
			if isTerminal(os.Stderr) {
				eo.Progress = func(p engine.Progress) { fmt.Fprint(os.Stderr, progressLine(p)) }
			}
			ctx, cancel := signalContext()
			defer cancel()
			linkDesc := "loopback"
			if l.RateBps > 0 {
				linkDesc = fmt.Sprintf("%s emulated link (%s ↔ %s)", lf.link, l.SrcNetns, l.DstNetns)
			}
			if !asJSON {
				fmt.Fprintf(os.Stderr, "migrating lab domain: %s of memory, workload %s, mode %s, pre-paging %s, over %s\n",
					fmtBytes(cfg.Pages*4096), workload, mode, policy, linkDesc)
			}
			res, err := lab.Run(ctx, lab.RunConfig{Domain: cfg, Engine: eo, Link: l, Warmup: lf.warmup, After: lf.after})
			if eo.Progress != nil {
				fmt.Fprintln(os.Stderr)
			}
			if err != nil {
				return err
			}
			st := res.Stats
			if m == wire.ModePrecopy {
				st.Prepaging = ""
			}
			out := struct {
				*engine.Stats
				Workload   string `json:"workload"`
				OpsAtStart uint64 `json:"ops_at_start"`
				OpsAtEnd   uint64 `json:"ops_at_end"`
				Continued  bool   `json:"progress_continued"`
			}{st, workload, res.OpsAtStart, res.OpsAtEnd, res.Continued}
			if asJSON {
				out.Stats.FaultTimeline = nil
				if err := printJSON(out); err != nil {
					return err
				}
			} else {
				printStats(st, res)
			}
			if !st.Verified || st.IntegrityErrors != 0 || !res.Continued {
				return errors.New("migration finished but the result is not sound (see verified, integrity_errors, progress_continued)")
			}
			return nil
		},
	})
}

// printJSON writes v on stdout as indented JSON (the --json outputs).
func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printStats(st *engine.Stats, res *lab.Result) {
	w := os.Stdout
	fmt.Fprintf(w, "verified          %v (%d pages, %d mismatched, %d integrity errors in the guest)\n", st.Verified, st.Pages, st.MismatchedPages, st.IntegrityErrors)
	fmt.Fprintf(w, "total time        %.1f ms\n", st.TotalTimeMs)
	fmt.Fprintf(w, "downtime          %.2f ms\n", st.DowntimeMs)
	fmt.Fprintf(w, "bytes sent        %s (precopy %s, downtime %s, postcopy %s)\n", fmtBytes(st.TotalBytes), fmtBytes(st.PrecopyBytes), fmtBytes(st.DowntimeBytes), fmtBytes(st.PostcopyBytes))
	fmt.Fprintf(w, "pages sent        %d (zero %d, re-sent dirty %d, duplicates %d, pre-copy rounds %d)\n", st.PagesSent, st.ZeroPages, st.ResentPages, st.DuplicatePages, st.PrecopyRounds)
	if st.Mode != "precopy" {
		fmt.Fprintf(w, "network faults    %d of a working set of %d pages (%.3f), pre-paged hits %d\n", st.NetworkFaults, st.WorkingSet, st.FaultsPerWS, st.PrepagedHits)
		fmt.Fprintf(w, "fault latency     p50 %.0f us, p99 %.0f us; blocktime %.1f ms\n", st.FaultLatencyP50Us, st.FaultLatencyP99Us, st.BlocktimeMs)
	}
	if st.LinkRateBps > 0 {
		fmt.Fprintf(w, "link bound        %.1f ms (total time / bound = %.2f)\n", st.LinkBoundMs, st.TimeOverLink)
	}
	fmt.Fprintf(w, "guest progress    %d ops at start, %d at end (continued: %v)\n", res.OpsAtStart, res.OpsAtEnd, res.Continued)
}
