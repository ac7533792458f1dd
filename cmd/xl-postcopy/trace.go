//go:build cgo

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
	"github.com/xl-postcopy/xl-postcopy/xen/trace"
	"github.com/xl-postcopy/xl-postcopy/xen/trace/record"
)

// `xl-postcopy trace` records which pages a running domain writes, round by
// round, with Xen's log-dirty mode: PV domains need a hypervisor built with
// CONFIG_SHADOW_PAGING=y, HVM/PVH domains need HAP. Each round is one
// log-dirty CLEAN (which returns and clears the bitmap in one hypercall; a
// PEEK before it would only see a subset of the same pages). Log-dirty is
// turned off at the end, on error and on SIGINT/SIGTERM; like `xl save`,
// that also ends log-dirty use by anyone else on the domain.
func init() {
	register(&command{
		name:    "trace",
		args:    "[options] <domain>",
		summary: "record a domain's memory-access trajectory from log-dirty rounds",
		setup: func(fs *pflag.FlagSet) {
			fs.Duration("interval", 50*time.Millisecond, "length of one log-dirty round (CLEAN every interval)")
			fs.Duration("duration", 5*time.Second, "how long to record")
			fs.StringP("output", "o", "-", "write the trace to this file (- for stdout)")
			fs.Bool("debug", false, "print every hypercall and its result on stderr")
		},
		run: runTrace,
	})
}

// traceSummary is what `trace` prints on stderr when it is done.
type traceSummary struct {
	Rounds      int
	Accesses    int
	Distinct    int
	MinPFN      uint64
	MaxPFN      uint64
	Overruns    int // rounds whose CLEAN came more than half an interval late (record.Recorder.Late)
	Interrupted bool
	Elapsed     time.Duration
}

func (s traceSummary) String() string {
	if s.Accesses == 0 {
		return fmt.Sprintf("%d rounds in %v, no page was written", s.Rounds, s.Elapsed.Round(time.Millisecond))
	}
	return fmt.Sprintf("%d rounds in %v, %d accesses, %d distinct pfns, pfn range %#x..%#x, %d late rounds",
		s.Rounds, s.Elapsed.Round(time.Millisecond), s.Accesses, s.Distinct, s.MinPFN, s.MaxPFN, s.Overruns)
}

func summarize(t *trace.Trace) traceSummary {
	var s traceSummary
	s.Accesses = len(t.Accesses)
	seen := make(map[uint64]struct{})
	for i, a := range t.Accesses {
		if i == 0 || a.PFN < s.MinPFN {
			s.MinPFN = a.PFN
		}
		if a.PFN > s.MaxPFN {
			s.MaxPFN = a.PFN
		}
		seen[a.PFN] = struct{}{}
	}
	s.Distinct = len(seen)
	return s
}

// dirtySource is the log-dirty interface the recorder needs; the Xen
// implementation is xenDirty, tests drive the recorder with a table.
type dirtySource interface {
	// Enable starts tracking; Disable stops it and is called exactly once
	// after a successful Enable, whatever happens in between.
	Enable() error
	Disable() error
	// Pages is the number of pfns covered by the bitmap.
	Pages() uint64
	// Clean fills dst (Pages()/64 words, rounded up) with the pages dirtied
	// since the previous Clean and starts a new round.
	Clean(dst []uint64) error
}

// recordTrace runs log-dirty rounds of length interval until duration has
// passed or ctx is done. Pages written in round r are listed in ascending
// pfn order, stamped with the round's start time (relative to the start of
// recording) and round index r (see record.Recorder).
func recordTrace(ctx context.Context, src dirtySource, interval, duration time.Duration) (tr *trace.Trace, sum traceSummary, err error) {
	if err := src.Enable(); err != nil {
		return nil, sum, err
	}
	defer func() {
		if derr := src.Disable(); derr != nil {
			err = errors.Join(err, fmt.Errorf("turning log-dirty off again: %w", derr))
		}
	}()
	pages := src.Pages()
	clean := &cleanLog{src: src, bitmap: make([]uint64, (pages+63)/64)}
	// Throw away whatever was dirty before recording started.
	if err := src.Clean(clean.bitmap); err != nil {
		return nil, sum, fmt.Errorf("initial log-dirty CLEAN: %w", err)
	}
	rec := record.New(clean, interval)
	err = rec.Run(ctx, duration)
	if ctxErr := ctx.Err(); ctxErr != nil && errors.Is(err, ctxErr) {
		sum.Interrupted = true
		// A CLEAN also closes an interrupted round, so its pages are kept.
		_, err = rec.Sample()
	}
	if err != nil {
		return nil, sum, err
	}
	sum.Elapsed = time.Since(rec.Start())
	tr = &trace.Trace{Pages: pages, PageSize: xenctrl.PageSize, Interval: interval, Accesses: rec.Accesses()}
	s := summarize(tr)
	sum.Accesses, sum.Distinct, sum.MinPFN, sum.MaxPFN = s.Accesses, s.Distinct, s.MinPFN, s.MaxPFN
	sum.Rounds, sum.Overruns = int(rec.Rounds()), rec.Late()
	return tr, sum, nil
}

