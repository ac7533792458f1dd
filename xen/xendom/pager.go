package xendom

import (
	"errors"
	"fmt"
	"slices"
	"syscall"
	"time"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
	"github.com/xl-postcopy/xl-postcopy/xen/engine"
)

// The destination's vm_event pager: evicting the new domain's pages,
// paging them in (batched where the hypervisor carries the patch, one
// hypercall per page otherwise) and the ring of the guest's paging
// requests.

// evictAll pages out every gfn that will come from the source, before
// the source even pauses: domain creation is setup, not downtime. The gfns
// go to the hypervisor evictBatch at a time.
func (d *Dest) evictAll() error {
	start := time.Now()
	var todo []uint64
	for i := range d.gfns {
		if d.state[i] != stResident && d.state[i] != stAbsent {
			todo = append(todo, uint64(i))
		}
	}
	var failed []uint64
	var firstErr error
	for at := 0; at < len(todo); at += evictBatch {
		chunk := todo[at:min(at+evictBatch, len(todo))]
		f, err := d.pageOutIdx(chunk)
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
		still, _ := d.pageOutIdx(failed)
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

// pageOutIdx pages out the gfns at the page indexes idx in as few calls as
// the hypervisor allows, marks them evicted, and returns the indexes that
// failed with the first error. A failure does not stop the others.
func (d *Dest) pageOutIdx(idx []uint64) (failed []uint64, firstErr error) {
	gfns := make([]uint64, len(idx))
	for i, p := range idx {
		gfns[i] = d.gfns[p]
	}
	for at := 0; at < len(gfns); {
		done, err := d.opt.HV.PageOut(d.dom, gfns[at:])
		done = max(0, min(done, len(gfns)-at))
		d.mu.Lock()
		for _, p := range idx[at : at+done] {
			d.state[p] = stEvicted
		}
		d.mu.Unlock()
		at += done
		if err == nil {
			if done == 0 && at < len(gfns) {
				return append(failed, idx[at:]...), fmt.Errorf("page out gfn %#x: the hypervisor did nothing", gfns[at])
			}
			continue
		}
		if at >= len(gfns) {
			break
		}
		failed = append(failed, idx[at])
		if firstErr == nil {
			firstErr = fmt.Errorf("gfn %#x: %w", gfns[at], err)
		}
		at++
	}
	return failed, firstErr
}

// load makes the paged-out pages idx (gfns, contents buf) resident and
// returns the paging requests now to be answered: those of every page
// loaded, also when a later one failed.
func (d *Dest) load(idx, gfns []uint64, buf []byte) ([]xenctrl.Request, error) {
	var wake []xenctrl.Request
	for at := 0; at < len(gfns); {
		t0 := time.Now()
		done, err := d.opt.HV.LoadPages(d.dom, gfns[at:], buf[at*PageSize:])
		done = max(0, min(done, len(gfns)-at))
		d.mu.Lock()
		d.stats.LoadMs += msSince(t0)
		d.stats.Loaded += uint64(done)
		for _, p := range idx[at : at+done] {
			d.state[p] = stLoaded
			wake = append(wake, d.pending[p]...)
			delete(d.pending, p)
		}
		d.mu.Unlock()
		at += done
		switch {
		case err == nil && at < len(gfns) && done == 0:
			return wake, fmt.Errorf("load gfn %#x: the hypervisor did nothing", gfns[at])
		case err == nil:
			continue
		case at >= len(gfns):
			return wake, fmt.Errorf("load: %w", err)
		case !errors.Is(err, syscall.ENOENT):
			return wake, fmt.Errorf("load gfn %#x: %w", gfns[at], err)
		}
		// ENOENT: the gfn is no longer paged out — the resumed guest gave
		// it back (its balloon) and Xen's DROP_PAGE request is still on
		// the ring, or it populated it again. Either way the page is not
		// the guest's memory any more.
		p := idx[at]
		d.mu.Lock()
		d.state[p] = stDropped
		d.stats.DroppedOnLoad++
		wake = append(wake, d.pending[p]...)
		delete(d.pending, p)
		d.mu.Unlock()
		at++
	}
	return wake, nil
}

// write writes pages the domain holds through one foreign mapping and
// returns the paging requests now to be answered.
func (d *Dest) write(idx, gfns []uint64, buf []byte) ([]xenctrl.Request, error) {
	t0 := time.Now()
	failed, err := d.opt.HV.WritePages(d.dom, gfns, buf)
	if err == nil && len(failed) > 0 {
		err = fmt.Errorf("gfn %#x cannot be mapped", gfns[failed[0]])
	}
	if err != nil {
		return nil, fmt.Errorf("write %d resident gfns: %w", len(gfns), err)
	}
	var wake []xenctrl.Request
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stats.LoadMs += msSince(t0)
	for _, i := range idx {
		if d.state[i] == stResident {
			d.stats.ResidentWritten++
		} else {
			d.stats.Overwritten++
		}
		d.state[i] = stLoaded
		wake = append(wake, d.pending[i]...)
		delete(d.pending, i)
	}
	return wake, nil
}

// respond answers requests whose pages are in and notifies Xen once.
func (d *Dest) respond(reqs []xenctrl.Request) error {
	d.ringMu.Lock()
	defer d.ringMu.Unlock()
	return d.answer(reqs)
}

// answer puts the responses to reqs on the ring (ringMu held), records
// the vCPUs they resume and notifies Xen once.
func (d *Dest) answer(reqs []xenctrl.Request) error {
	for _, r := range reqs {
		if err := d.ring.PutResponse(xenctrl.ResponseFor(r)); err != nil {
			return fmt.Errorf("answer the paging request for gfn %#x: %w", r.GFN, err)
		}
		if r.Flags&xenctrl.FlagVCPUPaused != 0 {
			d.bt.unblock(r.VCPUID)
		}
	}
	if err := d.ring.Notify(); err != nil {
		return fmt.Errorf("notify Xen of %d paging responses: %w", len(reqs), err)
	}
	return nil
}

// ringLoop takes requests off the paging ring: a request for a page
// already in (or not ours) is answered at once, the others wait in
// pending for Place and go to ReadFaults.
func (d *Dest) ringLoop() {
	defer close(d.loopDone)
	var faults []uint64
	for {
		select {
		case <-d.closed:
			return
		default:
		}
		if _, err := d.ring.Wait(d.opt.Poll); err != nil {
			d.loopErr = fmt.Errorf("wait for the paging event channel: %w", err)
			close(d.faults)
			return
		}
		faults = faults[:0]
		var answer []xenctrl.Request
		d.ringMu.Lock()
		for _, req := range d.takeRequests() {
			d.mu.Lock()
			d.stats.Requests++
			if req.Flags&xenctrl.FlagForeign != 0 {
				d.stats.ForeignReq++
			}
			idx, ours := slices.BinarySearch(d.gfns, req.GFN)
			switch {
			case req.Reason != xenctrl.ReasonMemPaging, !ours:
				answer = append(answer, req)
				d.stats.PlainResponses++
			case req.PagingFlags&xenctrl.PagingDropPage != 0:
				// The guest mapped something over a paged-out gfn (its
				// grant table, shared info): the page is gone for good.
				answer = append(answer, req)
				d.stats.PlainResponses++
				d.stats.Dropped++
				if d.state[idx] == stEvicted {
					d.state[idx] = stDropped
				}
				d.opt.Logf("gfn %#x dropped by Xen (the guest mapped something over it)", req.GFN)
			case d.state[idx] == stLoaded:
				answer = append(answer, req)
				d.stats.PlainResponses++
			case d.state[idx] == stAbsent:
				// The guest touched a gfn it gave back before the pause
				// (left paged out here): nothing comes from the source;
				// a fresh page is zeroes, as a repopulated one would be.
				if _, err := d.opt.HV.LoadPages(d.dom, []uint64{req.GFN}, d.zero); err != nil && !errors.Is(err, syscall.ENOENT) {
					d.opt.Logf("zero page for given-back gfn %#x: %v", req.GFN, err)
				}
				answer = append(answer, req)
				d.stats.PlainResponses++
				d.stats.AbsentTouched++
			default:
				if len(d.pending[uint64(idx)]) == 0 {
					faults = append(faults, uint64(idx))
				}
				d.pending[uint64(idx)] = append(d.pending[uint64(idx)], req)
			}
			d.mu.Unlock()
		}
		d.ringMu.Unlock()
		if len(answer) > 0 {
			if err := d.respond(answer); err != nil {
				d.loopErr = err
				close(d.faults)
				return
			}
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
	d.mu.Lock()
	var late []uint64
	for i, s := range d.state {
		if s == stResident {
			late = append(late, uint64(i))
		}
	}
	d.mu.Unlock()
	if _, err := d.pageOutIdx(late); err != nil {
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

// takeRequests takes every request off the ring (ringMu held).
func (d *Dest) takeRequests() []xenctrl.Request {
	var out []xenctrl.Request
	for {
		req, ok, err := d.ring.GetRequest()
		if !ok {
			return out
		}
		if err != nil {
			d.opt.Logf("paging request: %v", err)
		}
		if req.Flags&xenctrl.FlagVCPUPaused != 0 {
			d.bt.block(req.VCPUID)
		}
		out = append(out, req)
	}
}

// drainRing answers every request still on the ring (Close, with ringMu
// held, once every page is in).
func (d *Dest) drainRing() error {
	left := d.takeRequests()
	if len(left) == 0 {
		return nil
	}
	d.mu.Lock()
	d.stats.Requests += uint64(len(left))
	d.stats.PlainResponses += uint64(len(left))
	d.mu.Unlock()
	if err := d.answer(left); err != nil {
		return fmt.Errorf("before disabling paging: %w", err)
	}
	d.opt.Logf("%d paging requests answered as paging was disabled", len(left))
	return nil
}
