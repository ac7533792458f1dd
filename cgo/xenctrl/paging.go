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

// pagingHint explains the usual reasons vm_event paging cannot be enabled.
func pagingHint(errno syscall.Errno) string {
	switch errno {
	case syscall.EOPNOTSUPP, syscall.ENOSYS:
		return "vm_event paging needs a hypervisor built with CONFIG_UNSUPPORTED=y and CONFIG_MEM_PAGING=y " +
			"(Debian's stock xen-hypervisor-4.17 has neither) and a PV dom0"
	case syscall.ENODEV:
		return "paging needs an HVM/PVH guest with HAP (hap=1 and a CPU with EPT/NPT)"
	case syscall.EXDEV:
		return "paging cannot be used with an IOMMU (passthrough) or populate-on-demand (memory < maxmem at boot)"
	case syscall.EBUSY:
		return "a pager is already attached to this domain"
	}
	return ""
}

func requestFromC(c *C.xp_vm_event) Request {
	return Request{
		Version:     uint32(c.version),
		Flags:       uint32(c.flags),
		Reason:      uint32(c.reason),
		VCPUID:      uint32(c.vcpu_id),
		AltP2MIdx:   uint16(c.altp2m_idx),
		GFN:         uint64(c.gfn),
		P2MType:     uint32(c.p2mt),
		PagingFlags: uint32(c.paging_flags),
	}
}

func (r Response) toC() C.xp_vm_event {
	return C.xp_vm_event{
		version:      VMEventInterfaceVersion,
		flags:        C.uint32_t(r.Flags),
		reason:       C.uint32_t(r.Reason),
		vcpu_id:      C.uint32_t(r.VCPUID),
		altp2m_idx:   C.uint16_t(r.AltP2MIdx),
		gfn:          C.uint64_t(r.GFN),
		p2mt:         C.uint32_t(r.P2MType),
		paging_flags: C.uint32_t(r.PagingFlags),
	}
}

// PagingRing is the back end of a domain's vm_event paging ring plus the
// event channel Xen signals it on. One goroutine owns it.
type PagingRing struct {
	h   *Handle
	dom uint32
	r   *C.xp_ring
}

// EnablePaging turns on vm_event paging for dom (xc_vm_event_enable with
// HVM_PARAM_PAGING_RING_PFN, which maps the ring page and enables the
// ring), binds the event channel and initialises the back ring. Close
// undoes all of it.
func (h *Handle) EnablePaging(dom uint32) (*PagingRing, error) {
	if err := h.alive(); err != nil {
		return nil, err
	}
	var step C.int
	r, err := C.xp_paging_ring_open(h.xch, C.uint32_t(dom), &step)
	if r == nil {
		op := map[C.int]string{1: "xc_vm_event_enable(PAGING)", 2: "xenevtchn_open", 3: "xenevtchn_bind_interdomain", 4: "calloc"}[step]
		e := &Error{Op: op, Dom: dom, HasDom: true, Errno: errnoOf(-1, err)}
		if step == 1 {
			e.Hint = pagingHint(e.Errno)
		}
		h.logf("%v", e)
		return nil, e
	}
	h.logf("paging enabled on dom %d: ring mapped, remote port %d, local port %d", dom, r.remote_port, r.local_port)
	return &PagingRing{h: h, dom: dom, r: r}, nil
}

// RingState is a snapshot of the ring's indexes. Xen produces requests
// (ReqProd) and consumes responses: after it consumed response n it sets
// RspEvent to n+1, so RspEvent lagging RspProd+1 means responses sit
// unread. ReqCons and RspProdPvt are our back end's private indexes.

// State reads the ring's indexes (diagnostics: are requests produced, are
// our responses consumed?).
func (p *PagingRing) State() RingState {
	var c C.xp_ring_state
	C.xp_ring_get_state(p.r, &c)
	return RingState{ReqProd: uint32(c.req_prod), ReqEvent: uint32(c.req_event), RspProd: uint32(c.rsp_prod),
		RspEvent: uint32(c.rsp_event), ReqCons: uint32(c.req_cons), RspProdPvt: uint32(c.rsp_prod_pvt)}
}

// ResponseVersions reads the version field of the last n responses we put
// on the ring, newest first, straight from the shared page: evidence when
// Xen reports "vm_event interface version mismatch" although every
// response was written with VMEventInterfaceVersion.
func (p *PagingRing) ResponseVersions(n int) []uint32 {
	if n <= 0 {
		return nil
	}
	out := make([]uint32, n)
	got := C.xp_ring_response_versions(p.r, (*C.uint32_t)(unsafe.Pointer(&out[0])), C.int(n))
	return out[:int(got)]
}

// LocalPort is our end of the event channel.
func (p *PagingRing) LocalPort() int { return int(p.r.local_port) }

// RemotePort is Xen's end of the event channel.
func (p *PagingRing) RemotePort() uint32 { return uint32(p.r.remote_port) }

// HasRequest reports whether a request is waiting on the ring.
func (p *PagingRing) HasRequest() bool { return C.xp_ring_has_request(p.r) != 0 }

// GetRequest takes the next request off the ring; ok is false if there is
// none. A request whose version is not VMEventInterfaceVersion is still
// returned (it must be answered) together with an error.
func (p *PagingRing) GetRequest() (req Request, ok bool, err error) {
	var c C.xp_vm_event
	if C.xp_ring_get_request(p.r, &c) == 0 {
		return Request{}, false, nil
	}
	req = requestFromC(&c)
	p.h.logf("vm_event request dom %d: version %d flags %#x reason %d vcpu %d gfn %#x paging_flags %#x",
		p.dom, req.Version, req.Flags, req.Reason, req.VCPUID, req.GFN, req.PagingFlags)
	if req.Version != VMEventInterfaceVersion {
		err = &Error{Op: "vm_event ring", Dom: p.dom, HasDom: true, Errno: syscall.EPROTO,
			Detail: fmt.Sprintf("request version %d, this build speaks %d", req.Version, VMEventInterfaceVersion),
			Hint:   "rebuild xl-postcopy against the running hypervisor's headers"}
	}
	return req, true, err
}

