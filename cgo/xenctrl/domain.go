package xenctrl

/*
#include "helpers.h"
*/
import "C"

import (
	"fmt"
	"syscall"
	"time"
	"unsafe"
)

// Domain flag bits (XEN_DOMINF_*) and x86 emulation flags, from the headers.
const (
	dominfDying    = C.XEN_DOMINF_dying
	dominfHVM      = C.XEN_DOMINF_hvm_guest
	dominfShutdown = C.XEN_DOMINF_shutdown
	dominfPaused   = C.XEN_DOMINF_paused
	dominfBlocked  = C.XEN_DOMINF_blocked
	dominfRunning  = C.XEN_DOMINF_running
	dominfDebugged = C.XEN_DOMINF_debugged
	dominfXSDomain = C.XEN_DOMINF_xs_domain
	dominfHAP      = C.XEN_DOMINF_hap
	emuPIC         = C.XEN_X86_EMU_PIC
	shutdownCrash  = C.SHUTDOWN_crash
)

// domInfoFromC converts the flattened C struct.
func domInfoFromC(c *C.xp_dominfo) DomainInfo {
	f := uint32(c.flags)
	d := DomainInfo{
		ID:               uint32(c.domid),
		Dying:            f&dominfDying != 0,
		Shutdown:         f&dominfShutdown != 0,
		ShutdownReason:   uint32(c.shutdown_reason),
		Paused:           f&dominfPaused != 0,
		Blocked:          f&dominfBlocked != 0,
		Running:          f&dominfRunning != 0,
		HVM:              f&dominfHVM != 0,
		HAP:              f&dominfHAP != 0,
		Debugged:         f&dominfDebugged != 0,
		XenstoreDomain:   f&dominfXSDomain != 0,
		TotPages:         uint64(c.tot_pages),
		MaxPages:         uint64(c.max_pages),
		OutstandingPages: uint64(c.outstanding_pages),
		SharedPages:      uint64(c.shr_pages),
		PagedPages:       uint64(c.paged_pages),
		SharedInfoFrame:  uint64(c.shared_info_frame),
		CPUTime:          time.Duration(c.cpu_time),
		OnlineVCPUs:      uint32(c.nr_online_vcpus),
		MaxVCPUID:        uint32(c.max_vcpu_id),
		CPUPool:          uint32(c.cpupool),
		EmulationFlags:   uint32(c.emulation_flags),
		GPAddrBits:       uint8(c.gpaddr_bits),
	}
	d.Crashed = d.Shutdown && d.ShutdownReason == shutdownCrash
	d.PVH = d.HVM && d.EmulationFlags&emuPIC == 0
	for i := range d.Handle {
		d.Handle[i] = byte(c.handle[i])
	}
	return d
}

// Domains lists every domain.
func (h *Handle) Domains() ([]DomainInfo, error) {
	if err := h.alive(); err != nil {
		return nil, err
	}
	const batch = 64
	var out []DomainInfo
	buf := make([]C.xp_dominfo, batch)
	first := uint32(0)
	for {
		rc, err := C.xp_domain_list(h.xch, C.uint32_t(first), batch, &buf[0])
		if e := h.result("xc_domain_getinfolist", first, "list", int64(rc), err); e != nil {
			return nil, e
		}
		for i := 0; i < int(rc); i++ {
			out = append(out, domInfoFromC(&buf[i]))
		}
		if int(rc) < batch {
			return out, nil
		}
		first = out[len(out)-1].ID + 1
	}
}

// Domain returns one domain's information; a missing domain is ESRCH.
func (h *Handle) Domain(dom uint32) (DomainInfo, error) {
	if err := h.alive(); err != nil {
		return DomainInfo{}, err
	}
	var c C.xp_dominfo
	rc, err := C.xp_domain_list(h.xch, C.uint32_t(dom), 1, &c)
	if e := h.result("xc_domain_getinfolist", dom, "", int64(rc), err); e != nil {
		return DomainInfo{}, e
	}
	// getinfolist returns the next domain at or after dom.
	if rc != 1 || uint32(c.domid) != dom {
		return DomainInfo{}, &Error{Op: "xc_domain_getinfolist", Dom: dom, HasDom: true,
			Errno: syscall.ESRCH, Hint: "no such domain; see `xl list`"}
	}
	return domInfoFromC(&c), nil
}

// Pause pauses every vCPU of dom (xc_domain_pause; pauses nest).
func (h *Handle) Pause(dom uint32) error {
	if err := h.alive(); err != nil {
		return err
	}
	rc, err := C.xc_domain_pause(h.xch, C.uint32_t(dom))
	return h.result("xc_domain_pause", dom, "", int64(rc), err)
}

// Unpause undoes one Pause.
func (h *Handle) Unpause(dom uint32) error {
	if err := h.alive(); err != nil {
		return err
	}
	rc, err := C.xc_domain_unpause(h.xch, C.uint32_t(dom))
	return h.result("xc_domain_unpause", dom, "", int64(rc), err)
}

