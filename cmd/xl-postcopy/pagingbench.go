//go:build cgo

package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/xen/pagingbench"
	"github.com/xl-postcopy/xl-postcopy/xen/xendom"
)

// paging-bench times the destination's paging primitives on a scratch
// domain (docs/BENCHMARKS.md has the table, the lab's scenario 60 the run).

func init() {
	var pages int
	var batches, base string
	register(&command{
		name:    "paging-bench",
		args:    "[options] <domid>",
		summary: "time the paging primitives on a paused scratch domain, per page (lab; the domain's memory is overwritten)",
		hidden:  true,
		setup: func(fs *pflag.FlagSet) {
			fs.IntVar(&pages, "pages", 512, "how many gfns each op is timed on")
			fs.StringVar(&batches, "batches", "1,64,512", "comma-separated batch sizes")
			fs.StringVar(&base, "base", "0x1000", "first gfn (the gfns from it on must be RAM of the domain)")
		},
		run: func(fs *pflag.FlagSet, args []string) error {
			if len(args) != 1 {
				return usagef("want the scratch domain's id")
			}
			dom, ok, err := parseDomainArg(args[0])
			if err != nil || !ok {
				return usagef("want a numeric domain id, not %q", args[0])
			}
			if err := checkCount("pages", pages, 1, 4096); err != nil {
				return err
			}
			b0, err := strconv.ParseUint(base, 0, 64)
			if err != nil {
				return usagef("--base %q: not a gfn", base)
			}
			var bs []int
			for _, f := range strings.Split(batches, ",") {
				n, err := strconv.Atoi(strings.TrimSpace(f))
				if err != nil || n < 1 || n > 4096 {
					return usagef("--batches %q: want sizes from 1 to 4096, comma-separated", batches)
				}
				bs = append(bs, n)
			}
			return runPagingBench(dom, b0, pages, bs)
		},
	})
}

func runPagingBench(dom uint32, base uint64, pages int, batches []int) error {
	x, err := xendom.OpenXen()
	if err != nil {
		return err
	}
	defer x.Close()
	info, err := x.Domain(dom)
	if err != nil {
		return fmt.Errorf("domain %d: %w", dom, err)
	}
	if !info.Paused {
		return fmt.Errorf("domain %d runs: the bench overwrites its memory, give it a paused scratch domain (xl create -p)", dom)
	}
	t, err := pagingbench.NewXen(x, dom)
	if err != nil {
		return err
	}
	gfns := make([]uint64, pages)
	for i := range gfns {
		gfns[i] = base + uint64(i)
	}
	_, runErr := pagingbench.Run(t, gfns, batches, time.Now, os.Stdout)
	closeErr := t.Close()
	if runErr != nil {
		return fmt.Errorf("paging bench on domain %d: %w", dom, runErr)
	}
	return closeErr
}
