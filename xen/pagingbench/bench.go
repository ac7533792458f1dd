// Package pagingbench times the paging primitives a post-copy destination
// uses, per page, on a real (paused, scratch) domain: paging out and loading
// through libxc (one call and one mlock a page), through hypercall buffers
// (one hypercall a page, one call a batch), through the batched ops of
// scripts/xen-patches where the hypervisor has them, and for comparison
// releasing and populating memory and writing it through a foreign mapping.
// Each round of loads writes new contents, which are read back and
// compared: a primitive that reports success but stores the wrong page fails
// the bench instead of looking fast.
//
// The logic is pure: Target is the hypervisor, the clock is a parameter,
// and the tests drive it with a double whose costs they choose.
package pagingbench

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"time"
)

// PageSize is the x86 page size.
const PageSize = 4096

// Target is what the bench times; every method works on one batch.
type Target interface {
	// PageOutLibxc and LoadLibxc use libxc, one call a gfn.
	PageOutLibxc(gfns []uint64) error
	LoadLibxc(gfns []uint64, data []byte) error
	// PageOut and Load page out or load a batch; batched selects the
	// hypervisor's batched ops (one hypercall a batch) over one
	// hypercall a gfn.
	PageOut(gfns []uint64, batched bool) error
	Load(gfns []uint64, data []byte, batched bool) error
	// HasBatched reports whether the hypervisor has the batched ops.
	HasBatched() bool
	Decrease(gfns []uint64) error
	Populate(gfns []uint64) error
	// Write writes data through one foreign mapping; Read reads back.
	Write(gfns []uint64, data []byte) error
	Read(gfns []uint64, buf []byte) error
}

// Row is one measurement: op on pages gfns, batch at a time.
type Row struct {
	Op        string
	Batch     int
	Pages     int
	Total     time.Duration
	UsPerPage float64
	Note      string
}

func (r Row) String() string {
	s := fmt.Sprintf("paging-bench op=%s batch=%d pages=%d total_ms=%.1f us_per_page=%.1f",
		r.Op, r.Batch, r.Pages, float64(r.Total)/float64(time.Millisecond), r.UsPerPage)
	if r.Note != "" {
		s += " note=" + r.Note
	}
	return s
}

// fill writes contents unique to (round, gfn) into buf.
func fill(buf []byte, gfns []uint64, round int) {
	for i, g := range gfns {
		p := buf[i*PageSize : (i+1)*PageSize]
		for o := 0; o < PageSize; o += 16 {
			binary.LittleEndian.PutUint64(p[o:], g^uint64(o)<<32)
			binary.LittleEndian.PutUint64(p[o+8:], uint64(round)*0x9e3779b97f4a7c15+uint64(o))
		}
	}
}

// Run times every op on gfns for each batch size and writes one line a Row
// to w as it goes. It stops at the first failure or wrong page read back,
// with the gfns paged in again where it can. now is the clock.
func Run(t Target, gfns []uint64, batches []int, now func() time.Time, w io.Writer) ([]Row, error) {
	if len(gfns) == 0 || len(batches) == 0 {
		return nil, fmt.Errorf("nothing to time: %d gfns, %d batch sizes", len(gfns), len(batches))
	}
	data := make([]byte, len(gfns)*PageSize)
	back := make([]byte, len(gfns)*PageSize)
	var rows []Row
	round := 0
	timed := func(op string, b int, note string, f func(g []uint64, d []byte) error, d []byte) error {
		start := now()
		for at := 0; at < len(gfns); at += b {
			end := min(at+b, len(gfns))
			var dd []byte
			if d != nil {
				dd = d[at*PageSize : end*PageSize]
			}
			if err := f(gfns[at:end], dd); err != nil {
				return fmt.Errorf("%s, batch %d, gfns from %#x: %w", op, b, gfns[at], err)
			}
		}
		total := now().Sub(start)
		r := Row{Op: op, Batch: b, Pages: len(gfns), Total: total,
			UsPerPage: float64(total) / float64(time.Microsecond) / float64(len(gfns)), Note: note}
		rows = append(rows, r)
		fmt.Fprintln(w, r)
		return nil
	}
	verify := func(op string, b int) error {
		if err := t.Read(gfns, back); err != nil {
			return fmt.Errorf("read back after %s, batch %d: %w", op, b, err)
		}
		for i, g := range gfns {
			if !bytes.Equal(back[i*PageSize:(i+1)*PageSize], data[i*PageSize:(i+1)*PageSize]) {
				return fmt.Errorf("%s, batch %d: gfn %#x reads back other contents than were loaded", op, b, g)
			}
		}
		return nil
	}
	// A pair: page out, load new contents, check them.
	pair := func(b int, out, in string, note string, po func([]uint64, []byte) error, ld func([]uint64, []byte) error) error {
		if err := timed(out, b, note, po, nil); err != nil {
			return err
		}
		round++
		fill(data, gfns, round)
		if err := timed(in, b, note, ld, data); err != nil {
			// Pages left out would stay paged out in the scratch
			// domain; it is destroyed after the bench anyway.
			return err
		}
		return verify(in, b)
	}
	for _, b := range batches {
		if b < 1 {
			return rows, fmt.Errorf("batch size %d: want at least 1", b)
		}
		err := pair(b, "pageout-libxc", "load-libxc", "one libxc call a gfn",
			func(g []uint64, _ []byte) error { return t.PageOutLibxc(g) },
			func(g []uint64, d []byte) error { return t.LoadLibxc(g, d) })
		if err == nil {
			err = pair(b, "pageout-hcbuf", "load-hcbuf", "one hypercall a gfn from hypercall buffers",
				func(g []uint64, _ []byte) error { return t.PageOut(g, false) },
				func(g []uint64, d []byte) error { return t.Load(g, d, false) })
		}
		if err == nil && t.HasBatched() {
			err = pair(b, "pageout-batched", "load-batched", "one hypercall a batch (xen-patches)",
				func(g []uint64, _ []byte) error { return t.PageOut(g, true) },
				func(g []uint64, d []byte) error { return t.Load(g, d, true) })
		}
		if err == nil {
			err = timed("decrease-reservation", b, "", func(g []uint64, _ []byte) error { return t.Decrease(g) }, nil)
		}
		if err == nil {
			err = timed("populate-physmap", b, "", func(g []uint64, _ []byte) error { return t.Populate(g) }, nil)
		}
		if err == nil {
			round++
			fill(data, gfns, round)
			err = timed("foreign-write", b, "one mapping a batch", func(g []uint64, d []byte) error { return t.Write(g, d) }, data)
			if err == nil {
				err = verify("foreign-write", b)
			}
		}
		if err != nil {
			return rows, err
		}
	}
	return rows, nil
}
