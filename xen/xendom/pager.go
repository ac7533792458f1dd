package xendom

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
)

// The vm_event pager: paging a domain's gfns out, paging them in (batched
// where the hypervisor carries the patch, one hypercall per page
// otherwise) and the ring of the guest's paging requests. The post-copy
// destination (Dest) and the paging self-test (SelfTest) both run on it;
// where the pages come from is theirs to say.

// PageState is where one of a Pager's gfns stands.
type PageState uint8

// The states of a Pager's gfns.
const (
	// PageEvicted: paged out (or about to be); a touch pauses the vCPU
	// and raises a request that waits for a Load.
	PageEvicted PageState = iota
	// PageLoaded: in again, with the content its owner gave.
	PageLoaded
	// PageDropped: Xen dropped the paged-out page (the guest gave the gfn
	// back or mapped something else there); nothing is to be loaded.
	PageDropped
	// PageResident: never paged out by us; a request for it is a fault
	// the owner answers (the destination writes it before the resume).
	PageResident
	// PageAbsent: no memory behind the gfn (ballooned at the source): a
	// touch is answered at once with a zero page.
	PageAbsent
)

// PagerOptions configure a Pager.
type PagerOptions struct {
	// Logf gets the pager's notes (dropped pages, version mismatches);
	// nil: none.
	Logf func(format string, a ...any)
	// Taken, if set, sees every request as it comes off the ring, and
	// Answered every request once its response is on the ring (the
	// destination's blocktime is measured between the two).
	Taken, Answered func(xenctrl.Request)
}

// PagerStats are a Pager's counts.
type PagerStats struct {
	Requests        uint64  // paging requests taken off the ring
	Foreign         uint64  // requests raised by a foreign mapping, not a vCPU
	VCPUPaused      uint64  // requests whose vCPU waits for the response
	EvictFailFlag   uint64  // requests carrying MEM_PAGING_EVICT_FAIL
	Plain           uint64  // requests the pager answered itself: no page to load
	Dropped         uint64  // DROP_PAGE requests
	AbsentTouched   uint64  // requests for absent gfns, answered with a zero page
	Events          uint64  // event-channel notifications seen by Serve
	PolledRequests  uint64  // requests Serve found without an event
	Loaded          uint64  // pages made resident by Load
	DroppedOnLoad   uint64  // loads refused with ENOENT: the gfn was no longer paged out
	ResidentWritten uint64  // pages written (Write) while still as the domain builder left them
	Overwritten     uint64  // pages written (Write) over a loaded one
	LoadMs          float64 // time spent in loads and writes (hypercalls)
}

// Pager is the vm_event pager of one domain over a fixed, sorted set of
// gfns; a gfn is named by its index in that set. It is safe for
// concurrent use: one goroutine serves the ring while others load pages.
type Pager struct {
	hv   Hypervisor
	dom  uint32
	gfns []uint64
	ring Ring
	zero []byte
	opt  PagerOptions

	mu      sync.Mutex
	state   []PageState
	pending map[uint64][]xenctrl.Request // by page index: requests waiting for the page
	stats   PagerStats

	ringMu sync.Mutex // the ring is not safe for concurrent use
}

// NewPager returns the pager of dom's gfns (sorted ascending, each once),
// every one in state initial, answering on ring (nil: set later, before
// any ring method runs).
func NewPager(hv Hypervisor, dom uint32, ring Ring, gfns []uint64, initial PageState, opt PagerOptions) *Pager {
	if opt.Logf == nil {
		opt.Logf = func(string, ...any) {}
	}
	p := &Pager{hv: hv, dom: dom, gfns: gfns, ring: ring, zero: make([]byte, PageSize), opt: opt,
		state: make([]PageState, len(gfns)), pending: map[uint64][]xenctrl.Request{}}
	for i := range p.state {
		p.state[i] = initial
	}
	return p
}

// GFNs are the pager's gfns, by page index (not to be modified).
func (p *Pager) GFNs() []uint64 { return p.gfns }

// Index is the page index of gfn, if it is one of the pager's.
func (p *Pager) Index(gfn uint64) (uint64, bool) {
	i, ok := slices.BinarySearch(p.gfns, gfn)
	return uint64(i), ok
}

// State is where page idx stands.
func (p *Pager) State(idx uint64) PageState {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state[idx]
}

// SetState sets page idx's state (the owner's own bookkeeping: a gfn it
// released, populated, or wants answered differently).
func (p *Pager) SetState(idx uint64, st PageState) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.state[idx] = st
}

// Count is the number of pages in state st.
func (p *Pager) Count(st PageState) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, s := range p.state {
		if s == st {
			n++
		}
	}
	return n
}

