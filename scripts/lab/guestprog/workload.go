package main

import (
	"fmt"
	"io"
	"time"
)

const (
	pageSize     = 4096
	wordsPerPage = pageSize / 8
	// maxCatchUp bounds how many pages one pacing step may dirty: after the guest was
	// paused (a migration's downtime) it resumes at its normal rate instead of sweeping
	// the whole buffer at once.
	maxCatchUp = 256
)

// workload is a buffer whose pages carry a pattern determined by (page index,
// generation); gens records each page's generation so any page can be checked.
type workload struct {
	buf    []uint64 // wordsPerPage words per page
	gens   []uint32
	digest uint64 // XOR of pageDigest over all pages, kept up to date on every write
	next   int    // next page to dirty
}

func newWorkload(pages int) *workload {
	if pages < 1 {
		pages = 1
	}
	w := &workload{buf: make([]uint64, pages*wordsPerPage), gens: make([]uint32, pages)}
	for p := range pages {
		w.fill(p)
		w.digest ^= pageDigest(p, 0)
	}
	return w
}

func (w *workload) pages() int { return len(w.gens) }

// word is the content of word j of page p at generation g. The fields of (p, g, j) do
// not overlap, and multiplying by an odd constant is a bijection, so every page, word and
// generation gets its own value: a stale, zeroed or swapped page is caught. It is cheap on
// purpose: under QEMU TCG every instruction of the workload costs the lab's time.
func word(p int, g uint32, j int) uint64 {
	return (uint64(p)<<40 | uint64(g&0xffffff)<<16 | uint64(j)) * 0x9e3779b97f4a7c15
}

// pageDigest is the page's contribution to the buffer checksum: a full mix (one per
// rewrite, so its cost does not matter) keeps the XOR of many pages well spread.
func pageDigest(p int, g uint32) uint64 {
	x := word(p, g, wordsPerPage)
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}

func (w *workload) page(p int) []uint64 {
	return w.buf[p*wordsPerPage : (p+1)*wordsPerPage]
}

func (w *workload) fill(p int) {
	g := w.gens[p]
	pg := w.page(p)
	for j := range pg {
		pg[j] = word(p, g, j)
	}
}

// check reports whether page p holds the content its generation says it must.
func (w *workload) check(p int) bool {
	g := w.gens[p]
	for j, v := range w.page(p) {
		if v != word(p, g, j) {
			return false
		}
	}
	return true
}

// dirty checks the next page, rewrites it with the next generation and returns whether
// its old content was intact.
func (w *workload) dirty() bool {
	p := w.next
	w.next = (w.next + 1) % len(w.gens)
	ok := w.check(p)
	w.digest ^= pageDigest(p, w.gens[p])
	w.gens[p]++
	w.digest ^= pageDigest(p, w.gens[p])
	w.fill(p)
	return ok
}

// verify checks every page and returns how many are wrong.
func (w *workload) verify() int {
	bad := 0
	for p := range w.gens {
		if !w.check(p) {
			bad++
		}
	}
	return bad
}

// run dirties rate pages per second and prints a progress line every interval until stop
// is closed (nil: forever).
func run(w *workload, rate, verifyEvery int, interval time.Duration, out io.Writer, stop <-chan struct{}) {
	const step = 10 * time.Millisecond
	tick := time.NewTicker(step)
	defer tick.Stop()
	var seq, dirtied, errs int
	start := time.Now()
	lastReport := start
	owed := 0.0
	for {
		select {
		case <-stop:
			return
		case now := <-tick.C:
			owed += float64(rate) * step.Seconds()
			if owed > maxCatchUp {
				owed = maxCatchUp
			}
			for ; owed >= 1; owed-- {
				dirtied++
				if !w.dirty() {
					errs++
				}
			}
			if now.Sub(lastReport) < interval {
				continue
			}
			lastReport = now
			seq++
			extra := ""
			if verifyEvery > 0 && seq%verifyEvery == 0 {
				bad := w.verify()
				errs += bad
				extra = fmt.Sprintf(" verified=%d bad=%d", w.pages(), bad)
			}
			fmt.Fprintf(out, "progress %d %016x dirtied=%d errors=%d mib=%d uptime=%.1f%s\n",
				seq, w.digest, dirtied, errs, w.pages()*pageSize>>20, now.Sub(start).Seconds(), extra)
		}
	}
}
