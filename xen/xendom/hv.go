// Package xendom is the engine's backend for real Xen domains (PVH and HVM
// with HAP): the source reads pages through foreign mappings, tracks writes
// with log-dirty and stops the guest with a cooperative suspend; the
// destination is a domain created by xl from the same configuration, paused,
// whose every RAM page is paged out with vm_event paging before the guest
// resumes, so that a touch of a page not yet received pauses the vCPU and
// becomes a paging request, served by fetching the page from the source.
//
// Everything the hypervisor does goes through the small Hypervisor
// interface: *xenctrl.Handle provides it through Xen, and the tests drive
// the backend with a double that keeps memory and a paging ring in Go.
package xendom

import (
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
)

// Hypervisor is what the backend needs from Xen.
type Hypervisor interface {
	Domain(dom uint32) (xenctrl.DomainInfo, error)
	Pause(dom uint32) error
	Unpause(dom uint32) error
	// ResumeDomain ends a suspend: fast makes the guest see its suspend
	// as cancelled (it goes on where it was, in the same domain).
	ResumeDomain(dom uint32, fast bool) error
	MaxGPFN(dom uint32) (uint64, error)
	PageTypes(dom uint32, gfns []uint64) ([]xenctrl.PageType, error)
	HVMContext(dom uint32) ([]byte, error)
	SetHVMContext(dom uint32, ctx []byte) error
	HVMParam(dom uint32, param int) (uint64, error)
	TSCInfo(dom uint32) (xenctrl.TSCInfo, error)
	SetTSCInfo(dom uint32, t xenctrl.TSCInfo) error
	// ReadPages copies the pages at gfns into buf (4096 bytes each) and
	// returns the indexes of the pages that could not be mapped (left
	// zero). No mapping outlives the call: a mapped page cannot be
	// nominated for paging.
	ReadPages(dom uint32, gfns []uint64, buf []byte) (failed []int, err error)
	// WritePages writes src (4096 bytes a gfn) to gfns through one
	// mapping and returns the indexes of the gfns that could not be
	// mapped (not written).
	WritePages(dom uint32, gfns []uint64, src []byte) (failed []int, err error)
	PopulatePhysmap(dom uint32, gfns []uint64) error
	DecreaseReservation(dom uint32, gfns []uint64) error
	EnableLogDirty(dom uint32) error
	DisableLogDirty(dom uint32) error
	// CleanDirty returns the gfns written since the last call (below
	// pages) and clears the log.
	CleanDirty(dom uint32, pages uint64, dst []uint64) ([]uint64, error)
	// PageOut nominates and evicts gfns, so that a touch raises a paging
	// request, and returns how many, in order, were paged out; on an
	// error gfns[done] is the gfn that failed.
	PageOut(dom uint32, gfns []uint64) (done int, err error)
	// LoadPages makes paged-out gfns resident with their contents (4096
	// bytes a gfn, in order) and returns how many were loaded; on an
	// error gfns[done] failed (ENOENT: it was not paged out any more).
	LoadPages(dom uint32, gfns []uint64, data []byte) (done int, err error)
	EnablePaging(dom uint32) (Ring, error)
}

// PagingOpsReporter is implemented by a Hypervisor that can say how its
// paging ops reach Xen ("batched", "per-gfn", "libxc").
type PagingOpsReporter interface {
	PagingOps() string
}

// Ring is a domain's vm_event paging ring (*xenctrl.PagingRing).
type Ring interface {
	GetRequest() (xenctrl.Request, bool, error)
	PutResponse(xenctrl.Response) error
	Notify() error
	// Wait blocks until Xen signals the event channel or timeout passes.
	Wait(timeout time.Duration) (bool, error)
	Close() error
}

// PageSize is the x86 page size, the only one this backend handles.
const PageSize = 4096

