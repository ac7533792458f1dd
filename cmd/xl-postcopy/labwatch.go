//go:build cgo

package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
)

// lab-downtime measures a migration's downtime from outside, the same way
// for xl migrate and for xl-postcopy: polling the hypervisor, it takes the
// longest interval during which neither the source domain nor any domain
// created after the watch began was runnable (not paused, not shut down).
// The lab prints the two tools' figures side by side from this one ruler.

func init() {
	var poll, timeout time.Duration
	register(&command{
		name:    "lab-downtime",
		args:    "[options] <domid>",
		summary: "measure a local migration's downtime by polling the hypervisor (lab)",
		hidden:  true,
		setup: func(fs *pflag.FlagSet) {
			fs.DurationVar(&poll, "poll", time.Millisecond, "polling interval")
			fs.DurationVar(&timeout, "timeout", 5*time.Minute, "give up after this long")
		},
		run: func(fs *pflag.FlagSet, args []string) error {
			if len(args) != 1 {
				return usagef("want the source domain id")
			}
			dom, ok, err := parseDomainArg(args[0])
			if err != nil || !ok {
				return usagef("want a numeric domain id, not %q", args[0])
			}
			h, err := xenctrl.Open()
			if err != nil {
				return err
			}
			defer h.Close()
			ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer cancel()
			ctx, cancel2 := context.WithTimeout(ctx, timeout)
			defer cancel2()
			return watchDowntime(ctx, h, dom, poll)
		},
	})
}

func runnable(d xenctrl.DomainInfo) bool { return !d.Paused && !d.Shutdown && !d.Dying }

// watchDowntime prints "downtime_ms=X" once a new domain has run for a
// second after a gap, or on SIGTERM/timeout the longest gap seen.
func watchDowntime(ctx context.Context, h *xenctrl.Handle, src uint32, poll time.Duration) error {
	doms, err := h.Domains()
	if err != nil {
		return err
	}
	known := map[uint32]bool{}
	for _, d := range doms {
		known[d.ID] = true
	}
	if !known[src] {
		return fmt.Errorf("domain %d does not exist", src)
	}
	var gapStart time.Time
	var longest time.Duration
	var newUpSince time.Time
	report := func(why string) error {
		fmt.Printf("downtime_ms=%.1f (%s)\n", float64(longest.Microseconds())/1000, why)
		return nil
	}
	for {
		select {
		case <-ctx.Done():
			return report("watch ended")
		default:
		}
		doms, err := h.Domains()
		if err != nil {
			return err
		}
		now := time.Now()
		up, newUp := false, false
		for _, d := range doms {
			if d.ID == src && runnable(d) {
				up = true
			}
			if !known[d.ID] && runnable(d) {
				up, newUp = true, true
			}
		}
		switch {
		case !up && gapStart.IsZero():
			gapStart = now
		case up && !gapStart.IsZero():
			if g := now.Sub(gapStart); g > longest {
				longest = g
			}
			gapStart = time.Time{}
		}
		if newUp && gapStart.IsZero() {
			if newUpSince.IsZero() {
				newUpSince = now
			}
			if longest > 0 && now.Sub(newUpSince) > time.Second {
				return report("destination running")
			}
		} else {
			newUpSince = time.Time{}
		}
		time.Sleep(poll)
	}
}
