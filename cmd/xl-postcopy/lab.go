package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
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
	progressTO        time.Duration // engine: silence of the peer before giving up
	controlTO         time.Duration // each control call to a lab guest process

	// Filled by check: the parsed sizes in bytes.
	checked                bool
	memB, wsB, freeB, winB uint64
	rate                   uint64 // --link in bit/s
}

// Limits of the lab flags other than the host's memory (flagcheck.go).
const (
	maxLabDuration = time.Hour
	maxLabVCPUs    = 64 // lab.Config.Validate
	maxOpCost      = 1_000_000
	maxPivots      = 1024
	maxRoundsFlag  = 100
	maxWindow      = 1 << 30
)

func (f *labFlags) register(fs *pflag.FlagSet) {
	*f = labFlags{} // a command line is checked afresh (tests run several)
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
	fs.DurationVar(&f.progressTO, "progress-timeout", engine.DefaultProgressTimeout, "give up on the other side after this long without a record from it (both send keepalives)")
	fs.DurationVar(&f.controlTO, "control-timeout", lab.DefaultControlTimeout, "limit for each control call to a lab guest process (a stopped guest fails it)")
	fs.BoolVar(&f.debug, "debug", false, "print the engine's switchover timings to stderr")
	addLogFormat(fs)
}

// check validates every size, duration and count flag of a run of these
// workloads up front, before anything starts, and keeps the parsed sizes.
// workloadFlag names the flag the workloads came from, for the messages.
// The memory limit is what this host can give (maxLabMem).
func (f *labFlags) check(workloadFlag string, workloads ...string) error {
	if err := checkLogFormat(); err != nil {
		return err
	}
	memMax, memWhy := maxLabMem()
	mem, err := checkSize("mem", f.mem, labMinPages*labPageSize, memMax, true, memWhy)
	if err != nil {
		return err
	}
	free := mem / 8 / labPageSize * labPageSize
	freeDesc := "the default --free of --mem/8 = " + showSize(free)
	if f.free != "" {
		if free, err = checkSize("free", f.free, 0, mem-labPageSize, true, "--free must leave at least one page of --mem "+f.mem+" usable"); err != nil {
			return err
		}
		freeDesc = "--free " + f.free
	}
	// mem-free is at least one page: --free leaves one.
	ws, err := checkSize("working-set", f.ws, labPageSize, mem-free, true,
		fmt.Sprintf("the working set must fit in --mem %s less %s", f.mem, freeDesc))
	if err != nil {
		return err
	}
	win, err := checkSize("window", f.window, labPageSize, maxWindow, false, "")
	if err != nil {
		return err
	}
	for _, c := range []struct {
		flag   string
		v, max int
		min    int
	}{
		{"vcpus", f.vcpus, maxLabVCPUs, 1},
		{"op-cost", f.opCost, maxOpCost, 0},
		{"batch", f.batch, wire.MaxBatchPages, 1},
		{"pivots", f.pivots, maxPivots, 1},
		{"hybrid-rounds", f.hybridRnd, maxRoundsFlag, 1},
		{"max-rounds", f.maxRounds, maxRoundsFlag, 1},
	} {
		if err := checkCount(c.flag, c.v, c.min, c.max); err != nil {
			return err
		}
	}
	for _, d := range []struct {
		flag string
		v    time.Duration
	}{{"warmup", f.warmup}, {"after", f.after}, {"record", f.record}, {"progress-timeout", f.progressTO}, {"control-timeout", f.controlTO}} {
		if err := checkDuration(d.flag, d.v, time.Millisecond, maxLabDuration); err != nil {
			return err
		}
	}
	if err := checkRange("record-interval", f.recordInt, time.Millisecond, f.record, time.Duration.String, "at most --record"); err != nil {
		return err
	}
	replays := slices.Contains(workloads, "trace")
	if f.traceFile != "" && !replays {
		return usagef("--trace %s: only the trace workload reads a trace file, and --%s is %s: add trace to --%s or drop --trace",
			f.traceFile, workloadFlag, strings.Join(workloads, ","), workloadFlag)
	}
	if replays && f.traceFile == "" {
		return usagef("--%s %s: the trace workload needs --trace FILE (written by `xl-postcopy trace` or `xl-postcopy lab trace`)",
			workloadFlag, strings.Join(workloads, ","))
	}
	if f.link != "" {
		if f.rate, err = link.ParseRate(f.link); err != nil {
			return usagef("--link %s: %v", f.link, err)
		}
	}
	f.memB, f.wsB, f.freeB, f.winB = mem, ws, free, win
	f.checked = true
	return nil
}

