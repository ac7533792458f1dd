package xendom

import (
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// DestOptions configure the destination.
type DestOptions struct {
	HV Hypervisor
	XL Toolstack
	// Poll is how often the paging ring is looked at without an event
	// (default 20 ms): an event lost to a race costs at most that.
	Poll     time.Duration
	Logf     func(format string, a ...any)
	Progress func(stage string, done, total int)
}

// gfn states at the destination (the Pager's PageState):
//   - PageEvicted: paged out, a touch pauses the vCPU and asks us;
//   - PageLoaded: holds the source's content;
//   - PageDropped: Xen dropped the paged-out page (the guest mapped something else there);
//   - PageResident: never paged out (the source's resident hint), its content comes with the core pages;
//   - PageAbsent: no memory at the source (ballooned), released here, nothing comes.

// DestStats are the destination backend's figures.
type DestStats struct {
	CreateMs        float64 `json:"create_ms"`
	EvictMs         float64 `json:"evict_ms"`
	Evicted         uint64  `json:"evicted"`
	Resident        uint64  `json:"resident"`         // gfns of the source's hint, kept resident and written in the pause
	ResidentWritten uint64  `json:"resident_written"` // of those, written before the resume
	ResidentLate    uint64  `json:"resident_late"`    // of those, not sent before the resume: paged out then
	Populated       uint64  `json:"populated"`        // gfns RAM at the source, not here after xl create
	Released        uint64  `json:"released"`         // gfns RAM here, not at the source (ballooned there)
	Requests        uint64  `json:"paging_requests"`  // vm_event requests taken off the ring (the Pager's counts from here to AbsentTouched, but for Absent and the Set ones)
	ForeignReq      uint64  `json:"foreign_requests"`
	Loaded          uint64  `json:"loaded"`
	Overwritten     uint64  `json:"overwritten"` // pre-copy re-sends written over a loaded page
	PlainResponses  uint64  `json:"plain_responses"`
	LoadMs          float64 `json:"load_ms"`         // time spent in page loads and writes (hypercalls)
	Dropped         uint64  `json:"dropped"`         // paged-out gfns the guest gave back or replaced (DROP_PAGE requests)
	DroppedPlaced   uint64  `json:"dropped_placed"`  // pages that arrived for such gfns, not loaded
	DroppedOnLoad   uint64  `json:"dropped_on_load"` // loads refused because the guest had just given the gfn back
	Absent          uint64  `json:"absent"`          // gfns of the page space with no memory at the source
	SetDropped      uint64  `json:"set_dropped"`     // released in the pause: the source's guest gave them back
	SetAdded        uint64  `json:"set_added"`       // populated in the pause: the source's guest took them again
	SetKeptPaged    uint64  `json:"set_kept_paged"`  // given back at the source while still paged out here: left so
	AbsentTouched   uint64  `json:"absent_touched"`  // paging requests for gfns the guest had given back: a zero page
	// PagingOps is how paging reached the hypervisor: "batched" (the ops
	// of scripts/xen-patches), "per-gfn" (one hypercall a gfn), "libxc".
	PagingOps string `json:"paging_ops,omitempty"`
}

// Dest is the domain being received.
type Dest struct {
	opt  DestOptions
	bt   *blocktime // QEMU's postcopy blocktime, from the paging requests' vCPUs
	cfg  DomainConfig
	dom  uint32
	gfns []uint64 // the Pager's, by page index
	zero []byte
	// pg pages the domain: every gfn's state, the requests waiting for
	// pages, the ring. Its dom and ring are set once the domain exists.
	pg *Pager

	mu       sync.Mutex
	logDirty bool            // switched on at setup, off at Close
	written  map[uint64]bool // page indexes the resumed guest wrote (read-back)
	stats    DestStats       // the Dest's own figures; Stats adds the Pager's

	faults    chan []uint64
	closed    chan struct{}
	closeOnce sync.Once
	loopDone  chan struct{}
	loopErr   error
}

// NewFactory returns the engine.Factory that creates Xen destinations.
func NewFactory(opt DestOptions) engine.Factory {
	if opt.Poll <= 0 {
		opt.Poll = 20 * time.Millisecond
	}
	if opt.Logf == nil {
		opt.Logf = func(string, ...any) {}
	}
	if opt.Progress == nil {
		opt.Progress = func(string, int, int) {}
	}
	return func(h *wire.DomainHeader) (engine.Dest, error) {
		d, err := newDest(opt, h)
		if err != nil {
			return nil, err // not a typed nil in the interface
		}
		return d, nil
	}
}

func newDest(opt DestOptions, h *wire.DomainHeader) (*Dest, error) {
	if h.Backend != Backend {
		return nil, fmt.Errorf("stream is for a %q domain; this receiver hosts Xen domains", h.Backend)
	}
	if h.PageSize != PageSize {
		return nil, fmt.Errorf("stream has %d-byte pages, Xen x86 uses %d", h.PageSize, PageSize)
	}
	cfg, err := decodeDomainConfig(h.Config, h.NumPages)
	if err != nil {
		return nil, fmt.Errorf("domain configuration in the stream: %w", err)
	}
	gfns, err := fromRanges(cfg.GFNs, h.NumPages)
	if err != nil {
		return nil, fmt.Errorf("domain configuration in the stream: %w", err)
	}
	if uint64(len(gfns)) != h.NumPages {
		return nil, fmt.Errorf("stream announces %d pages but lists %d gfns", h.NumPages, len(gfns))
	}
	if cfg.XLConfig == "" {
		return nil, errors.New("the stream carries no xl configuration for the domain")
	}
	d := &Dest{opt: opt, cfg: cfg, gfns: gfns, zero: make([]byte, PageSize),
		faults: make(chan []uint64, 64), closed: make(chan struct{}),
		loopDone: make(chan struct{}), bt: newBlocktime(int(max(cfg.VCPUs, h.VCPUs)), time.Now)}
	d.pg = newDestPager(opt, gfns, d.bt)
	resident, err := fromRanges(cfg.Resident, h.NumPages)
	if err != nil {
		return nil, fmt.Errorf("resident gfns in the stream: %w", err)
	}
	for _, g := range resident {
		i, ok := slices.BinarySearch(gfns, g)
		if !ok {
			return nil, fmt.Errorf("resident gfn %#x in the stream is not one of the domain's pages", g)
		}
		d.pg.state[i] = PageResident
	}
	d.stats.Resident = uint64(len(resident))
	for _, r := range h.Absent {
		for i := r.First; i < r.First+r.Count; i++ {
			if d.pg.state[i] == PageResident {
				return nil, fmt.Errorf("gfn %#x is both resident and absent in the stream", gfns[i])
			}
			d.pg.state[i] = PageAbsent
			d.stats.Absent++
		}
	}
	if err := d.create(); err != nil {
		if d.dom != 0 {
			if derr := d.destroy(); derr != nil {
				err = fmt.Errorf("%w (and removing the half-made domain failed: %v)", err, derr)
			}
		}
		return nil, err
	}
	return d, nil
}

// BalloonHold is the nonce of the guest-balloon hold the source took, or
// "": the receiver ends it once the domain is complete here.
func (d *Dest) BalloonHold() string { return d.cfg.BalloonHold }

// DomID is the new domain's id.
func (d *Dest) DomID() uint32 { return d.dom }

// Name is the name the domain was created with (NAME--incoming).
func (d *Dest) Name() string { return d.cfg.Name + "--incoming" }

// Stats returns the backend's figures so far: the Dest's own and its
// Pager's.
func (d *Dest) Stats() DestStats {
	d.mu.Lock()
	s := d.stats
	d.mu.Unlock()
	if d.pg == nil {
		return s
	}
	ps := d.pg.Stats()
	s.Requests, s.ForeignReq, s.PlainResponses = ps.Requests, ps.Foreign, ps.Plain
	s.Loaded, s.Overwritten, s.ResidentWritten, s.LoadMs = ps.Loaded, ps.Overwritten, ps.ResidentWritten, ps.LoadMs
	s.Dropped, s.DroppedOnLoad, s.AbsentTouched = ps.Dropped, ps.DroppedOnLoad, ps.AbsentTouched
	return s
}

func (d *Dest) create() error {
	start := time.Now()
	f, err := os.CreateTemp("", "xl-postcopy-*.cfg")
	if err != nil {
		return fmt.Errorf("write the domain's xl config: %w", err)
	}
	defer os.Remove(f.Name())
	if _, err := f.WriteString(d.cfg.XLConfig); err != nil {
		f.Close()
		return fmt.Errorf("write the domain's xl config: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write the domain's xl config: %w", err)
	}
	d.opt.Progress("create", 0, 1)
	dom, err := d.opt.XL.CreatePaused(f.Name(), d.Name())
	if err != nil {
		return fmt.Errorf("create the domain: %w", err)
	}
	d.dom = dom
	d.pg.dom = dom
	d.stats.CreateMs = msSince(start)
	info, err := d.opt.HV.Domain(dom)
	if err != nil {
		return fmt.Errorf("new domain %d: %w", dom, err)
	}
	if err := RefusePostcopy(info); err != nil {
		return fmt.Errorf("new domain %d: %w", dom, err)
	}
	if err := d.reconcile(); err != nil {
		return err
	}
	ring, err := d.opt.HV.EnablePaging(dom)
	if err != nil {
		return fmt.Errorf("enable vm_event paging on domain %d: %w", dom, err)
	}
	d.pg.ring = ring
	go d.ringLoop()
	if err := d.evictAll(); err != nil {
		return err
	}
	// Log-dirty from the setup on (switching it on takes a while: not in
	// the downtime), cleaned right before the vCPUs run: then it says
	// which pages the resumed guest wrote, and the read-back that
	// verifies the migration leaves exactly those out.
	if err := d.opt.HV.EnableLogDirty(dom); err != nil {
		return fmt.Errorf("enable log-dirty on domain %d (to verify what it holds): %w", dom, err)
	}
	d.logDirty = true
	return nil
}

// dirtyPages is the dirty bitmap's size: the page space's last gfn + 1.
func (d *Dest) dirtyPages() uint64 { return d.gfns[len(d.gfns)-1] + 1 }

// ReadBack implements engine.ReadBacker: the pages as the domain holds
// them, read through a foreign mapping, and those of them the guest has
// written since it resumed (the log-dirty bits collected after the read;
// a page that no longer maps was given back by the guest: counted as
// written too).
func (d *Dest) ReadBack(pfns []uint64, buf []byte) ([]uint64, error) {
	gfns := make([]uint64, len(pfns))
	for i, p := range pfns {
		if p >= uint64(len(d.gfns)) {
			return nil, fmt.Errorf("page index %d beyond the domain's %d pages", p, len(d.gfns))
		}
		gfns[i] = d.gfns[p]
	}
	failed, err := d.opt.HV.ReadPages(d.dom, gfns, buf)
	if err != nil {
		return nil, err
	}
	dirty, err := d.opt.HV.CleanDirty(d.dom, d.dirtyPages(), nil)
	if err != nil {
		return nil, fmt.Errorf("log-dirty of domain %d: %w", d.dom, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.written == nil {
		d.written = map[uint64]bool{}
	}
	for _, g := range dirty {
		if i, ok := slices.BinarySearch(d.gfns, g); ok {
			d.written[uint64(i)] = true
		}
	}
	var out []uint64
	for j, p := range pfns {
		if d.written[p] || slices.Contains(failed, j) {
			out = append(out, p)
		}
	}
	return out, nil
}

// reconcile makes the new domain's RAM the source's: the same special
// pages, the source's RAM gfns populated, gfns the source gave back (a
// balloon) released.
func (d *Dest) reconcile() error {
	// Special pages of either domain stay as the new domain has them.
	special := map[uint64]bool{}
	for _, v := range d.cfg.Special {
		special[v] = true
	}
	for _, sp := range specialParams {
		v, err := d.opt.HV.HVMParam(d.dom, sp.param)
		if err != nil {
			return fmt.Errorf("read HVM param %s of the new domain: %w", sp.name, err)
		}
		if (sp.name == "store" || sp.name == "console") && v != d.cfg.Special[sp.name] {
			return fmt.Errorf("the new domain's %s page is gfn %#x, the source's %#x: the configurations differ", sp.name, v, d.cfg.Special[sp.name])
		}
		if v != 0 {
			special[v] = true
		}
	}
	max, err := d.opt.HV.MaxGPFN(d.dom)
	if err != nil {
		return fmt.Errorf("max gpfn of the new domain: %w", err)
	}
	if n := len(d.gfns); d.gfns[n-1] > max+(1<<20) {
		return fmt.Errorf("source gfn %#x is far beyond the new domain's max gpfn %#x: the configurations differ", d.gfns[n-1], max)
	}
	top := max
	if g := d.gfns[len(d.gfns)-1]; g > top {
		top = g
	}
	ram, err := ramGFNs(d.opt.HV, d.dom, top)
	if err != nil {
		return fmt.Errorf("the new domain: %w", err)
	}
	var populate, release []uint64
	for i, g := range d.gfns {
		if _, ok := slices.BinarySearch(ram, g); !ok && d.pg.state[i] != PageAbsent {
			populate = append(populate, g)
		}
	}
	for _, g := range ram {
		i, inSpace := slices.BinarySearch(d.gfns, g)
		if (!inSpace || d.pg.state[i] == PageAbsent) && !special[g] {
			release = append(release, g)
		}
	}
	if len(release) > 0 {
		if err := d.opt.HV.DecreaseReservation(d.dom, release); err != nil {
			return fmt.Errorf("release %d gfns the source does not have: %w", len(release), err)
		}
	}
	if len(populate) > 0 {
		if err := d.opt.HV.PopulatePhysmap(d.dom, populate); err != nil {
			return fmt.Errorf("populate %d gfns the source has: %w", len(populate), err)
		}
	}
	d.stats.Populated, d.stats.Released = uint64(len(populate)), uint64(len(release))
	d.opt.Logf("new domain %d: %d RAM pages to receive, %d gfns populated, %d released", d.dom, len(d.gfns), len(populate), len(release))
	return nil
}

// Place implements engine.Dest. Paged-out pages go in with as few paging
// hypercalls as the hypervisor allows (one for all of them with the
// batched ops); pages the domain holds (resident, or placed before in a
// pre-copy round) are written through one foreign mapping per call. The
// faults of every page placed are answered, also when a later one fails.
func (d *Dest) Place(pages []engine.Page) error {
	var wake []xenctrl.Request
	var wIdx, wGFN []uint64
	var wBuf []byte
	var lIdx, lGFN []uint64
	var lBuf []byte
	inLoad := map[uint64]int{} // page index → its slot in lIdx (a page twice in one call)
	for _, p := range pages {
		if p.PFN >= uint64(len(d.gfns)) {
			return fmt.Errorf("page index %d beyond the domain's %d pages", p.PFN, len(d.gfns))
		}
		g := d.gfns[p.PFN]
		data := p.Data
		if data == nil {
			data = d.zero
		}
		st := d.pg.State(p.PFN)
		switch st {
		case PageDropped:
			// The guest put something else at this gfn (Xen dropped the
			// paged-out page): the page is not its memory any more.
			d.mu.Lock()
			d.stats.DroppedPlaced++
			d.mu.Unlock()
			continue
		case PageAbsent:
			return fmt.Errorf("page index %d (gfn %#x) holds no memory: nothing may be placed there", p.PFN, g)
		case PageEvicted:
			if k, ok := inLoad[p.PFN]; ok {
				copy(lBuf[k*PageSize:(k+1)*PageSize], data)
				continue
			}
			inLoad[p.PFN] = len(lIdx)
			lIdx, lGFN = append(lIdx, p.PFN), append(lGFN, g)
			lBuf = append(lBuf, data...)
		default:
			wIdx, wGFN = append(wIdx, p.PFN), append(wGFN, g)
			wBuf = append(wBuf, data...)
		}
	}
	w, err := d.pg.Load(lIdx, lGFN, lBuf)
	wake = append(wake, w...)
	if err == nil && len(wGFN) > 0 {
		w, err = d.pg.Write(wIdx, wGFN, wBuf)
		wake = append(wake, w...)
	}
	if len(wake) > 0 {
		err = errors.Join(err, d.pg.Answer(wake))
	}
	return err
}

// ChangePageSet implements engine.PageSetter: in the pause, gfns the
// source's guest gave back are released here, gfns it took again are
// populated (kept resident: their content comes before the resume).
func (d *Dest) ChangePageSet(dropped, added []uint64) error {
	var release, populate []uint64
	var keptPaged uint64
	d.pg.mu.Lock()
	for _, i := range dropped {
		if i >= uint64(len(d.gfns)) {
			d.pg.mu.Unlock()
			return fmt.Errorf("page index %d beyond the domain's %d pages", i, len(d.gfns))
		}
		// A paged-out gfn stays so: Xen 4.17 refuses to release one
		// (p2m_remove_page wants a valid mfn: EILSEQ), and the guest
		// believes it ballooned out. Its balloon driver populates it
		// again like any hole; a touch before that gets a zero page
		// (ringLoop).
		if d.pg.state[i] == PageLoaded || d.pg.state[i] == PageResident {
			release = append(release, d.gfns[i])
		} else if d.pg.state[i] == PageEvicted {
			keptPaged++
		}
		d.pg.state[i] = PageAbsent
	}
	for _, i := range added {
		if i >= uint64(len(d.gfns)) {
			d.pg.mu.Unlock()
			d.mu.Lock()
			d.stats.SetKeptPaged += keptPaged
			d.mu.Unlock()
			return fmt.Errorf("page index %d beyond the domain's %d pages", i, len(d.gfns))
		}
		if d.pg.state[i] == PageAbsent {
			populate = append(populate, d.gfns[i])
			d.pg.state[i] = PageResident
		}
	}
	d.pg.mu.Unlock()
	d.mu.Lock()
	d.stats.SetKeptPaged += keptPaged
	d.stats.SetDropped += uint64(len(release))
	d.stats.SetAdded += uint64(len(populate))
	d.mu.Unlock()
	// A paged-out gfn is released like any (Xen drops the page and says
	// so on the ring: DROP_PAGE, answered by the Pager's Serve).
	if len(release) > 0 {
		if err := d.opt.HV.DecreaseReservation(d.dom, release); err != nil {
			return fmt.Errorf("release %d gfns the source's guest gave back: %w", len(release), err)
		}
	}
	if len(populate) > 0 {
		if err := d.opt.HV.PopulatePhysmap(d.dom, populate); err != nil {
			return fmt.Errorf("populate %d gfns the source's guest took again: %w", len(populate), err)
		}
	}
	d.opt.Logf("page set in the pause: released %d gfns, populated %d", len(release), len(populate))
	return nil
}

// Dropped implements engine.Dropper: pages the resumed guest gave back
// before they arrived.
func (d *Dest) Dropped() []uint64 {
	d.pg.mu.Lock()
	defer d.pg.mu.Unlock()
	var out []uint64
	for i, s := range d.pg.state {
		if s == PageDropped {
			out = append(out, uint64(i))
		}
	}
	return out
}

// Discard implements engine.Dest: pages re-dirtied at the source after a
// pre-copy round are paged out again, so that a touch asks for the new
// version.
func (d *Dest) Discard(pfns []uint64) error {
	var out []uint64
	seen := map[uint64]bool{}
	for _, p := range pfns {
		if p >= uint64(len(d.gfns)) {
			return fmt.Errorf("page index %d beyond the domain's %d pages", p, len(d.gfns))
		}
		if d.pg.State(p) != PageEvicted && !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	if _, err := d.pg.PageOut(out); err != nil {
		return fmt.Errorf("page out re-dirtied %w", err)
	}
	return nil
}

// Resume implements engine.Dest: the TSC settings and the HVM context
// (vCPU registers, local APIC, ...) of the suspended source, then the
// domain runs. The guest returns from its suspend hypercall as from a
// migration and rebuilds its event channels, grant table and xenstore
// connection against this domain, whose store and console pages and
// event channels are the ones xl set up here.
func (d *Dest) Resume(core []byte) error {
	cs, err := decodeCoreState(core)
	if err != nil {
		return fmt.Errorf("core state: %w", err)
	}
	if err := d.evictLateResident(); err != nil {
		return err
	}
	if err := d.opt.HV.SetTSCInfo(d.dom, cs.TSC); err != nil {
		return fmt.Errorf("set TSC info: %w", err)
	}
	if err := d.opt.HV.SetHVMContext(d.dom, cs.HVM); err != nil {
		return fmt.Errorf("set the HVM context: %w", err)
	}
	if d.logDirty {
		// From here on a set bit is the guest's own write.
		if _, err := d.opt.HV.CleanDirty(d.dom, d.dirtyPages(), nil); err != nil {
			return fmt.Errorf("clean the log-dirty bitmap of domain %d: %w", d.dom, err)
		}
	}
	if err := d.opt.HV.Unpause(d.dom); err != nil {
		return fmt.Errorf("unpause domain %d: %w", d.dom, err)
	}
	return nil
}

// Close implements engine.Dest: fault delivery stops. With every page in,
// paging is switched off; otherwise the ring stays (the guest stays
// paused on its faults, nothing is lost).
func (d *Dest) Close() error {
	d.closeOnce.Do(func() { close(d.closed) })
	<-d.loopDone
	complete := d.pg.Pending() == 0 && d.pg.Count(PageEvicted) == 0
	if complete && d.logDirty {
		d.logDirty = false
		if err := d.opt.HV.DisableLogDirty(d.dom); err != nil {
			return fmt.Errorf("disable log-dirty: %w", err)
		}
	}
	if complete && d.pg.hasRing() {
		// Requests the loop had not taken off the ring when it stopped
		// are answered first: every page is in, and a vCPU paused on a
		// request must not outlive the ring that would answer it.
		n, err := d.pg.Drain()
		if err != nil {
			return fmt.Errorf("before disabling paging: %w", err)
		}
		if n > 0 {
			d.opt.Logf("%d paging requests answered as paging was disabled", n)
		}
		if err := d.pg.CloseRing(); err != nil {
			return fmt.Errorf("disable paging: %w", err)
		}
	}
	return nil
}

// Blocktime implements engine.Blocktimer: QEMU's postcopy blocktime (all
// vCPUs waiting on paging requests at once) and each vCPU's wait.
func (d *Dest) Blocktime() (all time.Duration, perVCPU []time.Duration) {
	if d.bt == nil {
		return 0, nil
	}
	return d.bt.totals()
}

// Destroy implements engine.Dest: the domain never ran.
func (d *Dest) Destroy() error { return d.destroy() }

func (d *Dest) destroy() error {
	d.closeOnce.Do(func() { close(d.closed) })
	if d.pg != nil && d.pg.hasRing() {
		<-d.loopDone
		_ = d.pg.CloseRing()
	}
	return d.opt.XL.Destroy(d.dom)
}

// Rename gives the domain its own name. The source renames its copy
// NAME--migratedaway in the background from GO on; in the rare case that
// has not finished yet (a short migration), the name is still taken, so
// the rename is retried for a while.
func (d *Dest) Rename() error {
	var err error
	for end := time.Now().Add(15 * time.Second); ; time.Sleep(250 * time.Millisecond) {
		if err = d.opt.XL.Rename(d.dom, d.cfg.Name); err == nil || time.Now().After(end) {
			return err
		}
	}
}

func msSince(t time.Time) float64 { return float64(time.Since(t).Microseconds()) / 1000 }

// addSince adds the milliseconds since t to sum, kept on the microsecond
// grid: sums of many float increments otherwise print as 3861.4090000000006.
func addSince(sum float64, t time.Time) float64 {
	return math.Round((sum+msSince(t))*1000) / 1000
}
