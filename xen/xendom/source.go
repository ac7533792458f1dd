package xendom

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
	"github.com/xl-postcopy/xl-postcopy/xen/engine"
)

// Backend is the engine.Info.Backend of Xen domains.
const Backend = "xen"

// HVM parameters naming pages that belong to the toolstack and the
// hypervisor, not to the guest's RAM: the destination domain has its own
// (xl sets them up there), so they are never sent (xen/hvm/params.h).
var specialParams = []struct {
	name  string
	param int
}{
	{"store", 1}, {"ioreq", 5}, {"bufioreq", 6}, {"ident_pt", 12},
	{"console", 17}, {"paging_ring", 27}, {"monitor_ring", 28}, {"sharing_ring", 29},
}

// DomainConfig travels in the DOMAIN_HEADER: what the destination needs
// to create the domain and map the engine's page indexes to gfns.
type DomainConfig struct {
	Name     string            `json:"name"`
	Kind     string            `json:"kind"` // "pvh" or "hvm"
	VCPUs    uint32            `json:"vcpus"`
	XLConfig string            `json:"xl_config"`
	GFNs     []Range           `json:"gfns"` // page index i is the i-th gfn of these ranges
	Special  map[string]uint64 `json:"special"`
	// Resident lists gfns the destination keeps resident instead of
	// paging them out: the core pages found by a walk while the domain was
	// still running. They are all sent with the core pages during the
	// pause (whatever the walk at the pause finds besides), where a write
	// through a foreign mapping costs far less than one paging hypercall
	// per page — that is most of the downtime otherwise.
	Resident []Range `json:"resident,omitempty"`
	// BalloonHold is the nonce of the guest-balloon hold the source
	// asked for: the destination ends it once the domain is complete.
	BalloonHold string `json:"balloon_hold,omitempty"`
}

// maxResidentHint bounds the hint: a walk racing the running guest's
// page-table updates could wander; a hint that large is dropped.
const maxResidentHint = 8192

// coreState is the engine's CORE_STATE body for a Xen domain.
type coreState struct {
	TSC xenctrl.TSCInfo `json:"tsc"`
	HVM []byte          `json:"hvm"`
}

// Store is the part of a xenstore client the source uses to ask the guest
// to suspend (*xenstore.Client).
type Store interface {
	Write(ctx context.Context, path, value string) error
	Remove(ctx context.Context, path string) error
}

// SourceOptions configure a Source.
type SourceOptions struct {
	HV       Hypervisor
	XS       Store
	XL       Toolstack
	Dom      uint32
	Name     string
	XLConfig []byte
	// BalloonHold is the nonce of guest-balloon's hold, if one was taken.
	BalloonHold string
	// SuspendTimeout bounds the wait for the guest to suspend (default 30 s).
	SuspendTimeout time.Duration
	Logf           func(format string, a ...any)
}

// SourceStats are the backend's own figures, for the migration report.
type SourceStats struct {
	RAMPages        uint64  `json:"ram_pages"`        // pages transferred (the engine's page space)
	SkippedGFNs     uint64  `json:"skipped_gfns"`     // gfns below max_gpfn not RAM (holes, ballooned, special)
	NotGuestRAM     uint64  `json:"not_guest_ram"`    // RAM-typed gfns that cannot be mapped (grant frames): not sent
	UnreadablePages uint64  `json:"unreadable_pages"` // reads of pages that could not be mapped (none is sent)
	AbsentPages     uint64  `json:"absent_pages"`     // holes below the highest RAM gfn at the start (ballooned)
	DroppedPages    uint64  `json:"dropped_pages"`    // given back by the guest between the setup and the pause
	AddedPages      uint64  `json:"added_pages"`      // taken again by the guest between the setup and the pause
	PageTablePages  uint64  `json:"page_table_pages"` // found by the CR3 walk of every vCPU
	PerCPUPages     uint64  `json:"per_cpu_pages"`    // start of each vCPU per-CPU area (vcpu_info)
	WalkSkipped     uint64  `json:"walk_skipped"`     // page-table entries pointing outside RAM
	ResidentHint    uint64  `json:"resident_hint"`    // core pages found at setup, kept resident at the destination
	HintStale       uint64  `json:"hint_stale"`       // of those, no longer core at the pause (sent with the core anyway)
	HintMissed      uint64  `json:"hint_missed"`      // core pages at the pause the hint lacked (paged in at the destination)
	GuestHints      string  `json:"guest_hints"`      // where core pages came from
	SuspendMs       float64 `json:"suspend_ms"`       // guest's suspend, part of the downtime
	// SuspendWatched: the guest's suspend was noticed when xenstored's
	// @releaseDomain watch fired (false: by a poll of the hypervisor).
	SuspendWatched bool    `json:"suspend_watched"`
	ReadMs         float64 `json:"read_ms"` // time spent mapping and copying pages
}