// Stats returns the pager's counts so far.
func (p *Pager) Stats() PagerStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stats
}

// PageOut pages out the gfns at the page indexes idx in as few calls as
// the hypervisor allows, marks them evicted, and returns the indexes that
// failed with the first error. A failure does not stop the others.
func (p *Pager) PageOut(idx []uint64) (failed []uint64, firstErr error) {
	gfns := make([]uint64, len(idx))
	for i, x := range idx {
		gfns[i] = p.gfns[x]
	}
	for at := 0; at < len(gfns); {
		done, err := p.hv.PageOut(p.dom, gfns[at:])
		done = max(0, min(done, len(gfns)-at))
		p.mu.Lock()
		for _, x := range idx[at : at+done] {
			p.state[x] = PageEvicted
		}
		p.mu.Unlock()
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

// Load makes the paged-out pages idx (gfns, contents buf) resident and
// returns the paging requests now to be answered: those of every page
// loaded, also when a later one failed. A gfn Xen no longer has paged out
// (ENOENT) is not an error: it becomes PageDropped and its requests are
// returned too.
func (p *Pager) Load(idx, gfns []uint64, buf []byte) ([]xenctrl.Request, error) {
	var wake []xenctrl.Request
	for at := 0; at < len(gfns); {
		t0 := time.Now()
		done, err := p.hv.LoadPages(p.dom, gfns[at:], buf[at*PageSize:])
		done = max(0, min(done, len(gfns)-at))
		p.mu.Lock()
		p.stats.LoadMs = addSince(p.stats.LoadMs, t0)
		p.stats.Loaded += uint64(done)
		for _, x := range idx[at : at+done] {
			p.state[x] = PageLoaded
			wake = append(wake, p.pending[x]...)
			delete(p.pending, x)
		}
		p.mu.Unlock()
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
		x := idx[at]
		p.mu.Lock()
		p.state[x] = PageDropped
		p.stats.DroppedOnLoad++
		wake = append(wake, p.pending[x]...)
		delete(p.pending, x)
		p.mu.Unlock()
		at++
	}
	return wake, nil
}

// Write writes pages the domain holds (not paged out) through one
// foreign mapping, marks them loaded and returns the paging requests now
// to be answered.
func (p *Pager) Write(idx, gfns []uint64, buf []byte) ([]xenctrl.Request, error) {
	t0 := time.Now()
	failed, err := p.hv.WritePages(p.dom, gfns, buf)
	if err == nil && len(failed) > 0 {
		err = fmt.Errorf("gfn %#x cannot be mapped", gfns[failed[0]])
	}
	if err != nil {
		return nil, fmt.Errorf("write %d resident gfns: %w", len(gfns), err)
	}
	var wake []xenctrl.Request
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stats.LoadMs = addSince(p.stats.LoadMs, t0)
	for _, i := range idx {
		if p.state[i] == PageResident {
			p.stats.ResidentWritten++
		} else {
			p.stats.Overwritten++
		}
		p.state[i] = PageLoaded
		wake = append(wake, p.pending[i]...)
		delete(p.pending, i)
	}
	return wake, nil
}

// TakePending puts page idx in state st and returns the requests that
// waited for it, for the caller to answer: a fault it settles without a
// Load (a page it cannot or will not load).
func (p *Pager) TakePending(idx uint64, st PageState) []xenctrl.Request {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.state[idx] = st
	wake := p.pending[idx]
	delete(p.pending, idx)
	return wake
}

// Pending is the number of pages with requests waiting for them.
func (p *Pager) Pending() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pending)
}

// Answer puts the responses to reqs on the ring and notifies Xen once.
func (p *Pager) Answer(reqs []xenctrl.Request) error {
	p.ringMu.Lock()
	defer p.ringMu.Unlock()
	return p.answer(reqs)
}

// answer is Answer with ringMu held.
func (p *Pager) answer(reqs []xenctrl.Request) error {
	for _, r := range reqs {
		if err := p.ring.PutResponse(xenctrl.ResponseFor(r)); err != nil {
			return fmt.Errorf("answer the paging request for gfn %#x: %w", r.GFN, err)
		}
		if p.opt.Answered != nil {
			p.opt.Answered(r)
		}
	}
	if err := p.ring.Notify(); err != nil {
		return fmt.Errorf("notify Xen of %d paging responses: %w", len(reqs), err)
	}
	return nil
}

