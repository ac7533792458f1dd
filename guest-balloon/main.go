// Command guest-balloon is the dynamic self-ballooning daemon that runs
// inside a Xen guest (PV, PVH or HVM with the Linux xen-balloon driver).
//
// Every period it reads /proc/meminfo and /proc/pressure/memory, runs the
// policy of package dsb and writes the balloon target to
// /sys/devices/system/xen_memory/xen_memory0/target_kb: free memory above a
// reserve goes back to Xen slowly, memory comes back at once under
// pressure. It publishes its state in xenstore under its domain's
// data/balloon/ and answers dom0's "balloon-now" requests (written to
// data/balloon/request by `xl-postcopy balloon` or a migration) by
// ballooning down to its reserve and acknowledging in data/balloon/ack.
// A "balloon-hold" request does the same and then holds the balloon still
// (for a migration) until dom0's "hold-end", a timeout, or memory
// pressure; data/balloon/hold says where the hold stands (see package
// control for the protocol).
//
// It is built static (CGO_ENABLED=0) and talks to xenstore through
// /dev/xen/xenbus with the pure-Go client, so it needs nothing installed
// in the guest. On SIGTERM or SIGINT it restores the target it found.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/xen/dsb"
)

func main() {
	os.Exit(realMain(os.Args[1:]))
}

func realMain(argv []string) int {
	fs := pflag.NewFlagSet("guest-balloon", pflag.ContinueOnError)
	fs.SortFlags = false
	var opt options
	var reserveMB, floorMB, stepMB, maxMB uint64
	// 1 s: the policy's shrink step is sized per period (8 MiB/s), PSI's
	// stall totals move by the microsecond so one second already shows a
	// 2 % stall, and one period is the reaction time to a burst the
	// reserve must cover. A pass costs two small /proc reads.
	fs.DurationVar(&opt.period, "period", time.Second, "sampling period")
	fs.DurationVar(&opt.heartbeat, "heartbeat", 10*time.Second, "republish the state in xenstore at least this often (also recreates it after a migration)")
	fs.DurationVar(&opt.settleTimeout, "settle-timeout", 5*time.Second, "on balloon-now, wait this long for the driver to reach the target before acknowledging")
	fs.DurationVar(&opt.reassertDelay, "reassert-delay", 2*time.Second, "when the domain's memory/target is re-announced unchanged (a restore or migration), wait this long, then put back the target this daemon had set (during a balloon-hold: at once, and again after this long)")
	fs.StringVar(&opt.procRoot, "proc", "/proc", "procfs mount (for tests)")
	fs.StringVar(&opt.sysRoot, "sys", "/sys", "sysfs mount (for tests)")
	fs.StringVar(&opt.xenstorePath, "xenstore", "", "xenstore device or socket (default: $XENSTORED_PATH, the xenstored socket, or /dev/xen/xenbus)")
	fs.BoolVar(&opt.once, "once", false, "run one step, print the decision and exit")
	fs.BoolVar(&opt.dryRun, "dry-run", false, "decide and print, but write neither the target nor xenstore (no xenstore needed)")
	fs.BoolVar(&opt.kpageflags, "kpageflags", false, "publish page-class counts from /proc/kpageflags in data/balloon/pages")
	fs.Uint64Var(&maxMB, "max-mb", 0, "domain memory in MiB, the ceiling (default: data/balloon/max_kb from an earlier run, else the target at start)")
	// Defaults from dsb.DefaultConfig, where they are justified.
	def := dsb.DefaultConfig(1)
	fs.Uint64Var(&reserveMB, "reserve-mb", def.ReserveMinKB/1024, "absolute part of the reserve (MiB): the guest keeps max(this, fraction) free")
	fs.Float64Var(&opt.reserveFrac, "reserve-fraction", def.ReserveFraction, "reserve as a fraction of the domain's memory")
	fs.Uint64Var(&floorMB, "floor-mb", def.FloorMinKB/1024, "absolute part of the floor (MiB): the target never goes below max(this, fraction)")
	fs.Float64Var(&opt.floorFrac, "floor-fraction", def.FloorFraction, "floor as a fraction of the domain's memory")
	logFormat := fs.String("log-format", "text", "log lines on stderr as text (key=value, as journald shows them) or json (one object a line)")
	fs.Uint64Var(&stepMB, "step-mb", def.ShrinkStepMinKB/1024, "most MiB given back per period (or 2% of the domain's memory if larger)")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "Usage: guest-balloon [options]\n\nDynamic self-ballooning daemon for Xen guests.\n\nOptions:\n%s", fs.FlagUsages())
	}
	if err := fs.Parse(argv); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(os.Stderr, "guest-balloon: %v\n", err)
		return 2
	}
	if fs.NArg() != 0 {
		fmt.Fprintf(os.Stderr, "guest-balloon: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if opt.period <= 0 || opt.heartbeat <= 0 {
		fmt.Fprintf(os.Stderr, "guest-balloon: --period and --heartbeat must be positive\n")
		return 2
	}
	opt.maxKB, opt.reserveMinKB, opt.floorMinKB, opt.stepMinKB = maxMB*1024, reserveMB*1024, floorMB*1024, stepMB*1024

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	logger, err := newLogger(os.Stderr, *logFormat)
	if err != nil {
		fmt.Fprintf(os.Stderr, "guest-balloon: %v\n", err)
		return 2
	}
	if err := run(ctx, opt, logger, os.Stdout); err != nil {
		logger.Error(err.Error())
		return 1
	}
	return 0
}

// newLogger is the daemon's log: text by default, JSON lines with
// --log-format json, each line tagged with the daemon's name.
func newLogger(w io.Writer, format string) (*slog.Logger, error) {
	var h slog.Handler
	switch format {
	case "text":
		h = slog.NewTextHandler(w, nil)
	case "json":
		h = slog.NewJSONHandler(w, nil)
	default:
		return nil, fmt.Errorf("--log-format %q: want text or json", format)
	}
	return slog.New(h).With("daemon", "guest-balloon"), nil
}
