package xendom

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
)

// The fake hypervisor keeps every domain's memory in Go maps and models
// the parts of Xen the backend relies on: the physmap (absent, RAM, paged
// out), log-dirty, vm_event paging with vCPUs that block on a paged-out
// gfn until the pager answers, and the cooperative suspend.

const (
	gsAbsent = iota
	gsRAM
	gsPaged
)

// Guest layout of the fake domains.
const (
	fRAMPages  = 1024  // gfns 0..1023 are RAM
	fStorePFN  = 0x900 // special region, above a hole
	fConsPFN   = 0x901
	fSharedPFN = 0x902 // shared_info frame
	fMaxGPFN   = 0x90f
)

// Page-table gfns: vCPU 0's tree and vCPU 1's tree (which shares a PDPT).
var (
	ptCR3a = uint64(100)
	ptCR3b = uint64(110)
	ptGFNs = []uint64{100, 101, 102, 103, 104, 110, 111, 112}
	// kernelPTGFNs are the tables reachable from the kernel half (PML4
	// entries 256..511): the only ones the source sends with the core.
	kernelPTGFNs = []uint64{100, 104, 110, 111, 112}
	special      = []uint64{fStorePFN, fConsPFN, fSharedPFN}
)

// perCPUVA is vCPU 0's per-CPU area, mapped by PD 112's 2 MiB leaf at
// gfn 0x200 (PML4[511], PDPT[3], PD[1]); vCPU 1's follows it.
const perCPUVA = 0xffff_ff80_c020_0000

func isPT(g uint64) bool { return slices.Contains(ptGFNs, g) }

type fdom struct {
	id      uint32
	info    xenctrl.DomainInfo
	mem     map[uint64][]byte
	state   map[uint64]int
	params  map[int]uint64
	hvm     []byte
	tsc     xenctrl.TSCInfo
	logDirt bool
	dirty   map[uint64]bool
	ring    *fakeRing
	// loaded: gfns the pager wrote (PagingLoad or WritePages).
	loaded map[uint64]bool
	// loadedAtUnpause is loaded when the domain was first unpaused.
	loadedAtUnpause map[uint64]bool
	unpaused        bool
	setHVM          []byte
	setTSC          *xenctrl.TSCInfo
	evictions       map[uint64]int
	nominated       map[uint64]bool
	decreased       []uint64
	populated       []uint64
	resumes         []bool // ResumeDomain fast arguments
	// guest, if set, is the running guest's stop function (source).
	stopGuest func()
	// restartGuest starts the guest's writes again after a resume from
	// suspend (set by runGuest).
	restartGuest func()
	// snapshot is the memory at suspend time.
	snapshot map[uint64][]byte
}

type fakeHV struct {
	mu   sync.Mutex
	cond *sync.Cond // broadcast on any physmap or ring change
	doms map[uint32]*fdom
	next uint32

	// Failure injection.
	enablePagingErr error
	loadErrGFN      map[uint64]bool // PagingLoad and WritePages of these fail
	unmappable      map[uint64]bool // RAM-typed but ReadPages cannot map them (a grant mapping)
	corruptLoad     uint64          // PagingLoad stores this gfn wrongly (0: none)
	nominateErrGFN  map[uint64]bool // PagingNominate of these fails with EBUSY (a page still referenced)
	evictErrGFN     map[uint64]bool // PagingEvict of these fails with EBUSY, the gfn staying nominated
	// pausedAtPageOut records, per PageOut call, whether the domain was
	// paused (the self-test evicts only paused).
	pausedAtPageOut []bool
	pagedOK         map[uint64]bool // gfns a test expects left paged out when paging goes off
	// onSuspend runs (with the lock) when a guest has stopped its vCPUs
	// for a suspend, before the snapshot.
	onSuspend func(dom uint32)
	// suspendDelay is how long a guest takes to suspend; domWatchers are
	// signalled when one has (xenstored's @releaseDomain); domainCalls
	// counts Domain calls (the suspend's polls among them).
	suspendDelay time.Duration
	domWatchers  []chan struct{}
	domainCalls  int
	// onUnpause runs (without the lock) when a domain is unpaused.
	onUnpause func(dom uint32)
	// destShape builds a new destination domain's memory (CreatePaused).
	destShape func(d *fdom)
	errs      []error // protocol violations seen by the fake

	hvmReads     int // HVM context saves (running or paused domains)
	writeBatches int // WritePages calls
	pageOutCalls int // PageOut calls
	loadCalls    int // LoadPages calls
	// preemptAt, if > 0, makes PageOut and LoadPages stop after that many
	// gfns without an error, as a preempted batched hypercall does.
	preemptAt int
}

