// Package xenctrl is the project's only binding to the Xen 4.17 tool
// libraries (libxenctrl, libxenforeignmemory, libxenevtchn, libxenstore).
// C types never leave it: every call takes and returns Go types, and every
// failure is an *Error that names the libxc call and the domain and wraps
// the errno as a syscall.Errno, so errors.Is(err, syscall.EPERM) works.
//
// The package builds and links wherever libxen-dev is installed, but only
// works inside a Xen control domain (dom0): Open fails elsewhere with an
// error that says so (errors.Is(err, ErrNotDom0)).
//
// A Handle is safe for concurrent use by several goroutines (libxenctrl
// handles are re-entrant unless opened NON_REENTRANT, which we never do),
// except that Close must not race with other calls. Mappings, dirty
// bitmaps and paging rings are owned by one goroutine at a time.
package xenctrl

// This file builds without cgo (CGO_ENABLED=0, no libxen-dev): the types
// and constants of the Xen ABI that the pure-Go packages use, so that
// xen/xendom and its tests build anywhere. The values are spelled out;
// abicheck.go compares them with the C headers at compile time, so a build
// with libxen-dev fails if they ever drift. Everything that calls Xen
// (Handle, PagingRing, PagingBatch, Mapping, DirtyBitmap) needs cgo.

import (
	"errors"
	"fmt"
	"math/bits"
	"syscall"
	"time"
)

// PrivcmdPath is the device through which dom0 issues hypercalls; its
// absence is how we know we are not in a Xen control domain.
const PrivcmdPath = "/dev/xen/privcmd"

// PageSize is the Xen page size on x86.
const PageSize = 4096

// ErrNotDom0 is matched (errors.Is) by the error Open returns when the
// process does not run in a Xen dom0.
var ErrNotDom0 = errors.New("not running in a Xen dom0")

// ErrClosed is returned by calls on a closed Handle.
var ErrClosed = errors.New("xenctrl: handle is closed")

// notDom0Error is Open's error when the privcmd device is missing.
type notDom0Error struct{ path string }

func (e *notDom0Error) Error() string {
	return fmt.Sprintf("not running in a Xen dom0 (%s missing): run xl-postcopy as root in the "+
		"control domain of a Xen host; if this is dom0, load the driver (modprobe xen-privcmd) "+
		"and mount xenfs (mount -t xenfs xenfs /proc/xen)", e.path)
}

func (e *notDom0Error) Is(target error) bool { return target == ErrNotDom0 }

// Error is a failed libxc/libxenforeignmemory/libxenevtchn call.
type Error struct {
	Op     string        // the C call, e.g. "xc_domain_pause"
	Dom    uint32        // domain id the call was about
	HasDom bool          // false for calls that are not about one domain
	Detail string        // extra context, e.g. "pfn 0x1234"
	Errno  syscall.Errno // errno reported by the call
	Hint   string        // what an administrator can do about it, if known
}

func (e *Error) Error() string {
	s := e.Op
	switch {
	case e.HasDom && e.Detail != "":
		s += fmt.Sprintf("(dom %d, %s)", e.Dom, e.Detail)
	case e.HasDom:
		s += fmt.Sprintf("(dom %d)", e.Dom)
	case e.Detail != "":
		s += "(" + e.Detail + ")"
	}
	s += ": " + e.Errno.Error()
	if e.Hint != "" {
		s += " (" + e.Hint + ")"
	}
	return s
}

// Unwrap makes errors.Is(err, syscall.EXXX) work.
func (e *Error) Unwrap() error { return e.Errno }

// errnoOf turns a failed call's return value and cgo errno into an Errno.
// libxc mostly returns -1 with errno set, a few calls return -errno, and a
// call can fail without setting errno at all (then EIO).
func errnoOf(rc int64, err error) syscall.Errno {
	var en syscall.Errno
	if errors.As(err, &en) && en != 0 {
		return en
	}
	if rc < -1 && rc > -4096 {
		return syscall.Errno(-rc)
	}
	return syscall.EIO
}

// DomainInfo describes one domain (from XEN_DOMCTL_getdomaininfo).
type DomainInfo struct {
	ID             uint32
	Dying          bool
	Crashed        bool // shut down with reason "crash"
	Shutdown       bool
	ShutdownReason uint32 // SHUTDOWN_* code, meaningful if Shutdown
	Paused         bool
	Blocked        bool
	Running        bool
	HVM            bool // HVM or PVH container
	PVH            bool // HVM container without emulated PIC (PVH)
	HAP            bool // hardware-assisted paging (EPT/NPT)
	Debugged       bool
	XenstoreDomain bool

	TotPages         uint64 // pages currently allocated
	MaxPages         uint64 // allocation limit
	OutstandingPages uint64
	SharedPages      uint64
	PagedPages       uint64 // pages paged out by a vm_event pager
	SharedInfoFrame  uint64 // GMFN of the shared_info page
	CPUTime          time.Duration
	OnlineVCPUs      uint32
	MaxVCPUID        uint32
	CPUPool          uint32
	EmulationFlags   uint32 // XEN_X86_EMU_*
	GPAddrBits       uint8
	Handle           [16]byte // the domain's UUID
}

