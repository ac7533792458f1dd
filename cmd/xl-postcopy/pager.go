//go:build cgo

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/xen/xendom"
)

// pager-selftest proves the vm_event paging mechanism post-copy is built on,
// on the destination's own pager (xendom.Pager, xendom.SelfTest): it evicts
// pages of a running guest and serves the guest's paging requests by loading
// the saved content back, the way the destination of a post-copy migration
// loads pages fetched from the source. This file is the command: flags, the
// hypervisor and the ring, signals, and the lines the lab scenarios parse.

func init() {
	register(&command{
		name:    "pager-selftest",
		args:    "[options] <domain>",
		summary: "evict guest pages and serve the paging requests (vm_event paging self-test)",
		setup: func(fs *pflag.FlagSet) {
			fs.String("gfns", "", "gfns to evict: hex ranges `LIST` like 1a00-1aff,1c00 (or @FILE holding them)")
			fs.Duration("timeout", 60*time.Second, "serve requests at most this long, then page every remaining gfn back in")
			fs.Duration("linger", 3*time.Second, "after every evicted gfn is back, keep serving stray requests this long")
			fs.Int("limit", 0, "evict only the first N gfns of the list (0: all)")
			fs.Duration("poll", 20*time.Millisecond, "look at the ring at least this often even without an event")
			fs.Bool("verify", true, "checksum saved pages before loading them and read every loaded page back")
			fs.Bool("debug", false, "log every libxc call and every request")
		},
		run: runPagerSelftest,
	})
}

// parseGFNList parses "1a00-1aff,1c00" (hex, 0x optional) into a sorted,
// duplicate-free list; "@FILE" reads the list from FILE (commas, spaces or
// newlines between items).
func parseGFNList(spec string) ([]uint64, error) {
	if strings.HasPrefix(spec, "@") {
		b, err := os.ReadFile(spec[1:])
		if err != nil {
			return nil, fmt.Errorf("read the gfn list: %w", err)
		}
		spec = string(b)
	}
	seen := map[uint64]bool{}
	var out []uint64
	items := strings.FieldsFunc(spec, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\t' || r == '\r' })
	for _, it := range items {
		lo, hi, isRange := strings.Cut(it, "-")
		a, err := parseHex(lo)
		if err != nil {
			return nil, fmt.Errorf("gfn list item %q: %w", it, err)
		}
		b := a
		if isRange {
			if b, err = parseHex(hi); err != nil {
				return nil, fmt.Errorf("gfn list item %q: %w", it, err)
			}
		}
		if b < a {
			return nil, fmt.Errorf("gfn list item %q: range ends before it starts", it)
		}
		if b-a >= 1<<22 {
			return nil, fmt.Errorf("gfn list item %q: more than 16 GiB of pages", it)
		}
		for g := a; g <= b; g++ {
			if !seen[g] {
				seen[g] = true
				out = append(out, g)
			}
		}
	}
	if len(out) == 0 {
		return nil, errors.New("the gfn list is empty")
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out, nil
}

func parseHex(s string) (uint64, error) {
	s = strings.TrimPrefix(strings.TrimPrefix(s, "0x"), "0X")
	v, err := strconv.ParseUint(s, 16, 64)
	if err != nil {
		return 0, fmt.Errorf("not a hex gfn: %w", err)
	}
	return v, nil
}

func runPagerSelftest(fs *pflag.FlagSet, args []string) error {
	if len(args) != 1 {
		return usagef("pager-selftest takes one domain, got %d arguments", len(args))
	}
	spec, _ := fs.GetString("gfns")
	timeout, _ := fs.GetDuration("timeout")
	linger, _ := fs.GetDuration("linger")
	poll, _ := fs.GetDuration("poll")
	debug, _ := fs.GetBool("debug")
	limit, _ := fs.GetInt("limit")
	verify, _ := fs.GetBool("verify")
	if spec == "" {
		return usagef("--gfns is required: the guest frames to evict")
	}
	if timeout <= 0 || poll <= 0 || linger < 0 || limit < 0 {
		return usagef("--timeout and --poll must be positive, --linger and --limit not negative")
	}
	gfns, err := parseGFNList(spec)
	if err != nil {
		return usagef("--gfns: %v", err)
	}
	if limit > 0 && limit < len(gfns) {
		gfns = gfns[:limit]
	}
	fmt.Fprintf(os.Stderr, "pager-selftest: %d gfns from %#x to %#x\n", len(gfns), gfns[0], gfns[len(gfns)-1])
	x, err := xendom.OpenXen()
	if err != nil {
		return fmt.Errorf("pager-selftest: %w", err)
	}
	defer x.Close()
	// printf is what the self-test always shows (progress, the first
	// failures: the scenario's evidence), logf the --debug detail.
	printf := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "pager-selftest: "+format+"\n", a...)
	}
	logf := func(string, ...any) {}
	if debug {
		logf = printf
		x.SetDebug(func(msg string) { fmt.Fprintln(os.Stderr, "xenctrl:", msg) })
	}
	dom, err := resolveDomain(x, args[0])
	if err != nil {
		return err
	}
	info, err := x.Domain(dom)
	if err != nil {
		return fmt.Errorf("pager-selftest: %w", err)
	}
	if info.Kind() == "pv" {
		return fmt.Errorf("domain %d is PV: vm_event paging needs an HVM or PVH guest with HAP", dom)
	}
	ring, err := x.EnablePaging(dom)
	if err != nil {
		return fmt.Errorf("pager-selftest: enable paging on domain %d: %w", dom, err)
	}
	closeRing := func() error {
		if err := ring.Close(); err != nil {
			return fmt.Errorf("disable paging: %w", err)
		}
		return nil
	}
	// SIGINT/SIGTERM end the serving early; the self-test then restores
	// the pages still out, so an interrupted test does not strand the guest.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	stats, runErr := xendom.SelfTest(ctx, x, dom, ring, xendom.SelfTestOptions{
		GFNs: gfns, Timeout: timeout, Linger: linger, Poll: poll, Verify: verify, Logf: logf, Printf: printf,
		Evicted: func(s xendom.SelfTestStats) {
			if after, err := x.Domain(dom); err == nil {
				fmt.Fprintf(os.Stderr, "pager-selftest: evicted %d of %d gfns (%d failures); Xen counts %d paged pages\n",
					s.Evicted, len(gfns), s.EvictFailures, after.PagedPages)
			}
			// The scenario matches guest progress against this mark.
			fmt.Printf("PAGER-EVICTED evicted=%d\n", s.Evicted)
		},
	})
	if ee := (*xendom.EvictError)(nil); errors.As(runErr, &ee) {
		_ = closeRing()
		return fmt.Errorf("pager-selftest: %w", runErr)
	}
	fmt.Fprintf(os.Stderr, "pager-selftest: final ring[%v]\n", xendom.RingState(ring))
	closeErr := closeRing()
	paged := int64(-1)
	if after, err := x.Domain(dom); err == nil {
		paged = int64(after.PagedPages)
	}
	fmt.Printf("PAGER-STATS %v paged_pages_after=%d\n", stats, paged)
	for _, e := range []error{runErr, closeErr, stats.Verdict()} {
		if e != nil {
			return fmt.Errorf("pager-selftest: %w", e)
		}
	}
	return nil
}