// ramGFNs returns, ascending, the gfns in [0, top] that hold RAM in dom
// (a page type other than invalid, xalloc or broken), asking Xen for the
// types 1024 gfns at a time.
func ramGFNs(hv Hypervisor, dom uint32, top uint64) ([]uint64, error) {
	const batch = 1024
	var ram []uint64
	probe := make([]uint64, 0, batch)
	for base := uint64(0); base <= top; base += batch {
		probe = probe[:0]
		for g := base; g <= top && g < base+batch; g++ {
			probe = append(probe, g)
		}
		types, err := hv.PageTypes(dom, probe)
		if err != nil {
			return nil, fmt.Errorf("page types of gfns %#x..%#x: %w", probe[0], probe[len(probe)-1], err)
		}
		for i, t := range types {
			if t != xenctrl.PageInvalid && t != xenctrl.PageXAlloc && t != xenctrl.PageBroken {
				ram = append(ram, probe[i])
			}
		}
	}
	return ram, nil
}

// Xen is the Hypervisor of a real dom0.
type Xen struct {
	*xenctrl.Handle
	dirty map[uint32]*xenctrl.DirtyBitmap
	words []uint64
	// mapErr is the first per-page error of the latest ReadPages that had
	// one (for logs: which errno Xen gave); ReadPages runs concurrently
	// (push, fault replies, checksums).
	mapErrMu sync.Mutex
	mapErr   error
	// batches hold the hypercall buffers of PageOut and LoadPages; two,
	// so that the ring loop's zero-page loads never wait for a long
	// Place. Empty when libxencall could not give us any: then the
	// libxc calls, one a gfn, do the work.
	batches chan *xenctrl.PagingBatch
	all     []*xenctrl.PagingBatch
}

func (x *Xen) lastMapError() error {
	x.mapErrMu.Lock()
	defer x.mapErrMu.Unlock()
	return x.mapErr
}

// OpenXen opens the hypervisor interfaces; it fails with xenctrl's clear
// "not running in a Xen dom0" error elsewhere.
func OpenXen() (*Xen, error) {
	h, err := xenctrl.Open()
	if err != nil {
		return nil, err
	}
	x := &Xen{Handle: h, dirty: map[uint32]*xenctrl.DirtyBitmap{}}
	x.batches = make(chan *xenctrl.PagingBatch, 2)
	for range 2 {
		b, err := xenctrl.OpenPagingBatch()
		if err != nil {
			// Not fatal: the libxc path works, only slower.
			fmt.Fprintf(os.Stderr, "xl-postcopy: no hypercall buffers for batched paging (%v): paging one libxc call a page\n", err)
			break
		}
		x.all = append(x.all, b)
		x.batches <- b
	}
	return x, nil
}

// SetPerGFN(true) keeps paging to one hypercall a gfn even on a hypervisor
// with the batched ops of scripts/xen-patches (--paging-ops per-gfn).
func (x *Xen) SetPerGFN(on bool) {
	for _, b := range x.all {
		b.PerGFN(on)
	}
}

// PagingOps implements PagingOpsReporter: "batched" (the patched
// hypervisor's ops), "per-gfn" (one hypercall a gfn from hypercall
// buffers), "libxc" (one libxc call a gfn), or "unknown" before the first
// paging op.
func (x *Xen) PagingOps() string {
	if len(x.all) == 0 {
		return "libxc"
	}
	for _, b := range x.all {
		if o := b.Ops(); o != xenctrl.OpsUnknown {
			return o.String()
		}
	}
	return xenctrl.OpsUnknown.String()
}

// Close releases the hypervisor handles.
func (x *Xen) Close() error {
	for _, b := range x.dirty {
		b.Close()
	}
	for _, b := range x.all {
		b.Close()
	}
	return x.Handle.Close()
}

// PageOut implements Hypervisor.
func (x *Xen) PageOut(dom uint32, gfns []uint64) (int, error) {
	if len(x.all) == 0 {
		for i, g := range gfns {
			if err := x.Handle.PagingNominate(dom, g); err != nil {
				return i, err
			}
			if err := x.Handle.PagingEvict(dom, g); err != nil {
				return i, err
			}
		}
		return len(gfns), nil
	}
	b := <-x.batches
	defer func() { x.batches <- b }()
	return b.PageOut(dom, gfns)
}