func newFakeHV() *fakeHV {
	h := &fakeHV{doms: map[uint32]*fdom{}, next: 1, loadErrGFN: map[uint64]bool{}, unmappable: map[uint64]bool{},
		nominateErrGFN: map[uint64]bool{}, evictErrGFN: map[uint64]bool{}}
	h.cond = sync.NewCond(&h.mu)
	return h
}

func (h *fakeHV) violation(format string, a ...any) {
	h.errs = append(h.errs, fmt.Errorf(format, a...))
}

func pageOf(tag string, g uint64) []byte {
	p := make([]byte, PageSize)
	r := rand.New(rand.NewSource(int64(g) ^ int64(len(tag))<<40))
	r.Read(p)
	copy(p, fmt.Sprintf("%s gfn %#x", tag, g))
	return p
}

func pte(g uint64) uint64 { return g<<12 | 0x7 } // present, rw, user

// hvmContext builds a valid HVM save context: a header-ish record the
// parser must skip, one CPU record per cr3, and the END record.
func hvmContext(cr3s ...uint64) []byte {
	var b []byte
	rec := func(typ, inst uint16, body []byte) {
		var d [8]byte
		binary.LittleEndian.PutUint16(d[0:], typ)
		binary.LittleEndian.PutUint16(d[2:], inst)
		binary.LittleEndian.PutUint32(d[4:], uint32(len(body)))
		b = append(b, d[:]...)
		b = append(b, body...)
	}
	rec(1, 0, make([]byte, 24)) // HEADER
	for i, cr3 := range cr3s {
		body := make([]byte, 1024)
		binary.LittleEndian.PutUint64(body[cpuOffCR0:], 1<<31|1)          // PG|PE
		binary.LittleEndian.PutUint64(body[cpuOffCR3:], cr3<<12)          // page-aligned root
		binary.LittleEndian.PutUint64(body[cpuOffCR4:], 1<<5)             // PAE
		binary.LittleEndian.PutUint64(body[cpuOffEFER:], 1<<8|1<<10)      // LME|LMA
		binary.LittleEndian.PutUint64(body[cpuOffRIP:], 0x1000+uint64(i)) // distinguishable
		// The per-CPU area: in GS base while in the kernel (vCPU 0), in
		// the shadow GS base while in user mode (vCPU 1).
		if i == 0 {
			binary.LittleEndian.PutUint64(body[cpuOffGSBase:], perCPUVA)
		} else {
			binary.LittleEndian.PutUint64(body[cpuOffGSBase:], 0x7f00_0000_0000)
			binary.LittleEndian.PutUint64(body[cpuOffShadowGS:], perCPUVA+PerCPUSpan)
		}
		rec(2, uint16(i), body)
	}
	rec(0, 0, nil)
	return b
}