// cleanLog is a dirtySource as the recorder's dirty log: each read is one
// CLEAN, its bitmap listed in ascending pfn order.
type cleanLog struct {
	src    dirtySource
	bitmap []uint64
}

func (c *cleanLog) DirtyPages(dst []uint64) ([]uint64, error) {
	if err := c.src.Clean(c.bitmap); err != nil {
		return dst[:0], fmt.Errorf("log-dirty CLEAN: %w", err)
	}
	return xenctrl.AppendSetBits(dst[:0], c.bitmap, c.src.Pages()), nil
}

// xenDirty is dirtySource over a real Xen domain.
type xenDirty struct {
	h     *xenctrl.Handle
	dom   uint32
	pages uint64
	bm    *xenctrl.DirtyBitmap
}

func (x *xenDirty) Enable() error {
	if err := x.h.EnableLogDirty(x.dom); err != nil {
		return err
	}
	bm, err := x.h.NewDirtyBitmap(x.dom, x.pages)
	if err != nil {
		if derr := x.h.DisableLogDirty(x.dom); derr != nil {
			err = errors.Join(err, derr)
		}
		return err
	}
	x.bm = bm
	return nil
}

func (x *xenDirty) Disable() error {
	if x.bm != nil {
		x.bm.Close()
		x.bm = nil
	}
	return x.h.DisableLogDirty(x.dom)
}

func (x *xenDirty) Pages() uint64 { return x.pages }

func (x *xenDirty) Clean(dst []uint64) error {
	_, err := x.bm.Clean(dst)
	return err
}

func runTrace(fs *pflag.FlagSet, args []string) (err error) {
	if len(args) != 1 {
		return usagef("want exactly one domain (id or name)")
	}
	interval, _ := fs.GetDuration("interval")
	duration, _ := fs.GetDuration("duration")
	output, _ := fs.GetString("output")
	debug, _ := fs.GetBool("debug")
	if interval <= 0 {
		return usagef("--interval must be positive")
	}
	if duration < interval {
		return usagef("--duration (%v) must be at least one --interval (%v)", duration, interval)
	}
	if _, _, err := parseDomainArg(args[0]); err != nil {
		return err
	}

	h, err := xenctrl.Open()
	if err != nil {
		return err
	}
	defer h.Close()
	if debug {
		h.SetDebug(func(msg string) { fmt.Fprintln(os.Stderr, "debug:", msg) })
	}
	dom, err := resolveDomain(h, args[0])
	if err != nil {
		return err
	}
	if dom == 0 {
		return usagef("cannot trace dom0: log-dirty tracking is for guest domains")
	}
	info, err := h.Domain(dom)
	if err != nil {
		return err
	}
	if info.Dying || info.Shutdown {
		return fmt.Errorf("domain %d is shutting down; nothing to trace", dom)
	}
	maxGPFN, err := h.MaxGPFN(dom)
	if err != nil {
		return err
	}
	pages := maxGPFN + 1
	fmt.Fprintf(os.Stderr, "tracing dom %d (%s, %d vcpus, %d pages, pfns 0..%#x) every %v for %v\n",
		dom, info.Kind(), info.OnlineVCPUs, info.TotPages, maxGPFN, interval, duration)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	tr, sum, err := recordTrace(ctx, &xenDirty{h: h, dom: dom, pages: pages}, interval, duration)
	if err != nil {
		return fmt.Errorf("tracing dom %d: %w", dom, err)
	}
	tr.Source = fmt.Sprintf("%s:%s", info.Kind(), args[0])

	var buf bytes.Buffer
	if err := trace.Write(&buf, tr); err != nil {
		return err
	}
	if err := writeOutput(output, buf.Bytes()); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "trace of dom %d: %v\n", dom, sum)
	if sum.Interrupted {
		return fmt.Errorf("interrupted after %d rounds; the partial trace was written to %s", sum.Rounds, output)
	}
	return nil
}

// writeOutput writes data to path, or stdout for "-". A file is written
// under a temporary name and renamed so that a reader never sees half a
// trace.
func writeOutput(path string, data []byte) error {
	if path == "-" {
		_, err := os.Stdout.Write(data)
		if err != nil {
			return fmt.Errorf("writing trace to stdout: %w", err)
		}
		return nil
	}
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("writing trace: %w", err)
	}
	_, werr := io.Copy(f, bytes.NewReader(data))
	cerr := f.Close()
	if err := errors.Join(werr, cerr); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing trace %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("writing trace: %w", err)
	}
	return nil
}
