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