// newGuestDomain builds a running PVH domain with RAM gfns 0..1023 (minus
// holes), special pages and 4-level page tables reachable from two CR3s.
func (h *fakeHV) newGuestDomain(tag string, holes ...uint64) *fdom {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := &fdom{id: h.next, mem: map[uint64][]byte{}, state: map[uint64]int{}, params: map[int]uint64{},
		dirty: map[uint64]bool{}, loaded: map[uint64]bool{}, evictions: map[uint64]int{}, nominated: map[uint64]bool{}}
	h.next++
	d.info = xenctrl.DomainInfo{ID: d.id, HVM: true, PVH: true, HAP: true, MaxVCPUID: 1, TotPages: fRAMPages, MaxPages: fRAMPages + 16,
		SharedInfoFrame: fSharedPFN}
	for g := uint64(0); g < fRAMPages; g++ {
		if slices.Contains(holes, g) {
			continue
		}
		d.mem[g] = pageOf(tag, g)
		d.state[g] = gsRAM
	}
	for _, g := range special {
		d.mem[g] = pageOf(tag+" special", g)
		d.state[g] = gsRAM
	}
	d.params[1] = fStorePFN
	d.params[17] = fConsPFN
	d.params[5] = 0
	// Page tables (content only matters where the walk reads it).
	for _, g := range ptGFNs {
		d.mem[g] = make([]byte, PageSize)
	}
	put := func(tbl uint64, idx int, v uint64) { binary.LittleEndian.PutUint64(d.mem[tbl][idx*8:], v) }
	put(100, 0, pte(101))        // PML4[0] -> PDPT 101
	put(100, 511, pte(111))      // PML4[511] -> PDPT 111
	put(101, 0, pte(102))        // PDPT[0] -> PD 102
	put(102, 0, pte(103))        // PD[0] -> PT 103
	put(102, 1, pte(104))        // PD[1] -> PT 104
	put(102, 2, pte(0x200)|1<<7) // 2 MiB leaf: not a table
	put(102, 3, pte(0x123456))   // beyond max gpfn: skipped by the walk
	put(103, 0, pte(300))        // data pages, not tables
	put(103, 1, pte(301))
	put(110, 0, pte(101))        // vCPU 1 shares PDPT 101
	put(110, 511, pte(111))      // the same kernel half as vCPU 0
	put(111, 3, pte(112))        // PDPT 111 -> PD 112
	put(112, 0, pte(104))        // PD 112 shares PT 104
	put(112, 1, pte(0x200)|1<<7) // 2 MiB leaf
	d.hvm = hvmContext(ptCR3a, ptCR3b)
	d.tsc = xenctrl.TSCInfo{Mode: 1, ElapsedNsec: 12345, GTSCkHz: 2000000, Incarnation: 3}
	h.doms[d.id] = d
	return d
}

func (h *fakeHV) dom(id uint32) (*fdom, error) {
	d := h.doms[id]
	if d == nil || d.info.Dying {
		return nil, fmt.Errorf("domain %d: %w", id, syscall.ESRCH)
	}
	return d, nil
}

func (h *fakeHV) Domain(id uint32) (xenctrl.DomainInfo, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.domainCalls++
	d, err := h.dom(id)
	if err != nil {
		return xenctrl.DomainInfo{}, err
	}
	// Xen's tot_pages: every page the domain owns, paged out or not.
	info := d.info
	info.TotPages = 0
	for _, st := range d.state {
		if st != gsAbsent {
			info.TotPages++
		}
	}
	return info, nil
}

func (h *fakeHV) Pause(id uint32) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return err
	}
	d.info.Paused = true
	return nil
}

func (h *fakeHV) Unpause(id uint32) error {
	h.mu.Lock()
	d, err := h.dom(id)
	if err != nil {
		h.mu.Unlock()
		return err
	}
	d.info.Paused = false
	first := !d.unpaused
	if first {
		d.unpaused = true
		d.loadedAtUnpause = map[uint64]bool{}
		for g := range d.loaded {
			d.loadedAtUnpause[g] = true
		}
	}
	hook := h.onUnpause
	h.mu.Unlock()
	if first && hook != nil {
		hook(id)
	}
	return nil
}

func (h *fakeHV) ResumeDomain(id uint32, fast bool) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return err
	}
	d.resumes = append(d.resumes, fast)
	if !d.info.Shutdown || d.info.ShutdownReason != xenctrl.ShutdownSuspend {
		return fmt.Errorf("domain %d is not suspended: %w", id, syscall.EINVAL)
	}
	d.info.Shutdown = false
	d.info.ShutdownReason = 0
	if restart := d.restartGuest; restart != nil && d.stopGuest == nil {
		go restart() // its vCPUs run again (runGuest takes h.mu)
	}
	return nil
}