// Source is a running Xen PVH/HVM domain being migrated away.
type Source struct {
	opt    SourceOptions
	info   xenctrl.DomainInfo
	gfns   []uint64 // index -> gfn, ascending
	maxGFN uint64
	cfg    DomainConfig

	mu         sync.Mutex
	suspended  bool
	renamed    bool
	renaming   chan error
	logDirty   bool
	scratch    []uint64
	stats      SourceStats
	hvmContext []byte
	hint       []uint64 // page indexes the destination keeps resident, ascending
	// absent[i]: page i holds no memory (a hole a balloon driver left).
	absent []bool
	// outside is the domain's page count beyond its page space at setup
	// (special pages, grant frames, hypervisor-owned pages): more than
	// that in the pause means the guest populated gfns the migration does
	// not cover.
	outside uint64
}

// Refusal kinds: why a domain cannot be migrated with post-copy or hybrid.
const (
	RefusedPV          = "pv"           // no vm_event paging for PV guests
	RefusedShadow      = "shadow"       // HVM/PVH without HAP: no vm_event paging
	RefusedDeviceModel = "device-model" // HVM: its device model's state is not moved yet
)

// RefusedError says why a domain cannot be migrated with post-copy or
// hybrid. Nothing was touched when it is returned; `--mode precopy` (done
// by `xl migrate`) can still move every such domain.
type RefusedError struct {
	Kind   string // RefusedPV, RefusedShadow, RefusedDeviceModel
	Reason string
}

func (e *RefusedError) Error() string {
	return e.Reason + ": use --mode precopy (done by `xl migrate`)"
}

// RefusePostcopy says why dom cannot be a post-copy source, or nil; the
// error is a *RefusedError.
func RefusePostcopy(info xenctrl.DomainInfo) error {
	switch {
	case !info.HVM:
		return &RefusedError{Kind: RefusedPV, Reason: "post-copy needs vm_event paging, which Xen offers only to HVM and PVH guests, and this is a PV domain"}
	case !info.HAP:
		return &RefusedError{Kind: RefusedShadow, Reason: "post-copy needs vm_event paging, which needs HAP (hap=1 in the domain config and a CPU with EPT/NPT); this domain uses shadow paging"}
	case !info.PVH:
		// libxl gives every HVM guest a qemu-xen device model (PCI,
		// disks, NIC, VGA, serial); its state is not in the HVM context
		// we send, so the destination's fresh device model would run
		// the guest with its devices reset: wrong, silently.
		return &RefusedError{Kind: RefusedDeviceModel, Reason: "this is an HVM domain, whose emulated devices live in its device model (qemu-xen); xl-postcopy does not move the device model's state yet, and the guest would resume with its devices reset"}
	}
	return nil
}