// Kind is "pv", "pvh" or "hvm".
func (d DomainInfo) Kind() string {
	switch {
	case !d.HVM:
		return "pv"
	case d.PVH:
		return "pvh"
	}
	return "hvm"
}

// PageTableRoot is where a vCPU's page-table walk starts.
type PageTableRoot struct {
	CR3     uint64 // the register as Xen reports it
	Frame   uint64 // CR3 decoded to a frame number
	Machine bool   // Frame is a machine frame (PV); else a guest pfn (HVM/PVH)
}

// HVM parameters used by the project (xen/hvm/params.h).
const (
	HVMParamStorePFN      = 1
	HVMParamConsolePFN    = 17
	HVMParamPagingRingPFN = 27
)

// PageType is the type Xen reports for a frame (XEN_DOMCTL_PFINFO_*): the
// top four bits of a 32-bit value.
type PageType uint32

// Page types.
const (
	PageNormal   PageType = 0
	PageL1       PageType = 0x1 << 28
	PageL2       PageType = 0x2 << 28
	PageL3       PageType = 0x3 << 28
	PageL4       PageType = 0x4 << 28
	PagePinned   PageType = 0x8 << 28 // flag, ORed with L1..L4
	PageInvalid  PageType = 0xf << 28 // not in the physmap
	PageXAlloc   PageType = 0xe << 28
	PageBroken   PageType = 0xd << 28
	pageMask     PageType = 0xf << 28
	pageTypeMask PageType = 0x7 << 28
)

// IsPageTable reports whether t is an L1..L4 page-table page (PV only:
// HVM page tables are ordinary guest pages to Xen).
func (t PageType) IsPageTable() bool {
	// XTAB, XALLOC and BROKEN have type bits 7, 6 and 5, outside L1..L4.
	k := t & pageTypeMask
	return k >= PageL1 && k <= PageL4
}

// vm_event constants from xen/vm_event.h.
const (
	// VMEventInterfaceVersion must be in every response, or Xen 4.17
	// drops it ("vm_event interface version mismatch") and the vCPU that
	// faulted never resumes.
	VMEventInterfaceVersion = 7
	// FlagVCPUPaused: the vCPU waits for the response; copy it back so Xen
	// unpauses the vCPU.
	FlagVCPUPaused = 1 << 0
	// FlagForeign: the request came from a foreign mapping, not a vCPU.
	FlagForeign = 1 << 1
	// ReasonMemPaging is the reason of paging requests.
	ReasonMemPaging = 3
	// PagingDropPage: the guest dropped a paged-out page (ballooned it);
	// nothing is to be loaded.
	PagingDropPage = 1 << 0
	// PagingEvictFail: an eviction raced with a guest access.
	PagingEvictFail = 1 << 1
)

// Request is one vm_event request read from the paging ring.
type Request struct {
	Version     uint32 // VMEventInterfaceVersion for a matching hypervisor
	Flags       uint32 // FlagVCPUPaused, FlagForeign, ...
	Reason      uint32 // ReasonMemPaging for the paging ring
	VCPUID      uint32
	AltP2MIdx   uint16
	GFN         uint64 // paging requests only
	P2MType     uint32 // paging requests only
	PagingFlags uint32 // PagingDropPage, PagingEvictFail
}

// Response answers a Request. PutResponse always sends version
// VMEventInterfaceVersion.
type Response struct {
	Flags       uint32
	Reason      uint32
	VCPUID      uint32
	AltP2MIdx   uint16
	GFN         uint64
	P2MType     uint32
	PagingFlags uint32
}

// ResponseFor is the response that resumes req, built as a pager should:
// the vCPU, reason, gfn and altp2m view are echoed, and the request flags
// (above all FlagVCPUPaused, which makes Xen unpause the vCPU) and paging
// flags (PagingDropPage: nothing to restore) are copied.
func ResponseFor(req Request) Response {
	return Response{
		Flags:       req.Flags,
		Reason:      req.Reason,
		VCPUID:      req.VCPUID,
		AltP2MIdx:   req.AltP2MIdx,
		GFN:         req.GFN,
		P2MType:     req.P2MType,
		PagingFlags: req.PagingFlags,
	}
}

type RingState struct {
	ReqProd, ReqEvent, RspProd, RspEvent uint32
	ReqCons, RspProdPvt                  uint32
}

func (s RingState) String() string {
	return fmt.Sprintf("req_prod=%d req_cons=%d req_event=%d rsp_prod=%d rsp_event=%d",
		s.ReqProd, s.ReqCons, s.ReqEvent, s.RspProd, s.RspEvent)
}