// Serve is one turn of the ring: it waits for the event channel at most
// poll, takes every request off the ring, answers at once those that need
// no page (not ours, not a paging request, DROP_PAGE, a page already in,
// an absent gfn: a zero page) and returns the page indexes of new faults:
// pages with requests now waiting for a Load (or TakePending). A page
// already waited for is not returned again.
func (p *Pager) Serve(poll time.Duration) ([]uint64, error) {
	ev, err := p.ring.Wait(poll)
	if err != nil {
		return nil, fmt.Errorf("wait for the paging event channel: %w", err)
	}
	n, faults, err := p.turn()
	p.mu.Lock()
	if ev {
		p.stats.Events++
	} else {
		p.stats.PolledRequests += uint64(n)
	}
	p.mu.Unlock()
	return faults, err
}

// Poll is Serve without the wait: what is on the ring now.
func (p *Pager) Poll() ([]uint64, error) {
	_, faults, err := p.turn()
	return faults, err
}

// turn takes the requests on the ring, answers those it can and returns
// how many it took and the new faults.
func (p *Pager) turn() (int, []uint64, error) {
	var faults []uint64
	var answer []xenctrl.Request
	p.ringMu.Lock()
	reqs := p.takeRequests()
	for _, req := range reqs {
		p.mu.Lock()
		p.stats.Requests++
		if req.Flags&xenctrl.FlagForeign != 0 {
			p.stats.Foreign++
		}
		if req.Flags&xenctrl.FlagVCPUPaused != 0 {
			p.stats.VCPUPaused++
		}
		if req.PagingFlags&xenctrl.PagingEvictFail != 0 {
			p.stats.EvictFailFlag++
		}
		i, ours := slices.BinarySearch(p.gfns, req.GFN)
		idx := uint64(i)
		switch {
		case req.Reason != xenctrl.ReasonMemPaging, !ours:
			answer = append(answer, req)
			p.stats.Plain++
		case req.PagingFlags&xenctrl.PagingDropPage != 0:
			// The guest gave the page up or mapped something over the
			// paged-out gfn (its grant table, shared info): the page is
			// gone for good, nothing to load.
			answer = append(answer, req)
			p.stats.Plain++
			p.stats.Dropped++
			if p.state[idx] == PageEvicted {
				p.state[idx] = PageDropped
			}
			p.opt.Logf("gfn %#x dropped by Xen (the guest mapped something over it)", req.GFN)
		case p.state[idx] == PageLoaded:
			answer = append(answer, req)
			p.stats.Plain++
		case p.state[idx] == PageAbsent:
			// The guest touched a gfn it gave back before the pause
			// (left paged out here): nothing comes from the source;
			// a fresh page is zeroes, as a repopulated one would be.
			if _, err := p.hv.LoadPages(p.dom, []uint64{req.GFN}, p.zero); err != nil && !errors.Is(err, syscall.ENOENT) {
				p.opt.Logf("zero page for given-back gfn %#x: %v", req.GFN, err)
			}
			answer = append(answer, req)
			p.stats.Plain++
			p.stats.AbsentTouched++
		default:
			if len(p.pending[idx]) == 0 {
				faults = append(faults, idx)
			}
			p.pending[idx] = append(p.pending[idx], req)
		}
		p.mu.Unlock()
	}
	p.ringMu.Unlock()
	if len(answer) > 0 {
		if err := p.Answer(answer); err != nil {
			return len(reqs), faults, err
		}
	}
	return len(reqs), faults, nil
}

// takeRequests takes every request off the ring (ringMu held).
func (p *Pager) takeRequests() []xenctrl.Request {
	var out []xenctrl.Request
	for {
		req, ok, err := p.ring.GetRequest()
		if !ok {
			return out
		}
		if err != nil {
			// A version mismatch: still answered, Xen is waiting.
			p.opt.Logf("paging request: %v", err)
		}
		if p.opt.Taken != nil {
			p.opt.Taken(req)
		}
		out = append(out, req)
	}
}

// Drain answers every request still on the ring without loading anything
// and returns how many it answered: for closing, once every page is in (a
// vCPU paused on a request must not outlive the ring that would answer
// it).
func (p *Pager) Drain() (int, error) {
	p.ringMu.Lock()
	defer p.ringMu.Unlock()
	left := p.takeRequests()
	if len(left) == 0 {
		return 0, nil
	}
	p.mu.Lock()
	p.stats.Requests += uint64(len(left))
	p.stats.Plain += uint64(len(left))
	p.mu.Unlock()
	if err := p.answer(left); err != nil {
		return 0, err
	}
	return len(left), nil
}

// CloseRing disables paging (closes the ring); without a ring it does
// nothing.
func (p *Pager) CloseRing() error {
	p.ringMu.Lock()
	defer p.ringMu.Unlock()
	if p.ring == nil {
		return nil
	}
	err := p.ring.Close()
	p.ring = nil
	return err
}
