package xenctrl

/*
#include "helpers.h"
#include <xenguest.h>
*/
import "C"

import (
	"fmt"
	"syscall"
)

// ResumeDomain resumes dom after it shut down with ShutdownSuspend
// (xc_domain_resume). With fast, the resume is cooperative: the guest's
// SCHEDOP_shutdown(SHUTDOWN_suspend) hypercall returns 1, "suspend
// cancelled", and it carries on with its devices connected; libxc requires
// the domain to be suspended (else EINVAL) and writes vCPU 0's return
// register, so the domain must stay paused until this returns. Without
// fast the guest is told it woke in a new domain (return 0) and reconnects
// its PV devices; for PV guests libxc also resets the secondary vCPUs.
// Both end with XEN_DOMCTL_resumedomain, which lets the vCPUs run again.
func (h *Handle) ResumeDomain(dom uint32, fast bool) error {
	if err := h.alive(); err != nil {
		return err
	}
	f, detail := C.int(0), "slow"
	if fast {
		f, detail = 1, "fast"
	}
	rc, err := C.xc_domain_resume(h.xch, C.uint32_t(dom), f)
	return h.result("xc_domain_resume", dom, detail, int64(rc), err)
}

// ShutdownDomain shuts dom down for the given reason (xc_domain_shutdown),
// as if the guest had asked itself. A reason above Xen's range is refused
// here with EINVAL, so the mistake is ours, not the hypervisor's.
func (h *Handle) ShutdownDomain(dom uint32, reason uint32) error {
	detail := fmt.Sprintf("reason %d", reason)
	if reason > shutdownMax {
		return &Error{Op: "xc_domain_shutdown", Dom: dom, HasDom: true, Errno: syscall.EINVAL,
			Detail: detail + fmt.Sprintf(": not a SHUTDOWN_* code (max %d)", shutdownMax)}
	}
	if err := h.alive(); err != nil {
		return err
	}
	rc, err := C.xc_domain_shutdown(h.xch, C.uint32_t(dom), C.int(reason))
	return h.result("xc_domain_shutdown", dom, detail, int64(rc), err)
}

// TSCInfo reads dom's TSC state (xc_domain_get_tsc_info).
func (h *Handle) TSCInfo(dom uint32) (TSCInfo, error) {
	if err := h.alive(); err != nil {
		return TSCInfo{}, err
	}
	var mode, khz, inc C.uint32_t
	var elapsed C.uint64_t
	rc, err := C.xc_domain_get_tsc_info(h.xch, C.uint32_t(dom), &mode, &elapsed, &khz, &inc)
	if e := h.result("xc_domain_get_tsc_info", dom, "", int64(rc), err); e != nil {
		return TSCInfo{}, e
	}
	return TSCInfo{Mode: uint32(mode), ElapsedNsec: uint64(elapsed), GTSCkHz: uint32(khz), Incarnation: uint32(inc)}, nil
}

// SetTSCInfo loads TSC state read by TSCInfo, normally on the destination
// before the domain first runs (xc_domain_set_tsc_info).
func (h *Handle) SetTSCInfo(dom uint32, t TSCInfo) error {
	if err := h.alive(); err != nil {
		return err
	}
	rc, err := C.xc_domain_set_tsc_info(h.xch, C.uint32_t(dom), C.uint32_t(t.Mode),
		C.uint64_t(t.ElapsedNsec), C.uint32_t(t.GTSCkHz), C.uint32_t(t.Incarnation))
	return h.result("xc_domain_set_tsc_info", dom,
		fmt.Sprintf("mode %d, %d kHz, incarnation %d", t.Mode, t.GTSCkHz, t.Incarnation), int64(rc), err)
}
