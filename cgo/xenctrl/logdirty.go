package xenctrl

/*
#include "helpers.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"syscall"
	"unsafe"
)

// logDirtyHint explains the usual reasons log-dirty cannot be enabled.
func logDirtyHint(errno syscall.Errno, hvm bool) string {
	switch errno {
	case syscall.EOPNOTSUPP, syscall.ENOSYS:
		if hvm {
			return "the hypervisor cannot track dirty pages of this HVM/PVH domain; it needs HAP or shadow paging"
		}
		return "PV log-dirty needs a hypervisor built with CONFIG_SHADOW_PAGING=y, which Debian's stock " +
			"xen-hypervisor-4.17 lacks; see docs for the rebuild"
	case syscall.EBUSY:
		return "another tool (a migration, or the device model's VRAM tracking) already uses log-dirty on this domain"
	case syscall.ENOMEM:
		return "not enough shadow/paging pool memory; raise shadow_memory in the domain config"
	}
	return ""
}

// EnableLogDirty turns on dirty-page tracking for dom: shadow log-dirty
// mode for PV, HAP log-dirty for HVM/PVH (both XEN_DOMCTL_SHADOW_OP_
// ENABLE_LOGDIRTY). If it is already on (e.g. for the device model's VRAM
// tracking) it is switched off and on again, as libxc's save code does.
func (h *Handle) EnableLogDirty(dom uint32) error {
	if err := h.alive(); err != nil {
		return err
	}
	enable := func() error {
		rc, err := C.xc_shadow_control(h.xch, C.uint32_t(dom), C.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY, nil, 0)
		return h.result("xc_shadow_control(ENABLE_LOGDIRTY)", dom, "", int64(rc), err)
	}
	err := enable()
	if err == nil {
		return nil
	}
	if off := h.DisableLogDirty(dom); off == nil {
		if err = enable(); err == nil {
			return nil
		}
	}
	var xe *Error
	if errors.As(err, &xe) {
		hvm := false
		if info, ierr := h.Domain(dom); ierr == nil {
			hvm = info.HVM
		}
		xe.Hint = logDirtyHint(xe.Errno, hvm)
	}
	return err
}

// DisableLogDirty turns dirty-page tracking off (XEN_DOMCTL_SHADOW_OP_OFF).
func (h *Handle) DisableLogDirty(dom uint32) error {
	if err := h.alive(); err != nil {
		return err
	}
	rc, err := C.xc_shadow_control(h.xch, C.uint32_t(dom), C.XEN_DOMCTL_SHADOW_OP_OFF, nil, 0)
	return h.result("xc_shadow_control(OFF)", dom, "", int64(rc), err)
}

// DirtyBitmap reads dom's log-dirty bitmap through one hypercall buffer that
// lives as long as the DirtyBitmap, so rounds do not reallocate it. Bit p
// of word p/64 is pfn p.
type DirtyBitmap struct {
	h     *Handle
	dom   uint32
	pages uint64
	d     *C.xp_dirty
}

// NewDirtyBitmap prepares PEEK/CLEAN over pfns [0, pages).
func (h *Handle) NewDirtyBitmap(dom uint32, pages uint64) (*DirtyBitmap, error) {
	if err := h.alive(); err != nil {
		return nil, err
	}
	if pages == 0 {
		return nil, &Error{Op: "xc_hypercall_buffer_alloc_pages", Dom: dom, HasDom: true, Errno: syscall.EINVAL, Detail: "0 pages"}
	}
	d, err := C.xp_dirty_alloc(h.xch, C.ulong(pages))
	if d == nil {
		e := &Error{Op: "xc_hypercall_buffer_alloc_pages", Dom: dom, HasDom: true,
			Detail: fmt.Sprintf("bitmap for %d pages", pages), Errno: errnoOf(-1, err)}
		h.logf("%v", e)
		return nil, e
	}
	return &DirtyBitmap{h: h, dom: dom, pages: pages, d: d}, nil
}

// Words is the length of the []uint64 that Peek and Clean fill.
func (b *DirtyBitmap) Words() int { return int((b.pages + 63) / 64) }

// Pages is the number of pfns the bitmap covers.
func (b *DirtyBitmap) Pages() uint64 { return b.pages }

// Peek copies the dirty bitmap into dst without clearing it.
func (b *DirtyBitmap) Peek(dst []uint64) (DirtyStats, error) {
	return b.op(C.XEN_DOMCTL_SHADOW_OP_PEEK, "PEEK", dst)
}

// Clean copies the dirty bitmap into dst and clears it in the hypervisor,
// starting a new round.
func (b *DirtyBitmap) Clean(dst []uint64) (DirtyStats, error) {
	return b.op(C.XEN_DOMCTL_SHADOW_OP_CLEAN, "CLEAN", dst)
}

func (b *DirtyBitmap) op(op C.uint, name string, dst []uint64) (DirtyStats, error) {
	if b.d == nil {
		return DirtyStats{}, ErrClosed
	}
	if err := b.h.alive(); err != nil {
		return DirtyStats{}, err
	}
	if len(dst) < b.Words() {
		return DirtyStats{}, &Error{Op: "xc_logdirty_control(" + name + ")", Dom: b.dom, HasDom: true, Errno: syscall.EINVAL,
			Detail: fmt.Sprintf("destination holds %d words, need %d", len(dst), b.Words())}
	}
	var faults, dirty C.uint32_t
	rc, err := C.xp_dirty_op(b.h.xch, C.uint32_t(b.dom), b.d, op,
		unsafe.Pointer(&dst[0]), C.size_t(b.Words()*8), &faults, &dirty)
	if rc < 0 {
		return DirtyStats{}, b.h.result("xc_logdirty_control("+name+")", b.dom, "", int64(rc), err)
	}
	st := DirtyStats{Pages: uint64(rc), FaultCount: uint32(faults), DirtyCount: uint32(dirty)}
	b.h.logf("xc_logdirty_control(%s)(dom %d) = %d pages, dirty_count %d, fault_count %d",
		name, b.dom, st.Pages, st.DirtyCount, st.FaultCount)
	return st, nil
}

// Close frees the hypercall buffer. It is safe to call twice.
func (b *DirtyBitmap) Close() {
	if b.d != nil && b.h.xch != nil {
		C.xp_dirty_free(b.h.xch, b.d)
	}
	b.d = nil
}