// NewSource inspects the domain: which gfns hold RAM (those are sent),
// which are the toolstack's special pages (never sent).
func NewSource(opt SourceOptions) (*Source, error) {
	if opt.SuspendTimeout <= 0 {
		opt.SuspendTimeout = 30 * time.Second
	}
	if opt.Logf == nil {
		opt.Logf = func(string, ...any) {}
	}
	info, err := opt.HV.Domain(opt.Dom)
	if err != nil {
		return nil, fmt.Errorf("domain %d: %w", opt.Dom, err)
	}
	if err := RefusePostcopy(info); err != nil {
		return nil, err
	}
	if info.Shutdown || info.Dying {
		return nil, fmt.Errorf("domain %d is shut down or dying, not running", opt.Dom)
	}
	s := &Source{opt: opt, info: info}
	kind := "hvm"
	if info.PVH {
		kind = "pvh"
	}
	special := map[string]uint64{}
	skip := map[uint64]bool{}
	for _, sp := range specialParams {
		v, err := opt.HV.HVMParam(opt.Dom, sp.param)
		if err != nil {
			return nil, fmt.Errorf("read HVM param %s: %w", sp.name, err)
		}
		if v != 0 {
			special[sp.name] = v
			skip[v] = true
		}
	}
	max, err := opt.HV.MaxGPFN(opt.Dom)
	if err != nil {
		return nil, fmt.Errorf("max gpfn: %w", err)
	}
	s.maxGFN = max
	// The gfn where the guest mapped its shared_info page holds Xen's
	// page, not RAM. The resumed guest maps the new domain's shared_info
	// there again (XENMAPSPACE_shared_info), and Linux BUG()s if that
	// fails — which it does on a paged-out gfn. So the destination keeps
	// that gfn resident and nothing is sent for it.
	if g := info.SharedInfoFrame; g <= max {
		special["shared_info"] = g
		skip[g] = true
	}
	ram, err := ramGFNs(opt.HV, opt.Dom, max)
	if err != nil {
		return nil, err
	}
	for _, g := range ram {
		if !skip[g] {
			s.gfns = append(s.gfns, g)
		}
	}
	s.stats.SkippedGFNs = max + 1 - uint64(len(s.gfns))
	if len(s.gfns) == 0 {
		return nil, fmt.Errorf("domain %d has no RAM pages below gfn %#x", opt.Dom, max)
	}
	// Gfns the guest covered with Xen's pages (grant-table frames placed
	// over ballooned gfns, ...) have a RAM type but cannot be mapped: they
	// are not the guest's memory. The guest maps them again after resume,
	// which needs the gfn empty (not paged out) at the destination, so
	// they leave the page space and the destination releases them.
	unmappable, err := s.dropUnmappable()
	if err != nil {
		return nil, err
	}
	s.stats.RAMPages = uint64(len(s.gfns))
	// The page space also holds the holes between RAM gfns that a
	// balloon driver can have left (no larger than what the domain may
	// still populate: MMIO holes and the gap below the special pages are
	// larger), as absent pages: the guest may take them again before it
	// suspends, and then they are sent in the pause; and pages it gives
	// back meanwhile simply become absent.
	ramCount := len(s.gfns)
	balloonable := uint64(0)
	if info.MaxPages > info.TotPages {
		balloonable = info.MaxPages - info.TotPages
	}
	s.gfns, s.absent = withHoles(s.gfns, balloonable, func(g uint64) bool { return skip[g] || unmappable[g] })
	s.stats.AbsentPages = uint64(len(s.gfns) - ramCount)
	if dom, err := opt.HV.Domain(opt.Dom); err == nil && dom.TotPages >= uint64(ramCount) {
		s.outside = dom.TotPages - uint64(ramCount)
	} else {
		s.outside = info.TotPages - min(info.TotPages, uint64(ramCount))
	}
	s.stats.GuestHints = "none (no guest-balloon page classes): core pages from the CR3 walk only"
	s.cfg = DomainConfig{Name: opt.Name, Kind: kind, VCPUs: info.MaxVCPUID + 1, XLConfig: string(opt.XLConfig),
		GFNs: toRanges(s.gfns), Special: special, BalloonHold: opt.BalloonHold}
	s.residentHint()
	return s, nil
}

// Stats returns the backend's figures so far.
func (s *Source) Stats() SourceStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

// Info implements engine.Source.
func (s *Source) Info() engine.Info {
	cfg, _ := json.Marshal(s.cfg)
	s.mu.Lock()
	var absent []uint64
	for i, a := range s.absent {
		if a {
			absent = append(absent, uint64(i))
		}
	}
	s.mu.Unlock()
	return engine.Info{Name: s.opt.Name, NumPages: uint64(len(s.gfns)), PageSize: PageSize,
		VCPUs: s.cfg.VCPUs, Backend: Backend, Config: cfg, Absent: absent}
}