// GuestWidth is the guest's word size in bytes (4 or 8).
func (h *Handle) GuestWidth(dom uint32) (int, error) {
	if err := h.alive(); err != nil {
		return 0, err
	}
	var w C.uint
	rc, err := C.xc_domain_get_guest_width(h.xch, C.uint32_t(dom), &w)
	if e := h.result("xc_domain_get_guest_width", dom, "", int64(rc), err); e != nil {
		return 0, e
	}
	return int(w), nil
}

// MaxGPFN is the highest guest pfn of dom's physmap, so pfns run over
// [0, MaxGPFN].
func (h *Handle) MaxGPFN(dom uint32) (uint64, error) {
	if err := h.alive(); err != nil {
		return 0, err
	}
	var g C.xen_pfn_t
	rc, err := C.xc_domain_maximum_gpfn(h.xch, C.uint32_t(dom), &g)
	if e := h.result("xc_domain_maximum_gpfn", dom, "", int64(rc), err); e != nil {
		return 0, e
	}
	return uint64(g), nil
}

// VCPUContextSize is the size of the opaque vCPU context
// (vcpu_guest_context_any_t).
func VCPUContextSize() int { return int(C.xp_vcpu_context_size()) }

// VCPUContext returns the vCPU's context as opaque bytes, to be given back
// to SetVCPUContext on a host of the same architecture.
func (h *Handle) VCPUContext(dom, vcpu uint32) ([]byte, error) {
	if err := h.alive(); err != nil {
		return nil, err
	}
	buf := make([]byte, VCPUContextSize())
	rc, err := C.xp_vcpu_getcontext(h.xch, C.uint32_t(dom), C.uint32_t(vcpu),
		unsafe.Pointer(&buf[0]), C.size_t(len(buf)))
	if e := h.result("xc_vcpu_getcontext", dom, fmt.Sprintf("vcpu %d", vcpu), int64(rc), err); e != nil {
		return nil, e
	}
	return buf, nil
}

// SetVCPUContext loads a context obtained from VCPUContext.
func (h *Handle) SetVCPUContext(dom, vcpu uint32, ctx []byte) error {
	if err := h.alive(); err != nil {
		return err
	}
	if len(ctx) != VCPUContextSize() {
		return &Error{Op: "xc_vcpu_setcontext", Dom: dom, HasDom: true, Errno: syscall.EINVAL,
			Detail: fmt.Sprintf("vcpu %d: context is %d bytes, want %d", vcpu, len(ctx), VCPUContextSize())}
	}
	rc, err := C.xp_vcpu_setcontext(h.xch, C.uint32_t(dom), C.uint32_t(vcpu),
		unsafe.Pointer(&ctx[0]), C.size_t(len(ctx)))
	return h.result("xc_vcpu_setcontext", dom, fmt.Sprintf("vcpu %d", vcpu), int64(rc), err)
}

// VCPUPageTableRoot reads CR3 of a vCPU: for HVM/PVH from the HVM CPU save
// record (a guest-physical address), for PV from the vCPU context (a
// machine frame; translate with the m2p before using it as a pfn).
func (h *Handle) VCPUPageTableRoot(dom, vcpu uint32) (PageTableRoot, error) {
	info, err := h.Domain(dom)
	if err != nil {
		return PageTableRoot{}, err
	}
	width := 8
	if !info.HVM {
		if width, err = h.GuestWidth(dom); err != nil {
			return PageTableRoot{}, err
		}
	}
	hvm := C.int(0)
	if info.HVM {
		hvm = 1
	}
	var cr3, frame C.uint64_t
	op := "xc_vcpu_getcontext"
	if info.HVM {
		op = "xc_domain_hvm_getcontext_partial(CPU)"
	}
	rc, cerr := C.xp_vcpu_cr3(h.xch, C.uint32_t(dom), C.uint32_t(vcpu), hvm, C.uint(width), &cr3, &frame)
	if e := h.result(op, dom, fmt.Sprintf("vcpu %d cr3", vcpu), int64(rc), cerr); e != nil {
		return PageTableRoot{}, e
	}
	return PageTableRoot{CR3: uint64(cr3), Frame: uint64(frame), Machine: !info.HVM}, nil
}

// HVMContext returns the whole HVM save context (HVM and PVH domains).
func (h *Handle) HVMContext(dom uint32) ([]byte, error) {
	if err := h.alive(); err != nil {
		return nil, err
	}
	size, err := C.xc_domain_hvm_getcontext(h.xch, C.uint32_t(dom), nil, 0)
	if e := h.result("xc_domain_hvm_getcontext", dom, "size", int64(size), err); e != nil {
		return nil, e
	}
	if size == 0 {
		return nil, nil
	}
	buf := make([]byte, int(size))
	n, err := C.xc_domain_hvm_getcontext(h.xch, C.uint32_t(dom), (*C.uint8_t)(unsafe.Pointer(&buf[0])), C.uint32_t(len(buf)))
	if e := h.result("xc_domain_hvm_getcontext", dom, "", int64(n), err); e != nil {
		return nil, e
	}
	if int(n) < len(buf) {
		buf = buf[:n]
	}
	return buf, nil
}

