// Package engine migrates a domain between two hosts: pre-copy, post-copy
// and hybrid, with the page order of post-copy chosen by package prepage.
//
// The engine knows nothing of Xen or of processes: a domain is reached
// through two small interfaces, Source and Dest, implemented by the lab
// backend (a domain living in a process, faults via userfaultfd) and by the
// Xen backend (foreign mappings, log-dirty, vm_event paging). The wire
// format is package wire; the engine owns the protocol:
//
//	source                                   destination
//	DOMAIN_HEADER ------------------------->  create domain
//	                        <---------------  CREATED
//	PAGE_BATCH(precopy)* ------------------>  place (overwrite allowed)   [precopy, hybrid]
//	  pause
//	PAGE_BATCH(stop)* / DISCARD* ---------->  place / forget re-dirtied pages
//	CORE_STATE, SWITCHOVER ---------------->
//	                        <---------------  READY
//	GO (source gives the domain up) ------->  resume
//	                        <---------------  RESUMED
//	PAGE_BATCH(push)* (bulk)   FAULT_REQUEST <- (urgent)  demand faults
//	PAGE_BATCH(fault) (urgent) ------------>
//	DONE(checksums)* ---------------------->  wait for every page, verify
//	                        <---------------  STATS, ACK
//	  destroy source copy
//
// The destination returns CREDIT records for consumed bulk bytes; the
// source keeps at most a window of bulk bytes unconsumed, so that the
// queues between the two (socket buffers, the link's qdisc) stay short and a
// fault reply never waits behind seconds of push.
package engine

import (
	"errors"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// Info describes the domain being migrated.
type Info struct {
	Name     string
	NumPages uint64 // pfn range [0, NumPages)
	PageSize uint32
	VCPUs    uint32
	Backend  string // what the destination must be able to host, e.g. "lab"
	Config   []byte // backend-specific configuration, passed to the destination
	// Absent are the pfns (ascending) that hold no memory at the start: a
	// balloon driver gave them back. They are never read nor sent.
	Absent []uint64
}

// PageSetChanger is implemented by sources whose page set can change while
// the domain runs (a balloon driver gives pages back to the hypervisor or
// takes them again). PageSetChange is called once the domain is paused: it
// returns the pfns that hold no memory now but did at the start (dropped)
// and those that hold memory now but were absent (added).
type PageSetChanger interface {
	PageSetChange() (dropped, added []uint64, err error)
}

// PageSetter is implemented by destinations that can follow a change of
// the page set before the domain resumes: dropped pfns hold no memory any
// more (whatever was placed there is released), added pfns get memory and
// are placed before the resume.
type PageSetter interface {
	ChangePageSet(dropped, added []uint64) error
}

// ReadBacker is implemented by destinations that can read their own
// memory back, so that `verified` says what the destination holds, not
// what arrived. The backend tracks the resumed guest's writes from the
// moment its vCPUs run: ReadBack reads pfns into buf and returns those of
// them the guest has written by the time they were read (their content
// is the guest's now, not the source's).
type ReadBacker interface {
	ReadBack(pfns []uint64, buf []byte) (written []uint64, err error)
}

// Dropper is implemented by destinations whose resumed guest can give
// pages back to the hypervisor (a balloon driver) while they are still
// arriving. Such a page is no longer the guest's memory: it is neither
// waited for nor verified. Dropped returns them all, ascending.
type Dropper interface {
	Dropped() []uint64
}

// Source is the domain at the sending host.
type Source interface {
	Info() Info
	// ReadPages reads the pages pfns into buf (len(pfns)*PageSize bytes).
	// The domain may be running (pre-copy): the dirty log catches writes.
	// Pages that cannot be read are reported with an *UnreadableError
	// (the others are in buf), never filled in.
	ReadPages(pfns []uint64, buf []byte) error
	// StartDirtyLog begins write tracking; DirtyPages returns the pfns
	// written since the previous call (or the start) and clears the log.
	StartDirtyLog() error
	DirtyPages(dst []uint64) ([]uint64, error)
	StopDirtyLog() error
	// Pause stops the domain's vCPUs; memory is frozen afterwards.
	Pause() error
	// CoreState returns the paused domain's vCPU and platform state.
	CoreState() ([]byte, error)
	// CorePFNs lists pages that must be at the destination before it
	// resumes (page tables, pages the hypervisor reads itself). May be nil.
	CorePFNs() ([]uint64, error)
	// Resume undoes Pause: the migration failed before the destination
	// took the domain over.
	Resume() error
	// Destroy discards the paused source copy once the destination has
	// acknowledged every page.
	Destroy() error
}

// EarlyCorer is implemented by sources that know, before the pause, pages
// the destination will need before it resumes (the Xen backend's resident
// hint: page tables and per-CPU areas found at setup). In post-copy the
// engine sends them while the domain still runs, with write tracking on,
// and in the pause sends again only those written since; CorePFNs in the
// pause may still list them (pages already there and clean are skipped).
type EarlyCorer interface {
	EarlyCorePFNs() []uint64
}

// Relinquisher is implemented by sources that mark the domain as given up
// right before the destination is told to run it (the Xen backend renames
// it NAME--migratedaway, as xl does), so that two copies never share a
// name. A Resume after Relinquish undoes the mark.
type Relinquisher interface {
	Relinquish() error
}

// Page is one page for the destination; Data nil means all zeroes.
type Page struct {
	PFN  uint64
	Data []byte
}

// Dest is the domain at the receiving host.
type Dest interface {
	// Place installs pages. Before Resume a page may be overwritten (a
	// pre-copy round re-sends re-dirtied pages); after Resume the engine
	// only places pages the domain does not have, and placing one wakes
	// the vCPUs waiting for it.
	Place(pages []Page) error
	// Discard makes pages absent again (hybrid: re-dirtied after being
	// sent in pre-copy), so that a touch faults.
	Discard(pfns []uint64) error
	// ReadFaults blocks until the resumed domain touches absent pages and
	// returns their pfns (appended to dst[:0]). It returns ErrClosed after
	// Close.
	ReadFaults(dst []uint64) ([]uint64, error)
	// Resume loads the core state and starts the vCPUs.
	Resume(core []byte) error
	// Destroy removes a domain that never resumed.
	Destroy() error
	// Close stops fault delivery (a blocked ReadFaults returns).
	Close() error
}

// Blocktimer is implemented by destinations that know which vCPU waits on
// which page (Xen's paging requests name the vCPU): QEMU's postcopy
// blocktime, the time during which all vCPUs were blocked at once, and
// each vCPU's own blocked time. A destination that cannot know it (the
// lab's userfaultfd faults name no thread) does not implement it and the
// figures are omitted.
type Blocktimer interface {
	Blocktime() (all time.Duration, perVCPU []time.Duration)
}

// Reporter is implemented by destinations that can tell what the guest did
// during the migration (the lab backend can; a Xen guest cannot).
type Reporter interface {
	GuestReport() GuestReport
}

// GuestReport is what the guest side observed.
type GuestReport struct {
	WorkingSet      uint64 // distinct pages touched after resume, until every page had arrived
	Progress        uint64 // workload operations completed in total (source + destination)
	IntegrityErrors uint64 // pages whose content failed the workload's own check
}

// Factory creates the destination domain from the stream's domain header.
type Factory func(h *wire.DomainHeader) (Dest, error)

// ErrClosed is returned by Dest.ReadFaults after Close.
var ErrClosed = errors.New("domain closed")