// Shutdown reasons (SHUTDOWN_* of xen/sched.h), as carried by
// DomainInfo.ShutdownReason and taken by ShutdownDomain.
const (
	ShutdownPoweroff uint32 = 0 // 0: exited normally
	ShutdownReboot   uint32 = 1 // 1: restart wanted
	ShutdownSuspend  uint32 = 2 // 2: suspended, state may be saved
	ShutdownCrash    uint32 = 3 // 3: the guest crashed
	shutdownMax      uint32 = 5 // highest reason Xen accepts
)

// TSC modes of TSCInfo.Mode. Xen keeps these in a private header
// (asm-x86/time.h), so they are spelled out here; the values are ABI, part
// of the migration stream.
const (
	TSCModeDefault       uint32 = 0 // native rdtsc unless the TSC is unreliable across hosts
	TSCModeAlwaysEmulate uint32 = 1 // rdtsc always traps and is emulated
	TSCModeNeverEmulate  uint32 = 2 // native rdtsc even if it may jump
)

// TSCInfo is a domain's time-stamp-counter state, which a migration copies
// from source to destination so that the guest's TSC neither jumps nor
// changes frequency (XEN_DOMCTL_gettscinfo / settscinfo).
type TSCInfo struct {
	Mode        uint32 // TSCMode*
	ElapsedNsec uint64 // guest time elapsed, the TSC offset base
	GTSCkHz     uint32 // guest TSC frequency in kHz
	Incarnation uint32 // bumped on each migration/restore; guests may watch it
}

// MaxPagingBatch is the most gfns one PagingBatch call hands to C at once;
// longer lists are split.
const MaxPagingBatch = 512

// PagingOps says how a PagingBatch reaches the hypervisor.
type PagingOps int

const (
	// OpsUnknown: not probed yet (Probe needs a domain with paging on).
	OpsUnknown PagingOps = iota
	// OpsPerGFN: one XENMEM_paging_op hypercall a gfn (stock Xen), from
	// hypercall buffers, one cgo call a batch.
	OpsPerGFN
	// OpsBatched: one hypercall a batch, the ops added by
	// scripts/xen-patches/0001-mem-paging-batch.patch.
	OpsBatched
)

func (o PagingOps) String() string {
	switch o {
	case OpsPerGFN:
		return "per-gfn"
	case OpsBatched:
		return "batched"
	}
	return "unknown"
}

// Prot is the protection of a foreign mapping.
type Prot int

// Mapping protections (mmap's PROT_*).
const (
	ProtRead      Prot = syscall.PROT_READ
	ProtReadWrite Prot = syscall.PROT_READ | syscall.PROT_WRITE
)

// mapErrno turns an entry of xenforeignmemory_map's err array, a negative
// errno (-ENOENT for a paged-out page), into an Errno. It was once
// converted to the unsigned Errno before the sign was looked at, which
// made -ENOENT a huge number that matched nothing.
func mapErrno(v int) syscall.Errno {
	if v < 0 {
		v = -v
	}
	return syscall.Errno(v)
}

// DirtyStats is what one PEEK or CLEAN reported.
type DirtyStats struct {
	Pages      uint64 // pfns covered by the returned bitmap
	FaultCount uint32 // shadow faults since the last CLEAN
	DirtyCount uint32 // pages dirtied since the last CLEAN
}

// AppendSetBits appends to dst, in ascending order, the index of every set
// bit of bitmap below limit, and returns the extended slice.
func AppendSetBits(dst []uint64, bitmap []uint64, limit uint64) []uint64 {
	for w, word := range bitmap {
		base := uint64(w) * 64
		if base >= limit {
			break
		}
		for word != 0 {
			bit := uint64(bits.TrailingZeros64(word))
			if base+bit >= limit {
				break
			}
			dst = append(dst, base+bit)
			word &= word - 1
		}
	}
	return dst
}

// Layout is a set of sizes and offsets of Xen ABI structures as compiled
// into this binary, for checks against the documented ABI.
type Layout struct {
	VMEventRequestSize      uint64
	VMEventUnionOffset      uint64
	VMEventDataOffset       uint64
	VMEventRingEntries      uint64 // requests per one-page ring
	VMEventInterfaceVersion uint64
	VCPUContextSize         uint64
	XenPFNSize              uint64
	DomainInfoSize          uint64
	HVMCPUSaveCode          uint64
	HVMCPUSaveLength        uint64
	HVMCPUCR3Offset         uint64
	// HVMCPUOffsets are the offsets of rsp, rip, cr0, cr3, cr4, gs_base,
	// shadow_gs and msr_efer in the CPU save record, for parsers that read
	// the HVM context in pure Go (xen/xendom).
	HVMCPUOffsets   [8]uint64
	PagingRingParam uint64
}