func (h *fakeHV) MaxGPFN(id uint32) (uint64, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, err := h.dom(id); err != nil {
		return 0, err
	}
	return fMaxGPFN, nil
}

func (h *fakeHV) PageTypes(id uint32, gfns []uint64) ([]xenctrl.PageType, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return nil, err
	}
	out := make([]xenctrl.PageType, len(gfns))
	for i, g := range gfns {
		if d.state[g] == gsAbsent {
			out[i] = xenctrl.PageInvalid
		} else {
			out[i] = xenctrl.PageNormal
		}
	}
	return out, nil
}

func (h *fakeHV) HVMContext(id uint32) ([]byte, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return nil, err
	}
	// Xen pauses a running domain for the save itself: allowed.
	h.hvmReads++
	return slices.Clone(d.hvm), nil
}

func (h *fakeHV) SetHVMContext(id uint32, ctx []byte) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return err
	}
	if _, err := ParseCPUs(ctx); err != nil {
		return fmt.Errorf("set hvm context: %w", syscall.EINVAL)
	}
	d.setHVM = slices.Clone(ctx)
	return nil
}

func (h *fakeHV) HVMParam(id uint32, param int) (uint64, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return 0, err
	}
	return d.params[param], nil
}

func (h *fakeHV) TSCInfo(id uint32) (xenctrl.TSCInfo, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return xenctrl.TSCInfo{}, err
	}
	return d.tsc, nil
}

func (h *fakeHV) SetTSCInfo(id uint32, t xenctrl.TSCInfo) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return err
	}
	d.setTSC = &t
	return nil
}

func (h *fakeHV) ReadPages(id uint32, gfns []uint64, buf []byte) ([]int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return nil, err
	}
	if len(buf) < len(gfns)*PageSize {
		return nil, errors.New("short buffer")
	}
	var failed []int
	for i, g := range gfns {
		dst := buf[i*PageSize : (i+1)*PageSize]
		if d.state[g] != gsRAM || h.unmappable[g] {
			clear(dst)
			failed = append(failed, i)
			continue
		}
		copy(dst, d.mem[g])
	}
	return failed, nil
}

func (h *fakeHV) WritePages(id uint32, gfns []uint64, src []byte) ([]int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return nil, err
	}
	if len(src) < len(gfns)*PageSize {
		return nil, errors.New("short buffer")
	}
	h.writeBatches++
	for _, g := range gfns {
		if h.loadErrGFN[g] {
			return nil, fmt.Errorf("map gfn %#x for writing: injected: %w", g, syscall.EIO)
		}
	}
	var failed []int
	for i, g := range gfns {
		if d.state[g] != gsRAM {
			failed = append(failed, i) // a paged-out or absent gfn does not map
			continue
		}
		d.mem[g] = slices.Clone(src[i*PageSize : (i+1)*PageSize])
		d.loaded[g] = true
	}
	h.cond.Broadcast()
	return failed, nil
}

func (h *fakeHV) PopulatePhysmap(id uint32, gfns []uint64) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return err
	}
	for _, g := range gfns {
		if d.state[g] != gsAbsent {
			return fmt.Errorf("populate gfn %#x: present: %w", g, syscall.EEXIST)
		}
		d.state[g] = gsRAM
		d.mem[g] = make([]byte, PageSize)
		d.populated = append(d.populated, g)
	}
	return nil
}

func (h *fakeHV) DecreaseReservation(id uint32, gfns []uint64) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return err
	}
	for _, g := range gfns {
		if d.state[g] == gsAbsent {
			return fmt.Errorf("release gfn %#x: absent: %w", g, syscall.EINVAL)
		}
		if d.state[g] == gsPaged {
			// Xen 4.17: p2m_remove_page refuses an entry without a valid mfn.
			return fmt.Errorf("release paged-out gfn %#x: %w", g, syscall.EILSEQ)
		}
		delete(d.state, g)
		delete(d.mem, g)
		d.decreased = append(d.decreased, g)
	}
	return nil
}