// SetHVMContext loads a context obtained from HVMContext.
func (h *Handle) SetHVMContext(dom uint32, ctx []byte) error {
	if err := h.alive(); err != nil {
		return err
	}
	if len(ctx) == 0 {
		return &Error{Op: "xc_domain_hvm_setcontext", Dom: dom, HasDom: true, Errno: syscall.EINVAL, Detail: "empty context"}
	}
	rc, err := C.xc_domain_hvm_setcontext(h.xch, C.uint32_t(dom), (*C.uint8_t)(unsafe.Pointer(&ctx[0])), C.uint32_t(len(ctx)))
	return h.result("xc_domain_hvm_setcontext", dom, "", int64(rc), err)
}

// HVMParam reads an HVM parameter.
func (h *Handle) HVMParam(dom uint32, param int) (uint64, error) {
	if err := h.alive(); err != nil {
		return 0, err
	}
	var v C.uint64_t
	rc, err := C.xc_hvm_param_get(h.xch, C.uint32_t(dom), C.uint32_t(param), &v)
	if e := h.result("xc_hvm_param_get", dom, fmt.Sprintf("param %d", param), int64(rc), err); e != nil {
		return 0, e
	}
	return uint64(v), nil
}

// SetHVMParam writes an HVM parameter.
func (h *Handle) SetHVMParam(dom uint32, param int, value uint64) error {
	if err := h.alive(); err != nil {
		return err
	}
	rc, err := C.xc_hvm_param_set(h.xch, C.uint32_t(dom), C.uint32_t(param), C.uint64_t(value))
	return h.result("xc_hvm_param_set", dom, fmt.Sprintf("param %d", param), int64(rc), err)
}

// pageTypeBatch is the most frames XEN_DOMCTL_getpageframeinfo3 takes.
const pageTypeBatch = 1024

// PageTypes returns the type of each frame (gfns for HVM, mfns for PV), in
// batches of 1024 through xc_get_pfn_type_batch.
func (h *Handle) PageTypes(dom uint32, frames []uint64) ([]PageType, error) {
	if err := h.alive(); err != nil {
		return nil, err
	}
	out := make([]PageType, 0, len(frames))
	arr := make([]C.xen_pfn_t, pageTypeBatch)
	for start := 0; start < len(frames); start += pageTypeBatch {
		end := min(start+pageTypeBatch, len(frames))
		n := end - start
		for i := 0; i < n; i++ {
			arr[i] = C.xen_pfn_t(frames[start+i])
		}
		rc, err := C.xc_get_pfn_type_batch(h.xch, C.uint32_t(dom), C.uint(n), &arr[0])
		if e := h.result("xc_get_pfn_type_batch", dom, fmt.Sprintf("%d frames from %#x", n, frames[start]), int64(rc), err); e != nil {
			return nil, e
		}
		for i := 0; i < n; i++ {
			out = append(out, PageType(uint64(arr[i]))&pageMask)
		}
	}
	return out, nil
}

// PopulatePhysmap gives dom fresh zeroed pages at the given pfns
// (xc_domain_populate_physmap_exact, order 0).
func (h *Handle) PopulatePhysmap(dom uint32, pfns []uint64) error {
	if err := h.alive(); err != nil {
		return err
	}
	if len(pfns) == 0 {
		return nil
	}
	arr := toPFNs(pfns)
	rc, err := C.xc_domain_populate_physmap_exact(h.xch, C.uint32_t(dom), C.ulong(len(arr)), 0, 0, &arr[0])
	return h.result("xc_domain_populate_physmap_exact", dom, pfnsDetail(pfns), int64(rc), err)
}

// DecreaseReservation takes the pages at pfns away from dom
// (xc_domain_decrease_reservation_exact, order 0).
func (h *Handle) DecreaseReservation(dom uint32, pfns []uint64) error {
	if err := h.alive(); err != nil {
		return err
	}
	if len(pfns) == 0 {
		return nil
	}
	arr := toPFNs(pfns)
	rc, err := C.xc_domain_decrease_reservation_exact(h.xch, C.uint32_t(dom), C.ulong(len(arr)), 0, &arr[0])
	return h.result("xc_domain_decrease_reservation_exact", dom, pfnsDetail(pfns), int64(rc), err)
}

func toPFNs(pfns []uint64) []C.xen_pfn_t {
	arr := make([]C.xen_pfn_t, len(pfns))
	for i, p := range pfns {
		arr[i] = C.xen_pfn_t(p)
	}
	return arr
}

func pfnsDetail(pfns []uint64) string {
	if len(pfns) == 1 {
		return fmt.Sprintf("pfn %#x", pfns[0])
	}
	return fmt.Sprintf("%d pfns from %#x", len(pfns), pfns[0])
}
