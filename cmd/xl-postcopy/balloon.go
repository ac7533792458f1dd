package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/xen/dsb/control"
	"github.com/xl-postcopy/xl-postcopy/xen/xenstore"
)

func init() {
	var timeout time.Duration
	register(&command{
		name:    "balloon",
		args:    "[options] <domain>",
		summary: "ask a guest's guest-balloon daemon to give its free memory back to Xen now (dom0)",
		setup: func(fs *pflag.FlagSet) {
			fs.DurationVar(&timeout, "timeout", 10*time.Second, "how long to wait for the daemon's acknowledgement")
		},
		run: func(fs *pflag.FlagSet, args []string) error {
			if len(args) != 1 {
				return usagef("want exactly one domain (name or id), got %d arguments", len(args))
			}
			if timeout <= 0 {
				return usagef("--timeout must be positive")
			}
			c, err := xenstore.Open()
			if err != nil {
				return err
			}
			defer c.Close()
			return runBalloon(context.Background(), c, args[0], timeout, os.Stdout)
		},
	})
}

// runBalloon resolves dom, sends the balloon-now request and reports the
// acknowledgement.
func runBalloon(ctx context.Context, c *xenstore.Client, dom string, timeout time.Duration, out io.Writer) error {
	domid, err := control.ResolveDomain(ctx, c, dom)
	if err != nil {
		return err
	}
	start := time.Now()
	ack, err := control.RequestBalloon(ctx, c, domid, timeout)
	if err != nil {
		return err
	}
	if !ack.OK {
		return fmt.Errorf("guest-balloon in domain %d answered with an error: %s (target now %d kB)", domid, ack.Err, ack.TargetKB)
	}
	fmt.Fprintf(out, "domain %d: balloon target %d kB, released %d kB (%d pages) in %v\n",
		domid, ack.TargetKB, ack.ReleasedKB, ack.ReleasedKB/4, time.Since(start).Round(time.Millisecond))
	return nil
}