func (h *fakeHV) EnableLogDirty(id uint32) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return err
	}
	d.logDirt = true
	return nil
}

func (h *fakeHV) DisableLogDirty(id uint32) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return err
	}
	d.logDirt = false
	d.dirty = map[uint64]bool{}
	return nil
}

func (h *fakeHV) CleanDirty(id uint32, pages uint64, dst []uint64) ([]uint64, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return nil, err
	}
	if !d.logDirt {
		return nil, fmt.Errorf("log-dirty off: %w", syscall.EINVAL)
	}
	var gs []uint64
	for g := range d.dirty {
		if g < pages {
			gs = append(gs, g)
		}
	}
	slices.Sort(gs)
	d.dirty = map[uint64]bool{}
	return append(dst, gs...), nil
}

// batchCall counts a batched call in *calls and says how many of its n
// gfns it does (preemptAt).
func (h *fakeHV) batchCall(calls *int, n int) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	*calls++
	if h.preemptAt > 0 {
		n = min(n, h.preemptAt)
	}
	return n
}

// PageOut pages gfns out one at a time, like the per-gfn path; preemptAt
// makes it stop early as the batched hypercall does when preempted.
func (h *fakeHV) PageOut(id uint32, gfns []uint64) (int, error) {
	n := h.batchCall(&h.pageOutCalls, len(gfns))
	h.mu.Lock()
	if d := h.doms[id]; d != nil {
		h.pausedAtPageOut = append(h.pausedAtPageOut, d.info.Paused)
	}
	h.mu.Unlock()
	for i, g := range gfns[:n] {
		if err := h.PagingNominate(id, g); err != nil {
			return i, err
		}
		if err := h.PagingEvict(id, g); err != nil {
			return i, err
		}
	}
	return n, nil
}

// LoadPages loads gfns one at a time, stopping at the first failure.
func (h *fakeHV) LoadPages(id uint32, gfns []uint64, data []byte) (int, error) {
	n := h.batchCall(&h.loadCalls, len(gfns))
	if len(data) < len(gfns)*PageSize {
		return 0, fmt.Errorf("load %d gfns from %d bytes: %w", len(gfns), len(data), syscall.EINVAL)
	}
	for i, g := range gfns[:n] {
		if err := h.PagingLoad(id, g, data[i*PageSize:(i+1)*PageSize]); err != nil {
			return i, err
		}
	}
	return n, nil
}

func (h *fakeHV) PagingNominate(id uint32, g uint64) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return err
	}
	if d.ring == nil {
		return fmt.Errorf("nominate: paging off: %w", syscall.ENODEV)
	}
	if d.state[g] != gsRAM {
		return fmt.Errorf("nominate gfn %#x: %w", g, syscall.EINVAL)
	}
	if slices.Contains(special, g) {
		h.violation("special gfn %#x nominated", g)
	}
	if h.nominateErrGFN[g] {
		return fmt.Errorf("nominate gfn %#x: injected: %w", g, syscall.EBUSY)
	}
	d.nominated[g] = true
	return nil
}

func (h *fakeHV) PagingEvict(id uint32, g uint64) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return err
	}
	if !d.nominated[g] || d.state[g] != gsRAM {
		return fmt.Errorf("evict gfn %#x: not nominated: %w", g, syscall.EINVAL)
	}
	if h.evictErrGFN[g] {
		return fmt.Errorf("evict gfn %#x: injected: %w", g, syscall.EBUSY)
	}
	delete(d.nominated, g)
	d.state[g] = gsPaged
	d.mem[g] = nil
	d.evictions[g]++
	delete(d.loaded, g)
	return nil
}

func (h *fakeHV) PagingLoad(id uint32, g uint64, page []byte) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return err
	}
	if h.loadErrGFN[g] {
		return fmt.Errorf("load gfn %#x: injected: %w", g, syscall.EIO)
	}
	if d.state[g] != gsPaged {
		return fmt.Errorf("load gfn %#x: not paged out: %w", g, syscall.ENOENT)
	}
	d.state[g] = gsRAM
	d.mem[g] = slices.Clone(page)
	if h.corruptLoad != 0 && g == h.corruptLoad {
		d.mem[g][9] ^= 0x40
	}
	d.loaded[g] = true
	h.cond.Broadcast()
	return nil
}

