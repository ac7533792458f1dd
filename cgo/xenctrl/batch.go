package xenctrl

/*
#cgo pkg-config: xencall
#include <stdlib.h>
#include "batch.h"
*/
import "C"

import (
	"fmt"
	"sync"
	"syscall"
	"unsafe"
)

// PagingBatch pages gfns out and in, many a call. It owns a libxencall
// handle and about 2 MiB of locked hypercall buffers, so no page costs the
// mlock/munlock that xc_mem_paging_load does for every call. One goroutine
// at a time uses it (its methods serialise).
type PagingBatch struct {
	mu     sync.Mutex
	b      *C.xp_batch
	ops    PagingOps
	perGFN bool // forced per-gfn even where the batched ops exist
}

// OpenPagingBatch opens the libxencall handle and its buffers.
func OpenPagingBatch() (*PagingBatch, error) {
	b, err := C.xp_batch_open()
	if b == nil {
		return nil, &Error{Op: "xencall_open/xencall_alloc_buffer_pages", Errno: errnoOf(-1, err)}
	}
	return &PagingBatch{b: b}, nil
}

// Close frees the buffers and the handle; safe to call twice.
func (p *PagingBatch) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.b != nil {
		C.xp_batch_close(p.b)
		p.b = nil
	}
	return nil
}

// PerGFN(true) keeps to one hypercall a gfn even on a hypervisor with the
// batched ops (to compare, or to work around a faulty patch).
func (p *PagingBatch) PerGFN(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.perGFN = on
}

// Ops is how the calls reach the hypervisor: OpsPerGFN when forced,
// otherwise OpsUnknown until Probe (or the first PageOut or Load) ran.
func (p *PagingBatch) Ops() PagingOps {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.perGFN {
		return OpsPerGFN
	}
	return p.ops
}

// Probe asks the hypervisor, with a batched op on no gfns, whether it has
// the batched ops, and remembers the answer. dom must have paging enabled
// (Xen checks the ring before the op).
func (p *PagingBatch) Probe(dom uint32) (PagingOps, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.probe(dom)
}

func (p *PagingBatch) probe(dom uint32) (PagingOps, error) {
	if p.b == nil {
		return OpsUnknown, ErrClosed
	}
	if p.perGFN {
		return OpsPerGFN, nil
	}
	if p.ops != OpsUnknown {
		return p.ops, nil
	}
	rc, err := C.xp_batch_probe(p.b, C.uint32_t(dom))
	if rc == 0 {
		p.ops = OpsBatched
		return p.ops, nil
	}
	en := errnoOf(-1, err)
	if en == syscall.ENOSYS {
		p.ops = OpsPerGFN
		return p.ops, nil
	}
	return OpsUnknown, &Error{Op: "XENMEM_paging_op(evict_batch, 0 gfns)", Dom: dom, HasDom: true, Errno: en,
		Hint: pagingHint(en)}
}

// PageOut nominates and evicts gfns (a touch then raises a paging request)
// and returns how many, in order, were paged out; on an error, gfns[done]
// is the one that failed and the error wraps its errno (EBUSY: the page is
// mapped or referenced, ENODEV: paging is off).
func (p *PagingBatch) PageOut(dom uint32, gfns []uint64) (int, error) {
	return p.run(dom, "page out", gfns, nil)
}

// Load makes each paged-out gfn resident with its PageSize bytes of data
// (the first page for gfns[0], ...) and returns how many were loaded; on an
// error gfns[done] failed (ENOENT: it is not paged out any more).
func (p *PagingBatch) Load(dom uint32, gfns []uint64, data []byte) (int, error) {
	if len(data) < len(gfns)*PageSize {
		return 0, &Error{Op: "paging load", Dom: dom, HasDom: true, Errno: syscall.EINVAL,
			Detail: fmt.Sprintf("%d gfns, %d bytes of data", len(gfns), len(data))}
	}
	return p.run(dom, "load", gfns, data)
}

func (p *PagingBatch) run(dom uint32, what string, gfns []uint64, data []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ops, err := p.probe(dom)
	if err != nil {
		return 0, err
	}
	batched := C.int(0)
	if ops == OpsBatched {
		batched = 1
	}
	done := 0
	for done < len(gfns) {
		n := min(len(gfns)-done, MaxPagingBatch)
		var cerr C.int
		g := (*C.uint64_t)(unsafe.Pointer(&gfns[done]))
		var got C.int
		if data == nil {
			got = C.xp_batch_pageout(p.b, C.uint32_t(dom), g, C.int(n), batched, &cerr)
		} else {
			d := (*C.uint8_t)(unsafe.Pointer(&data[done*PageSize]))
			got = C.xp_batch_load(p.b, C.uint32_t(dom), g, d, C.int(n), batched, &cerr)
		}
		done += int(got)
		if int(got) < n && cerr != 0 {
			return done, &Error{Op: fmt.Sprintf("XENMEM_paging_op %s (%s)", what, ops), Dom: dom, HasDom: true,
				Errno: syscall.Errno(cerr), Detail: fmt.Sprintf("gfn %#x, %d of %d done", gfns[done], done, len(gfns))}
		}
		// got < n with no error: the hypervisor stopped to be preempted;
		// the loop goes on from gfns[done].
	}
	return done, nil
}