// PutResponse puts rsp on the ring with version VMEventInterfaceVersion.
// Call Notify afterwards (once for a batch). It fails with ENOSPC if there
// is no consumed request left to answer, and with EIO if the slot does not
// read back as written (the response is then not published).
func (p *PagingRing) PutResponse(rsp Response) error {
	c := rsp.toC()
	rc, err := C.xp_ring_put_response(p.r, &c)
	return p.h.result("vm_event put_response", p.dom, fmt.Sprintf("vcpu %d gfn %#x flags %#x", rsp.VCPUID, rsp.GFN, rsp.Flags), int64(rc), err)
}

// Notify signals Xen that responses are on the ring.
func (p *PagingRing) Notify() error {
	rc, err := C.xp_ring_notify(p.r)
	return p.h.result("xenevtchn_notify", p.dom, fmt.Sprintf("port %d", p.r.local_port), int64(rc), err)
}

// Resume asks Xen to process responses now (XEN_VM_EVENT_RESUME), the
// domctl twin of Notify.
func (p *PagingRing) Resume() error {
	rc, err := C.xc_mem_paging_resume(p.h.xch, C.uint32_t(p.dom))
	return p.h.result("xc_mem_paging_resume", p.dom, "", int64(rc), err)
}

// FD is the event channel's file descriptor, for callers that poll it
// together with other descriptors (then call Wait(0) when it is readable).
func (p *PagingRing) FD() int {
	if p.r.xce == nil {
		return -1
	}
	return int(C.xenevtchn_fd(p.r.xce))
}

// Wait blocks until Xen signals the event channel or timeout passes; it
// reports whether an event arrived (and re-arms the channel). Requests may
// be on the ring even without an event: always drain with GetRequest.
func (p *PagingRing) Wait(timeout time.Duration) (bool, error) {
	ms := int(timeout / time.Millisecond)
	if timeout > 0 && ms == 0 {
		ms = 1
	}
	rc, err := C.xp_ring_wait(p.r, C.int(ms))
	if rc < 0 {
		return false, p.h.result("xenevtchn_pending/poll", p.dom, "", int64(rc), err)
	}
	return rc == 1, nil
}

// Close unbinds the event channel, unmaps the ring and disables paging on
// the domain (xc_mem_paging_disable). Pages still paged out stay so; page
// them in first.
func (p *PagingRing) Close() error {
	if p.r == nil {
		return nil
	}
	var err error
	foreign := p.r.page_is_foreign != 0
	if foreign && p.h.xch != nil {
		rc, cerr := C.xc_mem_paging_disable(p.h.xch, C.uint32_t(p.dom))
		err = p.h.result("xc_mem_paging_disable", p.dom, "", int64(rc), cerr)
	}
	var xch *C.xc_interface
	if foreign {
		xch = p.h.xch
	}
	C.xp_ring_close(xch, p.r)
	p.r = nil
	return err
}

// PagingNominate marks gfn as a candidate for eviction.
func (h *Handle) PagingNominate(dom uint32, gfn uint64) error {
	if err := h.alive(); err != nil {
		return err
	}
	rc, err := C.xc_mem_paging_nominate(h.xch, C.uint32_t(dom), C.uint64_t(gfn))
	return h.result("xc_mem_paging_nominate", dom, fmt.Sprintf("gfn %#x", gfn), int64(rc), err)
}

// PagingEvict evicts a nominated gfn: the guest's next touch of it raises
// a paging request.
func (h *Handle) PagingEvict(dom uint32, gfn uint64) error {
	if err := h.alive(); err != nil {
		return err
	}
	rc, err := C.xc_mem_paging_evict(h.xch, C.uint32_t(dom), C.uint64_t(gfn))
	return h.result("xc_mem_paging_evict", dom, fmt.Sprintf("gfn %#x", gfn), int64(rc), err)
}

// PagingPrep allocates a page for a paged-out gfn (contents to be written
// through a foreign mapping afterwards).
func (h *Handle) PagingPrep(dom uint32, gfn uint64) error {
	if err := h.alive(); err != nil {
		return err
	}
	rc, err := C.xc_mem_paging_prep(h.xch, C.uint32_t(dom), C.uint64_t(gfn))
	return h.result("xc_mem_paging_prep", dom, fmt.Sprintf("gfn %#x", gfn), int64(rc), err)
}

// PagingLoad allocates a page for a paged-out gfn and fills it from page
// (PageSize bytes) in one step; Xen makes it guest-accessible at once.
func (h *Handle) PagingLoad(dom uint32, gfn uint64, page []byte) error {
	if err := h.alive(); err != nil {
		return err
	}
	if len(page) != PageSize {
		return &Error{Op: "xc_mem_paging_load", Dom: dom, HasDom: true, Errno: syscall.EINVAL,
			Detail: fmt.Sprintf("gfn %#x: buffer is %d bytes, want %d", gfn, len(page), PageSize)}
	}
	rc, err := C.xc_mem_paging_load(h.xch, C.uint32_t(dom), C.uint64_t(gfn), unsafe.Pointer(&page[0]))
	return h.result("xc_mem_paging_load", dom, fmt.Sprintf("gfn %#x", gfn), int64(rc), err)
}