// LoadPages implements Hypervisor.
func (x *Xen) LoadPages(dom uint32, gfns []uint64, data []byte) (int, error) {
	if len(data) < len(gfns)*PageSize {
		return 0, fmt.Errorf("load %d pages from a %d-byte buffer", len(gfns), len(data))
	}
	if len(x.all) == 0 {
		for i, g := range gfns {
			if err := x.Handle.PagingLoad(dom, g, data[i*PageSize:(i+1)*PageSize]); err != nil {
				return i, err
			}
		}
		return len(gfns), nil
	}
	b := <-x.batches
	defer func() { x.batches <- b }()
	return b.Load(dom, gfns, data)
}

// WritePages implements Hypervisor.
func (x *Xen) WritePages(dom uint32, gfns []uint64, src []byte) ([]int, error) {
	if len(src) < len(gfns)*PageSize {
		return nil, fmt.Errorf("write %d pages from a %d-byte buffer", len(gfns), len(src))
	}
	if len(gfns) == 0 {
		return nil, nil
	}
	m, err := x.MapBatch(dom, xenctrl.ProtReadWrite, gfns)
	if err != nil {
		return nil, fmt.Errorf("map %d gfns from %#x for writing: %w", len(gfns), gfns[0], err)
	}
	var failed []int
	for i := range gfns {
		pg, perr := m.Page(i)
		if perr != nil {
			failed = append(failed, i)
			continue
		}
		copy(pg, src[i*PageSize:(i+1)*PageSize])
	}
	if err := m.Unmap(); err != nil {
		return nil, fmt.Errorf("unmap %d gfns: %w", len(gfns), err)
	}
	return failed, nil
}

// ReadPages implements Hypervisor.
func (x *Xen) ReadPages(dom uint32, gfns []uint64, buf []byte) ([]int, error) {
	if len(buf) < len(gfns)*PageSize {
		return nil, fmt.Errorf("read %d pages into a %d-byte buffer", len(gfns), len(buf))
	}
	if len(gfns) == 0 {
		return nil, nil
	}
	m, err := x.MapBatch(dom, xenctrl.ProtRead, gfns)
	if err != nil {
		return nil, fmt.Errorf("map %d gfns from %#x: %w", len(gfns), gfns[0], err)
	}
	var failed []int
	for i := range gfns {
		dst := buf[i*PageSize : (i+1)*PageSize]
		pg, perr := m.Page(i)
		if perr != nil {
			clear(dst)
			if len(failed) == 0 {
				x.mapErrMu.Lock()
				x.mapErr = fmt.Errorf("gfn %#x: %w", gfns[i], perr)
				x.mapErrMu.Unlock()
			}
			failed = append(failed, i)
			continue
		}
		copy(dst, pg)
	}
	if err := m.Unmap(); err != nil {
		return nil, fmt.Errorf("unmap %d gfns: %w", len(gfns), err)
	}
	return failed, nil
}

// CleanDirty implements Hypervisor.
func (x *Xen) CleanDirty(dom uint32, pages uint64, dst []uint64) ([]uint64, error) {
	b := x.dirty[dom]
	if b == nil || b.Pages() != pages {
		if b != nil {
			b.Close()
		}
		nb, err := x.NewDirtyBitmap(dom, pages)
		if err != nil {
			return nil, err
		}
		x.dirty[dom] = nb
		b = nb
	}
	if cap(x.words) < b.Words() {
		x.words = make([]uint64, b.Words())
	}
	w := x.words[:b.Words()]
	if _, err := b.Clean(w); err != nil {
		return nil, err
	}
	return xenctrl.AppendSetBits(dst, w, pages), nil
}

// DisableLogDirty implements Hypervisor and frees the bitmap buffer.
func (x *Xen) DisableLogDirty(dom uint32) error {
	if b := x.dirty[dom]; b != nil {
		b.Close()
		delete(x.dirty, dom)
	}
	return x.Handle.DisableLogDirty(dom)
}

// EnablePaging implements Hypervisor.
func (x *Xen) EnablePaging(dom uint32) (Ring, error) {
	r, err := x.Handle.EnablePaging(dom)
	if err != nil {
		return nil, err
	}
	return r, nil
}
