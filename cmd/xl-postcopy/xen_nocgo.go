//go:build !cgo

package main

import (
	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/xen/xendom"
)

// A build without cgo has no libxenctrl: the commands that only talk to a
// hypervisor say so instead of missing from the command list. migrate and
// migrate-receive keep their flags and fail at the same point with the same
// error (xendom.OpenXen).
func init() {
	for _, c := range []struct {
		name, summary string
		hidden        bool
	}{
		{"pager-selftest", "vm_event paging self-test (needs a build with Xen support)", false},
		{"trace", "record a domain's memory-access trajectory (needs a build with Xen support)", false},
		{"lab-downtime", "downtime ruler (needs a build with Xen support)", true},
		{"paging-bench", "paging primitives bench (needs a build with Xen support)", true},
	} {
		register(&command{
			name: c.name, args: "<domain>", summary: c.summary, hidden: c.hidden,
			setup: func(*pflag.FlagSet) {},
			run:   func(*pflag.FlagSet, []string) error { return xendom.ErrNoXen },
		})
	}
}
