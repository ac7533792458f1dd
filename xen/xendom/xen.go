//go:build cgo

package xendom

import (
	"fmt"
	"os"
	"sync"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
)

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
