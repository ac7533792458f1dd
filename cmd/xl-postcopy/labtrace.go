package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/xen/lab"
	"github.com/xl-postcopy/xl-postcopy/xen/trace"
	"github.com/xl-postcopy/xl-postcopy/xen/trace/record"
)

func init() {
	var lf labFlags
	var workload, out string
	var interval, duration time.Duration
	register(&command{
		name:    "lab trace",
		args:    "[options] -o FILE",
		summary: "Record the write trajectory of a lab domain's workload (dirty log sampled every interval) in the trace format `xl-postcopy trace` writes for Xen domains.",
		setup: func(fs *pflag.FlagSet) {
			fs.StringVar(&workload, "workload", "zipf", "what the vCPUs do: "+strings.Join(lab.WorkloadNames, ", "))
			fs.DurationVar(&interval, "interval", 50*time.Millisecond, "dirty-log sampling interval")
			fs.DurationVar(&duration, "duration", 2*time.Second, "how long to record")
			fs.StringVarP(&out, "output", "o", "", "trace file to write (required)")
			lf.register(fs)
		},
		run: func(fs *pflag.FlagSet, args []string) error {
			if len(args) != 0 {
				return usagef("unexpected argument %q", args[0])
			}
			if out == "" {
				return usagef("-o FILE is required")
			}
			if interval <= 0 || duration < interval {
				return usagef("--interval must be positive and --duration at least one interval")
			}
			cfg, err := lf.domain(workload)
			if err != nil {
				return err
			}
			src, err := lab.StartSource(cfg)
			if err != nil {
				return err
			}
			defer src.Kill()
			time.Sleep(lf.warmup)
			if err := src.StartDirtyLog(); err != nil {
				return err
			}
			rec := record.New(src, interval)
			err = rec.Run(context.Background(), duration)
			// A failure to stop tracking spoils nothing recorded, and the
			// deferred Kill ends the guest either way.
			_ = src.StopDirtyLog()
			if err != nil {
				return err
			}
			tr := &trace.Trace{Pages: cfg.Pages, PageSize: 4096, Interval: interval, Source: "lab:" + workload, Accesses: rec.Accesses()}
			tmp := out + ".tmp"
			f, err := os.Create(tmp)
			if err != nil {
				return fmt.Errorf("create trace: %w", err)
			}
			if err := trace.Write(f, tr); err != nil {
				f.Close()
				os.Remove(tmp)
				return err
			}
			if err := f.Close(); err != nil {
				os.Remove(tmp)
				return fmt.Errorf("write trace: %w", err)
			}
			if err := os.Rename(tmp, out); err != nil {
				return fmt.Errorf("write trace: %w", err)
			}
			fmt.Fprintf(os.Stderr, "wrote %s: %d accesses, %d distinct pages, %v\n", out, len(tr.Accesses), rec.Distinct(), duration)
			return nil
		},
	})
}
