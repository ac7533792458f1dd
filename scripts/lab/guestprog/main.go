// Command guestprog is the workload of the nested Xen lab's guests.
//
// It allocates a buffer, fills every page with a pattern derived from the page's index
// and a per-page generation number, then keeps dirtying pages in order at a steady rate:
// before a page is rewritten its old content is checked, so memory lost or corrupted by a
// migration shows up as errors. Once a second it prints one line to standard output
// (the guest console in the lab):
//
//	progress <seq> <checksum> dirtied=<pages> errors=<pages> mib=<size>
//
// seq grows by one per line, so a scenario that sees seq keep growing after a migration
// knows the guest kept running; checksum is an order-independent digest of the content
// the buffer must hold, and errors counts pages whose content did not match.
//
// With -relay-count FILE it is instead a pipe that counts what passes through it: dom0
// uses it to measure local migration streams.
package main

import (
	"flag"
	"fmt"
	"os"
	"time"
)

func main() {
	mib := flag.Int("mib", 16, "buffer size in MiB")
	rate := flag.Int("rate", 256, "pages dirtied per second (0: only verify)")
	verifyEvery := flag.Int("verify-every", 10, "check the whole buffer every N progress lines (0: never)")
	relayCount := flag.String("relay-count", "", "instead of the workload: copy stdin to stdout, then write the byte count to this file (dom0 helper)")
	flag.Parse()
	if *relayCount != "" {
		if err := relay(os.Stdin, os.Stdout, *relayCount); err != nil {
			fmt.Fprintln(os.Stderr, "guestprog:", err)
			os.Exit(1)
		}
		return
	}
	if *mib <= 0 || *rate < 0 || *verifyEvery < 0 {
		fmt.Fprintln(os.Stderr, "guestprog: -mib must be > 0, -rate and -verify-every >= 0")
		os.Exit(2)
	}
	w := newWorkload(*mib << 20 / pageSize)
	fmt.Printf("guestprog start mib=%d pages=%d rate=%d\n", *mib, w.pages(), *rate)
	run(w, *rate, *verifyEvery, time.Second, os.Stdout, nil)
}