// ReadPages implements engine.Source.
func (s *Source) ReadPages(pfns []uint64, buf []byte) error {
	gfns := make([]uint64, len(pfns))
	for i, p := range pfns {
		if p >= uint64(len(s.gfns)) {
			return fmt.Errorf("page index %d beyond the domain's %d pages", p, len(s.gfns))
		}
		gfns[i] = s.gfns[p]
	}
	t0 := time.Now()
	failed, err := s.opt.HV.ReadPages(s.opt.Dom, gfns, buf)
	s.mu.Lock()
	s.stats.ReadMs = addSince(s.stats.ReadMs, t0)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	if len(failed) > 0 {
		// A page the guest gave back to Xen (a balloon driver) or turned
		// into a grant/shared-info mapping since the setup: what it holds
		// is not known, so it is reported, never filled in. The engine
		// skips it in pre-copy and settles it in the pause.
		s.mu.Lock()
		s.stats.UnreadablePages += uint64(len(failed))
		s.mu.Unlock()
		var why error = errors.New("not mappable")
		if x, ok := s.opt.HV.(interface{ lastMapError() error }); ok {
			why = x.lastMapError() // Xen's errno for the first page
		}
		bad := make([]uint64, len(failed))
		for i, f := range failed {
			bad[i] = pfns[f]
		}
		s.opt.Logf("%d of %d pages not mappable (first gfn %#x: %v): not sent", len(failed), len(gfns), gfns[failed[0]], why)
		return &engine.UnreadableError{PFNs: bad, Err: why}
	}
	return nil
}

// PageSetChange implements engine.PageSetChanger: the page types of the
// paused domain against the page set of the setup. The guest's balloon
// driver may have given pages back or taken them again until it
// suspended.
func (s *Source) PageSetChange() (dropped, added []uint64, err error) {
	t0 := time.Now()
	ram := 0
	const batch = 1024
	for base := 0; base < len(s.gfns); base += batch {
		part := s.gfns[base:min(base+batch, len(s.gfns))]
		types, err := s.opt.HV.PageTypes(s.opt.Dom, part)
		if err != nil {
			return nil, nil, fmt.Errorf("page types of gfns %#x..%#x: %w", part[0], part[len(part)-1], err)
		}
		s.mu.Lock()
		for j, t := range types {
			i := base + j
			isRAM := t != xenctrl.PageInvalid && t != xenctrl.PageXAlloc && t != xenctrl.PageBroken
			if isRAM {
				ram++
			}
			switch {
			case isRAM && s.absent[i]:
				added = append(added, uint64(i))
				s.absent[i] = false
			case !isRAM && !s.absent[i]:
				dropped = append(dropped, uint64(i))
				s.absent[i] = true
			}
		}
		s.mu.Unlock()
	}
	info, err := s.opt.HV.Domain(s.opt.Dom)
	if err != nil {
		return nil, nil, fmt.Errorf("domain %d: %w", s.opt.Dom, err)
	}
	if info.TotPages > uint64(ram)+s.outside {
		return nil, nil, fmt.Errorf("the guest populated %d gfns outside the page set taken at the start of the migration (its balloon grew back): nothing was lost, the domain runs on here; retry the migration",
			info.TotPages-uint64(ram)-s.outside)
	}
	s.mu.Lock()
	s.stats.DroppedPages, s.stats.AddedPages = uint64(len(dropped)), uint64(len(added))
	s.mu.Unlock()
	s.opt.Logf("page set in the pause: %d pages given back, %d taken again since the setup (checked in %v)", len(dropped), len(added), time.Since(t0).Round(time.Microsecond))
	return dropped, added, nil
}

// StartDirtyLog implements engine.Source (HAP log-dirty).
func (s *Source) StartDirtyLog() error {
	if err := s.opt.HV.EnableLogDirty(s.opt.Dom); err != nil {
		return err
	}
	s.logDirty = true
	// Start from a clean log: the first DirtyPages reports writes after now.
	_, err := s.opt.HV.CleanDirty(s.opt.Dom, s.maxGFN+1, nil)
	return err
}

// DirtyPages implements engine.Source.
func (s *Source) DirtyPages(dst []uint64) ([]uint64, error) {
	// Like the lab backend: the result starts at dst[:0], so a caller
	// that passes the previous round's slice back gets this round only.
	dst = dst[:0]
	var err error
	s.scratch, err = s.opt.HV.CleanDirty(s.opt.Dom, s.maxGFN+1, s.scratch[:0])
	if err != nil {
		return dst, err
	}
	for _, g := range s.scratch {
		if i, ok := s.index(g); ok {
			dst = append(dst, i)
		}
	}
	return dst, nil
}

