package xendom

import (
	"fmt"
	"slices"
	"time"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
	"github.com/xl-postcopy/xl-postcopy/xen/engine"
)

// The destination's use of its Pager: every gfn that will come from the
// source is paged out at setup, and the ring loop hands the guest's
// faults to the engine (ReadFaults) until Place loads their pages.

// newDestPager is the Pager of a destination's gfns, every one to be
// paged out unless newDest marks it otherwise; the vCPUs of its requests
// feed the blocktime. Its dom and ring are set by create.
func newDestPager(opt DestOptions, gfns []uint64, bt *blocktime) *Pager {
	return NewPager(opt.HV, 0, nil, gfns, PageEvicted, PagerOptions{
		Logf: opt.Logf,
		Taken: func(r xenctrl.Request) {
			if r.Flags&xenctrl.FlagVCPUPaused != 0 {
				bt.block(r.VCPUID)
			}
		},
		Answered: func(r xenctrl.Request) {
			if r.Flags&xenctrl.FlagVCPUPaused != 0 {
				bt.unblock(r.VCPUID)
			}
		},
	})
}

// hasRing says whether paging is on (the ring is open).
func (p *Pager) hasRing() bool {
	p.ringMu.Lock()
	defer p.ringMu.Unlock()
	return p.ring != nil
}

// evictAll pages out every gfn that will come from the source, before
// the source even pauses: domain creation is setup, not downtime. The gfns
// go to the hypervisor evictBatch at a time.
func (d *Dest) evictAll() error {
	start := time.Now()
	var todo []uint64
	d.pg.mu.Lock()
	for i := range d.gfns {
		if d.pg.state[i] != PageResident && d.pg.state[i] != PageAbsent {
			todo = append(todo, uint64(i))
		}
	}
	d.pg.mu.Unlock()
	var failed []uint64
	var firstErr error
	for at := 0; at < len(todo); at += evictBatch {
		chunk := todo[at:min(at+evictBatch, len(todo))]
		f, err := d.pg.PageOut(chunk)
		failed = append(failed, f...)
		if err != nil && firstErr == nil {
			firstErr = err
		}
		d.opt.Progress("evict", at+len(chunk), len(todo))
	}
	if len(failed) > 0 {
		// A page still referenced (a mapping being torn down) is refused
		// with EBUSY; one more try after a pause.
		time.Sleep(200 * time.Millisecond)
		still, _ := d.pg.PageOut(failed)
		if len(still) > 0 {
			return fmt.Errorf("page out %d of %d gfns of the new domain failed (first: %v)", len(still), len(d.gfns), firstErr)
		}
	}
	n := len(todo)
	d.opt.Progress("evict", n, n)
	d.mu.Lock()
	d.stats.Evicted = uint64(n)
	d.stats.EvictMs = msSince(start)
	d.stats.PagingOps = d.pagingOps()
	d.mu.Unlock()
	d.opt.Logf("paged out %d gfns in %v (%d kept resident for the core pages, %d absent; paging ops %s)", n, time.Since(start).Round(time.Millisecond), len(d.gfns)-n-int(d.stats.Absent), d.stats.Absent, d.stats.PagingOps)
	return nil
}

// evictBatch is how many gfns one PageOut call takes at setup: the most a
// batched hypercall takes, and few enough for progress to move.
const evictBatch = 512

// pagingOps names how the hypervisor pages ("batched", "per-gfn", "libxc"),
// or "" when it cannot say.
func (d *Dest) pagingOps() string {
	if r, ok := d.opt.HV.(PagingOpsReporter); ok {
		return r.PagingOps()
	}
	return ""
}

// ringLoop serves the paging ring: a request for a page already in (or
// not ours) is answered at once by the Pager, the others wait in its
// pending requests for Place and their pages go to ReadFaults.
func (d *Dest) ringLoop() {
	defer close(d.loopDone)
	for {
		select {
		case <-d.closed:
			return
		default:
		}
		faults, err := d.pg.Serve(d.opt.Poll)
		if err != nil {
			d.loopErr = err
			close(d.faults)
			return
		}
		if len(faults) > 0 {
			select {
			case d.faults <- slices.Clone(faults):
			case <-d.closed:
				return
			}
		}
	}
}

// ReadFaults implements engine.Dest.
func (d *Dest) ReadFaults(dst []uint64) ([]uint64, error) {
	dst = dst[:0]
	select {
	case f, ok := <-d.faults:
		if !ok {
			return dst, d.loopErr
		}
		dst = append(dst, f...)
	case <-d.closed:
		return dst, engine.ErrClosed
	}
	for {
		select {
		case f, ok := <-d.faults:
			if !ok {
				return dst, nil
			}
			dst = append(dst, f...)
		default:
			return dst, nil
		}
	}
}

// evictLateResident pages out resident gfns nothing was written to: the
// source sends every gfn of its hint with the core pages, so this is a
// guard, but a resident gfn left as the domain builder wrote it would be
// read by the guest as its memory without a fault.
func (d *Dest) evictLateResident() error {
	d.pg.mu.Lock()
	var late []uint64
	for i, s := range d.pg.state {
		if s == PageResident {
			late = append(late, uint64(i))
		}
	}
	d.pg.mu.Unlock()
	if _, err := d.pg.PageOut(late); err != nil {
		return fmt.Errorf("page out resident %w that the source did not send", err)
	}
	d.mu.Lock()
	d.stats.ResidentLate += uint64(len(late))
	d.mu.Unlock()
	if len(late) > 0 {
		d.opt.Logf("%d resident gfns were not sent before the resume: paged out", len(late))
	}
	return nil
}