func (h *fakeHV) EnablePaging(id uint32) (Ring, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.dom(id)
	if err != nil {
		return nil, err
	}
	if h.enablePagingErr != nil {
		return nil, h.enablePagingErr
	}
	if d.ring != nil {
		return nil, fmt.Errorf("paging ring: %w", syscall.EBUSY)
	}
	d.ring = &fakeRing{h: h, d: d, sig: make(chan struct{}, 1), answered: map[uint64]int{}}
	return d.ring, nil
}

// fakeRing is the vm_event paging ring between vCPUs and the pager.
type fakeRing struct {
	h        *fakeHV
	d        *fdom
	sig      chan struct{} // the event channel
	reqs     []xenctrl.Request
	answered map[uint64]int // responses per gfn, guarded by h.mu
	closed   bool
	notifies int
	requests int
}

func (r *fakeRing) GetRequest() (xenctrl.Request, bool, error) {
	r.h.mu.Lock()
	defer r.h.mu.Unlock()
	if r.closed {
		return xenctrl.Request{}, false, errors.New("ring closed")
	}
	if len(r.reqs) == 0 {
		return xenctrl.Request{}, false, nil
	}
	q := r.reqs[0]
	r.reqs = r.reqs[1:]
	return q, true, nil
}

func (r *fakeRing) PutResponse(rsp xenctrl.Response) error {
	r.h.mu.Lock()
	defer r.h.mu.Unlock()
	if r.closed {
		return errors.New("ring closed")
	}
	// A foreign mapping's request paused no vCPU; a request of another
	// reason is answered as it came.
	if who := rsp.Flags & (xenctrl.FlagVCPUPaused | xenctrl.FlagForeign); (who == 0 && rsp.PagingFlags&xenctrl.PagingDropPage == 0) ||
		(rsp.Reason != xenctrl.ReasonMemPaging && rsp.Reason != fakeOtherReason) {
		r.h.violation("response %+v would not unpause the vCPU", rsp)
	}
	r.answered[rsp.GFN]++
	r.h.cond.Broadcast()
	return nil
}

func (r *fakeRing) Notify() error {
	r.h.mu.Lock()
	r.notifies++
	r.h.mu.Unlock()
	return nil
}

func (r *fakeRing) Wait(timeout time.Duration) (bool, error) {
	select {
	case <-r.sig:
		return true, nil
	case <-time.After(timeout):
		return false, nil
	}
}

func (r *fakeRing) Close() error {
	r.h.mu.Lock()
	defer r.h.mu.Unlock()
	r.closed = true
	for g, st := range r.d.state {
		if st == gsPaged && !r.h.pagedOK[g] {
			r.h.violation("paging disabled on domain %d with paged-out gfn %#x", r.d.id, g)
			break
		}
	}
	r.h.cond.Broadcast()
	return nil
}

// touch is a vCPU's read of gfn: a paged-out gfn pauses the vCPU, puts a
// request on the ring and waits for the pager's response; then the vCPU
// reads the page, which must be resident.
func (h *fakeHV) touch(id uint32, vcpu uint32, g uint64, deadline time.Time) ([]byte, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.doms[id]
	if d.state[g] == gsAbsent {
		return nil, nil // not RAM: an MMIO access, nothing to page in
	}
	if d.state[g] == gsPaged {
		r := d.ring
		if r == nil || r.closed {
			return nil, fmt.Errorf("gfn %#x paged out and no pager", g)
		}
		before := r.answered[g]
		r.reqs = append(r.reqs, xenctrl.Request{Version: 1, Flags: xenctrl.FlagVCPUPaused, Reason: xenctrl.ReasonMemPaging,
			VCPUID: vcpu, GFN: g})
		r.requests++
		select {
		case r.sig <- struct{}{}:
		default:
		}
		stop := time.AfterFunc(time.Until(deadline), func() { h.mu.Lock(); h.cond.Broadcast(); h.mu.Unlock() })
		for r.answered[g] == before && !r.closed && time.Now().Before(deadline) {
			h.cond.Wait()
		}
		stop.Stop()
		if r.answered[g] == before {
			return nil, fmt.Errorf("vcpu %d: no response for gfn %#x", vcpu, g)
		}
	}
	if d.state[g] != gsRAM {
		return nil, fmt.Errorf("vcpu %d resumed on gfn %#x in state %d", vcpu, g, d.state[g])
	}
	return slices.Clone(d.mem[g]), nil
}

