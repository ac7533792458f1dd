package xenctrl

/*
#include <string.h>
#include "helpers.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"syscall"
	"unsafe"
)

// This file holds the parts of the C side that can be exercised without a
// hypervisor: layouts, struct conversions and the vm_event ring on a
// private page. Test files cannot import "C", so the tests call these
// unexported functions.

// ABILayout reports the compiled-in layout.
func ABILayout() Layout {
	var l C.xp_layout
	C.xp_get_layout(&l)
	return Layout{
		VMEventRequestSize:      uint64(l.vm_event_request_size),
		VMEventUnionOffset:      uint64(l.vm_event_u_offset),
		VMEventDataOffset:       uint64(l.vm_event_data_offset),
		VMEventRingEntries:      uint64(l.vm_event_ring_entries),
		VMEventInterfaceVersion: uint64(l.vm_event_interface_version),
		VCPUContextSize:         uint64(l.vcpu_context_size),
		XenPFNSize:              uint64(l.xen_pfn_size),
		DomainInfoSize:          uint64(l.dominfo_size),
		HVMCPUSaveCode:          uint64(l.hvm_cpu_save_code),
		HVMCPUSaveLength:        uint64(l.hvm_cpu_save_len),
		HVMCPUCR3Offset:         uint64(l.hvm_cpu_cr3_offset),
		PagingRingParam:         uint64(l.paging_ring_param),
		HVMCPUOffsets: [8]uint64{uint64(l.hvm_cpu_offsets[0]), uint64(l.hvm_cpu_offsets[1]), uint64(l.hvm_cpu_offsets[2]),
			uint64(l.hvm_cpu_offsets[3]), uint64(l.hvm_cpu_offsets[4]), uint64(l.hvm_cpu_offsets[5]),
			uint64(l.hvm_cpu_offsets[6]), uint64(l.hvm_cpu_offsets[7])},
	}
}

// encodeResponseWire returns the bytes PutResponse would place in a ring
// slot for rsp (a whole vm_event_response_t).
func encodeResponseWire(rsp Response) []byte {
	c := rsp.toC()
	var w C.vm_event_response_t
	C.xp_vm_event_encode(&c, &w)
	return C.GoBytes(unsafe.Pointer(&w), C.int(unsafe.Sizeof(w)))
}

// decodeRequestWire decodes a raw vm_event_request_t as GetRequest does.
func decodeRequestWire(raw []byte) (Request, error) {
	var w C.vm_event_request_t
	if len(raw) != int(unsafe.Sizeof(w)) {
		return Request{}, fmt.Errorf("request is %d bytes, want %d", len(raw), unsafe.Sizeof(w))
	}
	C.memcpy(unsafe.Pointer(&w), unsafe.Pointer(&raw[0]), C.size_t(len(raw)))
	var c C.xp_vm_event
	C.xp_vm_event_decode(&w, &c)
	return requestFromC(&c), nil
}

// domInfoThroughC fills an xc_domaininfo_t the way the hypervisor would and
// converts it with the same C and Go code Domains uses.
func domInfoThroughC(domid uint16, flags uint32, totPages, maxPages, sharedInfo uint64, vcpus uint32, emu uint32) DomainInfo {
	var in C.xc_domaininfo_t
	in.domain = C.domid_t(domid)
	in.flags = C.uint32_t(flags)
	in.tot_pages = C.uint64_aligned_t(totPages)
	in.max_pages = C.uint64_aligned_t(maxPages)
	in.shared_info_frame = C.uint64_aligned_t(sharedInfo)
	in.nr_online_vcpus = C.uint32_t(vcpus)
	in.max_vcpu_id = C.uint32_t(vcpus - 1)
	in.arch_config.emulation_flags = C.uint32_t(emu)
	for i := range in.handle {
		in.handle[i] = C.uint8_t(i + 1)
	}
	var out C.xp_dominfo
	C.xp_dominfo_from(&in, &out)
	return domInfoFromC(&out)
}

// Header values the domain tests build flags from.
const (
	testDominfHVM      = dominfHVM
	testDominfPaused   = dominfPaused
	testDominfShutdown = dominfShutdown
	testDominfHAP      = dominfHAP
	testDominfDying    = dominfDying
	testShutdownShift  = C.XEN_DOMINF_shutdownshift
	testEmuAll         = C.XEN_X86_EMU_ALL
	testEmuLAPIC       = C.XEN_X86_EMU_LAPIC
)

// localRing is a PagingRing on a private page plus a stand-in for Xen's
// front end, so the ring code runs without a hypervisor.
type localRing struct {
	*PagingRing
}

func newLocalRing() (*localRing, error) {
	r, err := C.xp_ring_local()
	if r == nil {
		return nil, fmt.Errorf("xp_ring_local: %w", errnoOf(-1, err))
	}
	return &localRing{&PagingRing{h: &Handle{}, dom: 0, r: r}}, nil
}

// pushRequest plays Xen: it puts a request on the ring (version as given).
func (l *localRing) pushRequest(req Request) error {
	c := C.xp_vm_event{
		version:      C.uint32_t(req.Version),
		flags:        C.uint32_t(req.Flags),
		reason:       C.uint32_t(req.Reason),
		vcpu_id:      C.uint32_t(req.VCPUID),
		altp2m_idx:   C.uint16_t(req.AltP2MIdx),
		gfn:          C.uint64_t(req.GFN),
		p2mt:         C.uint32_t(req.P2MType),
		paging_flags: C.uint32_t(req.PagingFlags),
	}
	rc, err := C.xp_ring_test_push_request(l.r, &c)
	if rc < 0 {
		return fmt.Errorf("push request: %w", errnoOf(-1, err))
	}
	return nil
}

// popResponse plays Xen: it takes a response off the ring.
func (l *localRing) popResponse() (Request, bool) {
	var c C.xp_vm_event
	if C.xp_ring_test_pop_response(l.r, &c) == 0 {
		return Request{}, false
	}
	return requestFromC(&c), true
}

// errIsENOSPC is used by tests to check the ring overflow guard.
func errIsENOSPC(err error) bool { return errors.Is(err, syscall.ENOSPC) }
