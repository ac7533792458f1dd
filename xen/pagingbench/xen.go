//go:build cgo

package pagingbench

import (
	"fmt"

	"github.com/xl-postcopy/xl-postcopy/xen/xendom"
)

// Xen is the Target of a real domain, with paging enabled on it.
type Xen struct {
	x    *xendom.Xen
	dom  uint32
	ring xendom.Ring
}

// NewXen enables paging on dom (paused, HVM/PVH with HAP, nothing of it
// mapped) for the bench; Close turns it off again.
func NewXen(x *xendom.Xen, dom uint32) (*Xen, error) {
	r, err := x.EnablePaging(dom)
	if err != nil {
		return nil, fmt.Errorf("enable paging on domain %d: %w", dom, err)
	}
	return &Xen{x: x, dom: dom, ring: r}, nil
}

// Close disables paging (every gfn the bench paged out is in again).
func (t *Xen) Close() error { return t.ring.Close() }

// PageOutLibxc implements Target.
func (t *Xen) PageOutLibxc(gfns []uint64) error {
	for _, g := range gfns {
		if err := t.x.Handle.PagingNominate(t.dom, g); err != nil {
			return err
		}
		if err := t.x.Handle.PagingEvict(t.dom, g); err != nil {
			return err
		}
	}
	return nil
}

// LoadLibxc implements Target.
func (t *Xen) LoadLibxc(gfns []uint64, data []byte) error {
	for i, g := range gfns {
		if err := t.x.Handle.PagingLoad(t.dom, g, data[i*PageSize:(i+1)*PageSize]); err != nil {
			return err
		}
	}
	return nil
}

func (t *Xen) mode(batched bool) { t.x.SetPerGFN(!batched) }

func whole(done, n int, err error) error {
	if err == nil && done != n {
		err = fmt.Errorf("%d of %d gfns done", done, n)
	}
	return err
}

// PageOut implements Target.
func (t *Xen) PageOut(gfns []uint64, batched bool) error {
	t.mode(batched)
	done, err := t.x.PageOut(t.dom, gfns)
	return whole(done, len(gfns), err)
}

// Load implements Target.
func (t *Xen) Load(gfns []uint64, data []byte, batched bool) error {
	t.mode(batched)
	done, err := t.x.LoadPages(t.dom, gfns, data)
	return whole(done, len(gfns), err)
}

// HasBatched implements Target: it asks the hypervisor (PageOut of no
// gfns probes the ops).
func (t *Xen) HasBatched() bool {
	t.mode(true)
	if _, err := t.x.PageOut(t.dom, nil); err != nil {
		return false
	}
	return t.x.PagingOps() == "batched"
}

// Decrease implements Target.
func (t *Xen) Decrease(gfns []uint64) error { return t.x.DecreaseReservation(t.dom, gfns) }

// Populate implements Target.
func (t *Xen) Populate(gfns []uint64) error { return t.x.PopulatePhysmap(t.dom, gfns) }

// Write implements Target.
func (t *Xen) Write(gfns []uint64, data []byte) error {
	failed, err := t.x.WritePages(t.dom, gfns, data)
	if err == nil && len(failed) > 0 {
		err = fmt.Errorf("gfn %#x cannot be mapped", gfns[failed[0]])
	}
	return err
}

// Read implements Target.
func (t *Xen) Read(gfns []uint64, buf []byte) error {
	failed, err := t.x.ReadPages(t.dom, gfns, buf)
	if err == nil && len(failed) > 0 {
		err = fmt.Errorf("gfn %#x cannot be mapped", gfns[failed[0]])
	}
	return err
}