// write is the running guest's write: the dirty log records it.
func (h *fakeHV) write(id uint32, g uint64, data []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.doms[id]
	if d.state[g] != gsRAM {
		return
	}
	d.mem[g] = slices.Clone(data)
	if d.logDirt {
		d.dirty[g] = true
	}
}

// runGuest starts a source guest that keeps writing non-table RAM gfns
// until it suspends. pause, if > 0, is slept between writes.
func (h *fakeHV) runGuest(d *fdom, seed int64, pause time.Duration) (writes func() int) {
	stop := make(chan struct{})
	done := make(chan struct{})
	var n int
	var nmu sync.Mutex
	go func() {
		defer close(done)
		rng := rand.New(rand.NewSource(seed))
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			g := uint64(rng.Intn(fRAMPages))
			if isPT(g) {
				continue
			}
			h.write(d.id, g, pageOf("write "+strconv.Itoa(i), g))
			nmu.Lock()
			n++
			nmu.Unlock()
			if pause > 0 {
				time.Sleep(pause)
			}
		}
	}()
	h.mu.Lock()
	d.stopGuest = func() { close(stop); <-done }
	d.restartGuest = func() { h.runGuest(d, seed+1, pause) }
	h.mu.Unlock()
	return func() int { nmu.Lock(); defer nmu.Unlock(); return n }
}

// suspend is the guest's reaction to control/shutdown=suspend: it stops
// its vCPUs, then makes the suspend hypercall.
func (h *fakeHV) suspend(id uint32) {
	h.mu.Lock()
	delay := h.suspendDelay
	h.mu.Unlock()
	time.Sleep(delay)
	h.mu.Lock()
	d := h.doms[id]
	stop := d.stopGuest
	d.stopGuest = nil
	h.mu.Unlock()
	if stop != nil {
		stop()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.onSuspend != nil {
		h.onSuspend(id)
	}
	d.snapshot = map[uint64][]byte{}
	for g, p := range d.mem {
		d.snapshot[g] = slices.Clone(p)
	}
	d.info.Shutdown = true
	d.info.ShutdownReason = xenctrl.ShutdownSuspend
	for _, w := range h.domWatchers {
		select {
		case w <- struct{}{}:
		default:
		}
	}
}

// watchingStore is a fakeStore with xenstored's @releaseDomain watch
// (xendom.DomainWatcher), fired when a fake guest has suspended; a deaf
// one never fires.
type watchingStore struct {
	*fakeStore
	deaf bool
}

func (s watchingStore) WatchDomains(context.Context) (<-chan struct{}, func(), error) {
	ch := make(chan struct{}, 1)
	if !s.deaf {
		s.h.mu.Lock()
		s.h.domWatchers = append(s.h.domWatchers, ch)
		s.h.mu.Unlock()
	}
	return ch, func() {
		s.h.mu.Lock()
		defer s.h.mu.Unlock()
		s.h.domWatchers = slices.DeleteFunc(s.h.domWatchers, func(c chan struct{}) bool { return c == ch })
	}, nil
}

// fakeStore is xenstore: the guest's control/shutdown node.
type fakeStore struct {
	h      *fakeHV
	mu     sync.Mutex
	writes []string
	// ignore makes the guest not react to suspend requests.
	ignore bool
}

func (s *fakeStore) Write(_ context.Context, path, value string) error {
	s.mu.Lock()
	s.writes = append(s.writes, path+"="+value)
	ignore := s.ignore
	s.mu.Unlock()
	rest, ok := strings.CutPrefix(path, "/local/domain/")
	if !ok {
		return fmt.Errorf("unexpected path %s", path)
	}
	ids, node, _ := strings.Cut(rest, "/")
	id, err := strconv.ParseUint(ids, 10, 32)
	if err != nil || node != "control/shutdown" {
		return fmt.Errorf("unexpected path %s", path)
	}
	if value == "suspend" && !ignore {
		go s.h.suspend(uint32(id))
	}
	return nil
}

func (s *fakeStore) Remove(_ context.Context, path string) error {
	s.mu.Lock()
	s.writes = append(s.writes, "rm "+path)
	s.mu.Unlock()
	return nil
}

// fakeXL is the toolstack.
type fakeXL struct {
	h         *fakeHV
	mu        sync.Mutex
	created   []string // names
	configs   []string
	renames   []string // "dom:name"
	destroyed []uint32
	lastDom   uint32
	ids       []uint32 // every domain created
}

func (x *fakeXL) CreatePaused(cfgPath, name string) (uint32, error) {
	cfg, err := os.ReadFile(cfgPath)
	if err != nil {
		return 0, err
	}
	d := x.h.newGuestDomain("kernel")
	x.h.mu.Lock()
	d.info.Paused = true
	if x.h.destShape != nil {
		x.h.destShape(d)
	}
	x.h.mu.Unlock()
	x.mu.Lock()
	defer x.mu.Unlock()
	x.created = append(x.created, name)
	x.configs = append(x.configs, string(cfg))
	x.lastDom = d.id
	x.ids = append(x.ids, d.id)
	return d.id, nil
}

func (x *fakeXL) Rename(dom uint32, name string) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.renames = append(x.renames, fmt.Sprintf("%d:%s", dom, name))
	return nil
}