// domain builds the lab domain config for a workload, checking the flags
// first unless check already did (for every workload of a bench run).
func (f *labFlags) domain(workload string) (lab.Config, error) {
	if !f.checked {
		if err := f.check("workload", workload); err != nil {
			return lab.Config{}, err
		}
	}
	spec := lab.WorkloadSpec{Name: workload, WSPages: f.wsB / labPageSize, Seed: f.seed, OpCost: f.opCost}
	if workload == "trace" {
		spec.TraceFile = f.traceFile
	}
	cfg := lab.Config{Name: "lab-" + workload, Pages: f.memB / labPageSize, Zero: f.freeB / labPageSize, VCPUs: f.vcpus, Workload: spec,
		ControlTimeout: f.controlTO}
	if err := cfg.Validate(); err != nil {
		return cfg, usagef("%v", err)
	}
	return cfg, nil
}

// engine builds the engine options; the flags were checked by domain or
// check.
func (f *labFlags) engine(mode wire.Mode, policy string) (engine.Options, error) {
	if !f.checked {
		return engine.Options{}, errors.New("internal error: lab flags used before they were checked")
	}
	var logf func(string, ...any)
	if f.debug {
		logf = debugf(true, "engine")
	}
	return engine.Options{
		Logf: logf, Mode: mode, Prepaging: policy, BatchPages: f.batch, WindowBytes: int(f.winB),
		Policy: prepage.Options{Pivots: f.pivots}, HybridRounds: f.hybridRnd, MaxRounds: f.maxRounds,
		Record: f.record, RecordInterval: f.recordInt, ProgressTimeout: f.progressTO,
	}, nil
}