// StopDirtyLog implements engine.Source.
func (s *Source) StopDirtyLog() error {
	if !s.logDirty {
		return nil
	}
	s.logDirty = false
	return s.opt.HV.DisableLogDirty(s.opt.Dom)
}

// CoreState implements engine.Source.
func (s *Source) CoreState() ([]byte, error) {
	tsc, err := s.opt.HV.TSCInfo(s.opt.Dom)
	if err != nil {
		return nil, fmt.Errorf("TSC info: %w", err)
	}
	hvm, err := s.opt.HV.HVMContext(s.opt.Dom)
	if err != nil {
		return nil, fmt.Errorf("HVM context: %w", err)
	}
	s.hvmContext = hvm
	return json.Marshal(coreState{TSC: tsc, HVM: hvm})
}

// Relinquish implements engine.Relinquisher: the source copy is renamed
// NAME--migratedaway before the destination may run the guest.
//
// The rename runs in the background: it is bookkeeping (the paused
// source cannot run either way) and xl takes half a second, which would
// all be downtime. Resume and Destroy wait for it.
func (s *Source) Relinquish() error {
	done := make(chan error, 1)
	s.mu.Lock()
	s.renaming = done
	s.mu.Unlock()
	go func() {
		err := s.opt.XL.Rename(s.opt.Dom, s.opt.Name+"--migratedaway")
		if err == nil {
			s.mu.Lock()
			s.renamed = true
			s.mu.Unlock()
		} else {
			s.opt.Logf("rename the source copy: %v", err)
		}
		done <- err
	}()
	return nil
}

// waitRename waits for Relinquish's rename, if one was started.
func (s *Source) waitRename() {
	s.mu.Lock()
	ch := s.renaming
	s.renaming = nil
	s.mu.Unlock()
	if ch != nil {
		<-ch
	}
}

// Resume implements engine.Source: the migration failed before the
// destination ran the guest; the guest sees its suspend cancelled.
func (s *Source) Resume() error {
	var errs []error
	s.waitRename()
	s.mu.Lock()
	renamed, suspended := s.renamed, s.suspended
	s.mu.Unlock()
	if renamed {
		if err := s.opt.XL.Rename(s.opt.Dom, s.opt.Name); err != nil {
			errs = append(errs, fmt.Errorf("rename back to %s: %w", s.opt.Name, err))
		} else {
			s.mu.Lock()
			s.renamed = false
			s.mu.Unlock()
		}
	}
	if err := s.StopDirtyLog(); err != nil {
		errs = append(errs, fmt.Errorf("log-dirty off: %w", err))
	}
	if suspended {
		if err := s.opt.HV.ResumeDomain(s.opt.Dom, true); err != nil {
			errs = append(errs, fmt.Errorf("resume the suspended guest: %w", err))
		} else {
			s.mu.Lock()
			s.suspended = false
			s.mu.Unlock()
		}
	} else {
		// The request may still be pending: take it back. A guest that
		// had already taken it may suspend a moment later: give it a few
		// seconds and cancel that suspend too, never leave it stopped.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := s.opt.XS.Write(ctx, s.controlPath(), ""); err != nil {
			errs = append(errs, fmt.Errorf("withdraw the suspend request: %w", err))
		}
		cancel()
		for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
			info, err := s.opt.HV.Domain(s.opt.Dom)
			if err != nil {
				break
			}
			if info.Shutdown && info.ShutdownReason == xenctrl.ShutdownSuspend {
				if err := s.opt.HV.ResumeDomain(s.opt.Dom, true); err != nil {
					errs = append(errs, fmt.Errorf("resume the guest that suspended late: %w", err))
				}
				break
			}
		}
	}
	return errors.Join(errs...)
}

// Destroy implements engine.Source: the destination holds every page.
func (s *Source) Destroy() error {
	s.waitRename()
	_ = s.StopDirtyLog()
	return s.opt.XL.Destroy(s.opt.Dom)
}