func (x *fakeXL) Destroy(dom uint32) error {
	x.mu.Lock()
	x.destroyed = append(x.destroyed, dom)
	x.mu.Unlock()
	x.h.mu.Lock()
	defer x.h.mu.Unlock()
	d, err := x.h.dom(dom)
	if err != nil {
		return err
	}
	d.info.Dying = true
	if d.ring != nil {
		d.ring.closed = true
	}
	x.h.cond.Broadcast()
	return nil
}

// guestRelease is the guest's balloon driver giving gfns back
// (XENMEM_decrease_reservation from inside): a paged-out gfn is dropped
// and Xen tells the pager with a DROP_PAGE request, unless quiet (the
// request is still on its way when the pager next looks).
func (h *fakeHV) guestRelease(id uint32, quiet bool, gfns ...uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.guestReleaseQuiet(id, quiet, gfns...)
}

// guestReleaseLocked is guestRelease with h.mu held.
func (h *fakeHV) guestReleaseLocked(id uint32, gfns ...uint64) {
	h.guestReleaseQuiet(id, false, gfns...)
}

func (h *fakeHV) guestReleaseQuiet(id uint32, quiet bool, gfns ...uint64) {
	d := h.doms[id]
	for _, g := range gfns {
		if d.state[g] == gsPaged && d.ring != nil && !quiet {
			d.ring.reqs = append(d.ring.reqs, xenctrl.Request{Version: 1, Reason: xenctrl.ReasonMemPaging,
				GFN: g, PagingFlags: xenctrl.PagingDropPage})
			select {
			case d.ring.sig <- struct{}{}:
			default:
			}
		}
		delete(d.state, g)
		delete(d.mem, g)
		delete(d.loaded, g)
	}
	h.cond.Broadcast()
}

// guestPopulate is the guest's balloon driver taking gfns again and the
// guest writing them.
func (h *fakeHV) guestPopulate(id uint32, gfns ...uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.doms[id]
	for _, g := range gfns {
		d.state[g] = gsRAM
		d.mem[g] = pageOf("repopulated", g)
		if d.logDirt {
			d.dirty[g] = true
		}
	}
}