// openLink sets up the emulated link, or loopback.
func (f *labFlags) openLink() (*link.Link, error) {
	if f.link == "" {
		return link.Loopback(), nil
	}
	if !f.checked {
		return nil, errors.New("internal error: lab flags used before they were checked")
	}
	_ = link.CleanupStale() // namespaces of runs that were killed
	return link.Setup(f.rate)
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

// interrupts turns SIGINT and SIGTERM into an orderly stop of a lab run:
// the first signal cancels ctx, so that the run stops, ends its lab guests
// and returns, and the command then removes the link's namespaces and
// says what happened (interrupted). A second signal, or a clean-up that
// takes longer than forceAfter, removes the namespaces at once and exits;
// the lab guests then die with this process (they run with a parent-death
// signal).
type interrupts struct {
	cmd    string
	ctx    context.Context
	cancel context.CancelFunc
	ch     chan os.Signal
	done   chan struct{}
	once   sync.Once

	mu   sync.Mutex
	sig  os.Signal
	link *link.Link
}

// forceAfter bounds the orderly stop after a signal.
const forceAfter = 30 * time.Second

// catchInterrupts starts catching SIGINT and SIGTERM for command cmd. Call
// it before anything is created, and stop when the command returns.
func catchInterrupts(cmd string) *interrupts {
	in := &interrupts{cmd: cmd, ch: make(chan os.Signal, 2), done: make(chan struct{})}
	in.ctx, in.cancel = context.WithCancel(context.Background())
	signal.Notify(in.ch, os.Interrupt, syscall.SIGTERM)
	go in.watch()
	return in
}

func (in *interrupts) watch() {
	var first os.Signal
	select {
	case first = <-in.ch:
	case <-in.done:
		return
	}
	in.mu.Lock()
	in.sig = first
	in.mu.Unlock()
	if isTerminal(os.Stderr) {
		fmt.Fprintln(os.Stderr) // end the progress line
	}
	fmt.Fprintf(os.Stderr, "xl-postcopy %s: got %s: stopping and cleaning up (send it again to exit at once)\n", in.cmd, sigName(first))
	in.cancel()
	t := time.NewTimer(forceAfter)
	defer t.Stop()
	var why string
	select {
	case s := <-in.ch:
		why = "got " + sigName(s) + " during the clean-up after " + sigName(first)
	case <-t.C:
		why = fmt.Sprintf("the clean-up took longer than %v", forceAfter)
	case <-in.done:
		return
	}
	in.mu.Lock()
	l := in.link
	in.mu.Unlock()
	msg := fmt.Sprintf("xl-postcopy %s: %s: exiting at once; the lab guests end with this process", in.cmd, why)
	if l != nil && l.RateBps > 0 {
		if err := l.Close(); err != nil {
			msg += "; removing the link's namespaces failed: " + err.Error()
		} else {
			msg += fmt.Sprintf("; removed the link's namespaces %s and %s", l.SrcNetns, l.DstNetns)
		}
	}
	fmt.Fprintln(os.Stderr, msg)
	os.Exit(1)
}

// setLink registers the link for a forced exit to remove.
func (in *interrupts) setLink(l *link.Link) {
	in.mu.Lock()
	in.link = l
	in.mu.Unlock()
}

// signal is the signal that interrupted the run, nil if none did.
func (in *interrupts) signal() os.Signal {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.sig
}

// stop ends the catching: signals have their default effect again.
func (in *interrupts) stop() {
	in.once.Do(func() {
		signal.Stop(in.ch)
		close(in.done)
		in.cancel()
	})
}

// interrupted removes the link (if any) and returns the error that says
// what happened: which signal, when, and what was cleaned up. done lists
// what the command did about it already, e.g. "ended the lab guests"
// (lab.Run ends its guests before it returns). cause is the error of the
// interrupted run; it is shown only with --debug, since it describes the
// abandoned run rather than the clean-up.
func (in *interrupts) interrupted(when string, done []string, l *link.Link, cause error, debug bool) error {
	var failed string
	if l != nil && l.RateBps > 0 {
		if err := l.Close(); err != nil {
			failed = fmt.Sprintf("; removing the link's namespaces %s and %s failed: %v", l.SrcNetns, l.DstNetns, err)
		} else {
			done = append(done, fmt.Sprintf("removed the link's namespaces %s and %s", l.SrcNetns, l.DstNetns))
		}
	}
	msg := fmt.Sprintf("interrupted by %s %s", sigName(in.signal()), when)
	switch n := len(done); n {
	case 0:
	case 1:
		msg += ": " + done[0]
	default:
		msg += ": " + strings.Join(done[:n-1], ", ") + " and " + done[n-1]
	}
	msg += failed
	if debug && cause != nil {
		msg += " (the run had ended with: " + cause.Error() + ")"
	}
	return errors.New(msg)
}

func sigName(s os.Signal) string {
	switch s {
	case os.Interrupt:
		return "SIGINT"
	case syscall.SIGTERM:
		return "SIGTERM"
	case nil:
		return "a signal"
	}
	return s.String()
}

func init() {
	var lf labFlags
	var mode, policy, workload string
	var asJSON, jsonProg bool
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
			fs.BoolVar(&jsonProg, "json-progress", false, "JSON lines on stdout while it runs (QEMU-like state, bytes, pages remaining, faults, downtime once known), the last one completed or failed with the statistics; instead of --json")
		},
		run: func(fs *pflag.FlagSet, args []string) (err error) {
			if len(args) != 0 {
				return usagef("unexpected argument %q", args[0])
			}
			if asJSON && jsonProg {
				return usagef("--json and --json-progress: choose one (the last --json-progress line holds the statistics)")
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
			in := catchInterrupts("lab migrate")
			defer in.stop()
			l, err := lf.openLink()
			if l != nil {
				in.setLink(l)
				defer l.Close()
			}
			if in.signal() != nil {
				return in.interrupted("while setting up the link", []string{"started no lab guest"}, l, err, lf.debug)
			}
			if err != nil {
				return err
			}
			var jp *jsonProgress
			switch {
			case jsonProg:
				jp = newJSONProgress(os.Stdout, m)
				eo.Progress = jp.report
			case isTerminal(os.Stderr):
				eo.Progress = func(p engine.Progress) { fmt.Fprint(os.Stderr, progressLine(p)) }
			}
			var final *engine.Stats
			var finalOut any
			if jp != nil {
				defer func() { jp.end(final, finalOut, err) }()
			}
			linkDesc := "loopback"
			if l.RateBps > 0 {
				linkDesc = fmt.Sprintf("%s emulated link (%s ↔ %s)", lf.link, l.SrcNetns, l.DstNetns)
			}
			if !asJSON && !jsonProg {
				fmt.Fprintf(os.Stderr, "migrating lab domain: %s of memory, workload %s, mode %s, pre-paging %s, over %s\n",
					fmtBytes(cfg.Pages*4096), workload, mode, policy, linkDesc)
			}
			res, err := lab.Run(in.ctx, lab.RunConfig{Domain: cfg, Engine: eo, Link: l, Warmup: lf.warmup, After: lf.after})
			if eo.Progress != nil && jp == nil {
				fmt.Fprintln(os.Stderr)
			}
			if in.signal() != nil {
				return in.interrupted("during the migration", []string{"stopped it", "ended the lab guests"}, l, err, lf.debug)
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
			switch {
			case jp != nil:
				out.Stats.FaultTimeline = nil
				final, finalOut = st, out
			case asJSON:
				out.Stats.FaultTimeline = nil
				if err := printJSON(out); err != nil {
					return err
				}
			default:
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
	fmt.Fprintf(w, "pages sent        %d (zero %d, re-sent %d, redundant %d, pre-copy rounds %d)\n", st.PagesSent, st.ZeroPages, st.ResentPages, st.RedundantPages, st.PrecopyRounds)
	if st.Mode != "precopy" {
		fmt.Fprintf(w, "network faults    %d of a working set of %d pages (%.3f), pre-paged hits %d\n", st.NetworkFaults, st.WorkingSet, st.FaultsPerWS, st.PrepagedHits)
		fmt.Fprintf(w, "fault latency     p50 %.0f us, p99 %.0f us; waits summed %.1f ms\n", st.FaultLatencyP50Us, st.FaultLatencyP99Us, st.FaultWaitMs)
	}
	if st.LinkRateBps > 0 {
		fmt.Fprintf(w, "link bound        %.1f ms (total time / bound = %.2f)\n", st.LinkBoundMs, st.TimeOverLink)
	}
	fmt.Fprintf(w, "guest progress    %d ops at start, %d at end (continued: %v)\n", res.OpsAtStart, res.OpsAtEnd, res.Continued)
}
