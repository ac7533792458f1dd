// Package lab is a domain that lives in a process: memory plus vCPU
// threads running a workload over it, migrated by the engine with real page
// faults (userfaultfd), real dirty tracking (write-protect + PAGEMAP_SCAN,
// the Linux twin of Xen log-dirty) and real sockets. It is how the engine is
// tested and benchmarked without a Xen host (DESIGN.md §4).
package lab

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/uffd"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// Backend is the engine.Info backend name of lab domains.
const Backend = "lab"

// Config describes a lab domain.
type Config struct {
	Name     string       `json:"name"`
	Pages    uint64       `json:"pages"`
	Zero     uint64       `json:"zero"` // tail pages that stay zero
	VCPUs    int          `json:"vcpus"`
	Workload WorkloadSpec `json:"workload"`
	// ControlTimeout bounds each control call to the lab guest process
	// (default DefaultControlTimeout): a guest stopped with SIGSTOP, or
	// wedged, fails the call instead of hanging the tool.
	ControlTimeout time.Duration `json:"-"`
}

// DefaultControlTimeout is Config.ControlTimeout's default.
const DefaultControlTimeout = time.Minute

func (c *Config) controlTimeout() time.Duration {
	if c.ControlTimeout > 0 {
		return c.ControlTimeout
	}
	return DefaultControlTimeout
}

// Validate checks c and fills the workload's usable page count.
func (c *Config) Validate() error {
	if c.Pages < 16 {
		return fmt.Errorf("lab domain needs at least 16 pages, got %d", c.Pages)
	}
	if c.Zero >= c.Pages {
		return fmt.Errorf("zero tail of %d pages leaves nothing usable of %d", c.Zero, c.Pages)
	}
	if c.VCPUs < 1 || c.VCPUs > 64 {
		return fmt.Errorf("vcpus %d out of range 1..64", c.VCPUs)
	}
	c.Workload.Pages = c.Pages - c.Zero
	if c.Workload.WSPages > c.Workload.Pages {
		return fmt.Errorf("working set of %d pages is larger than the %d usable pages", c.Workload.WSPages, c.Workload.Pages)
	}
	_, err := NewWorkload(c.Workload) // fail here, not in the child
	return err
}

// Report is what a guest says about itself.
type Report struct {
	Ops       uint64 // workload operations completed (progress counter)
	Touched   uint64 // distinct pages touched while tracking (destination)
	Integrity uint64 // operations that found a page without its marker
	Running   bool
}

// guestProc is the parent's handle on a child lab guest.
type guestProc struct {
	cfg  Config
	cmd  *exec.Cmd
	ctrl net.Conn
	enc  *json.Encoder
	dec  *json.Decoder
	mu   sync.Mutex // one request at a time
	base uintptr    // guest memory address in the child
	pid  int
	dead error
}

func startGuest(cfg Config, role string) (*guestProc, *net.UnixConn, error) {
	if err := cfg.Validate(); err != nil {
		return nil, nil, err
	}
	gc, err := json.Marshal(guestConfig{Role: role, Pages: cfg.Pages, Zero: cfg.Zero, VCPUs: cfg.VCPUs, Workload: cfg.Workload})
	if err != nil {
		return nil, nil, err
	}
	ctrlP, ctrlC, err := socketpair()
	if err != nil {
		return nil, nil, err
	}
	passP, passC, err := socketpair()
	if err != nil {
		ctrlP.Close()
		ctrlC.Close()
		return nil, nil, err
	}
	exe, err := os.Executable()
	if err != nil {
		ctrlP.Close()
		ctrlC.Close()
		passP.Close()
		passC.Close()
		return nil, nil, fmt.Errorf("find own executable to start the lab guest: %w", err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), envGuest+"="+string(gc))
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	cmd.ExtraFiles = []*os.File{ctrlC, passC}
	// The guest must not outlive the tool that serves its faults.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		ctrlP.Close()
		ctrlC.Close()
		passP.Close()
		passC.Close()
		return nil, nil, fmt.Errorf("start lab guest: %w", err)
	}
	ctrlC.Close()
	passC.Close()
	conn, err := net.FileConn(ctrlP)
	ctrlP.Close()
	if err != nil {
		passP.Close()
		cmd.Process.Kill()
		cmd.Wait()
		return nil, nil, err
	}
	pc, err := net.FileConn(passP)
	passP.Close()
	if err != nil {
		conn.Close()
		cmd.Process.Kill()
		cmd.Wait()
		return nil, nil, err
	}
	g := &guestProc{cfg: cfg, cmd: cmd, ctrl: conn, enc: json.NewEncoder(conn), dec: json.NewDecoder(conn), pid: cmd.Process.Pid}
	return g, pc.(*net.UnixConn), nil
}

func (g *guestProc) hello() error {
	var rep reply
	_ = g.ctrl.SetDeadline(time.Now().Add(g.cfg.controlTimeout()))
	defer g.ctrl.SetDeadline(time.Time{})
	if err := g.dec.Decode(&rep); err != nil {
		g.kill()
		return fmt.Errorf("lab guest did not start: %w", err)
	}
	if rep.Err != "" {
		g.kill()
		return fmt.Errorf("lab guest: %s", rep.Err)
	}
	g.base = uintptr(rep.Base)
	return nil
}

func socketpair() (*os.File, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "lab-parent"), os.NewFile(uintptr(fds[1]), "lab-child"), nil
}

func (g *guestProc) call(req request) (reply, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.dead != nil {
		return reply{}, g.dead
	}
	var rep reply
	to := g.cfg.controlTimeout()
	_ = g.ctrl.SetDeadline(time.Now().Add(to))
	defer g.ctrl.SetDeadline(time.Time{})
	if err := g.enc.Encode(req); err != nil {
		g.dead = fmt.Errorf("lab guest %s: %w", g.cfg.Name, err)
		return rep, g.dead
	}
	if err := g.dec.Decode(&rep); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			g.dead = fmt.Errorf("lab guest %s did not answer %q within %v (stopped, or wedged): %w", g.cfg.Name, req.Op, to, err)
		} else {
			g.dead = fmt.Errorf("lab guest %s died: %w", g.cfg.Name, err)
		}
		return rep, g.dead
	}
	if rep.Err != "" {
		return rep, fmt.Errorf("lab guest %s: %s: %s", g.cfg.Name, req.Op, rep.Err)
	}
	return rep, nil
}

// Report asks the guest for its counters.
func (g *guestProc) Report() (Report, error) {
	rep, err := g.call(request{Op: "report"})
	if err != nil || rep.Report == nil {
		if err == nil {
			err = errors.New("empty report")
		}
		return Report{}, err
	}
	r := rep.Report
	return Report{Ops: r.Ops, Touched: r.Touched, Integrity: r.Integrity, Running: r.Running}, nil
}

func (g *guestProc) exit() error {
	_, err := g.call(request{Op: "exit"})
	g.ctrl.Close()
	werr := g.cmd.Wait()
	if err != nil {
		return err
	}
	if werr != nil {
		return fmt.Errorf("lab guest %s: %w", g.cfg.Name, werr)
	}
	return nil
}

func (g *guestProc) kill() {
	if g.cmd.Process != nil {
		g.cmd.Process.Kill()
		g.cmd.Wait()
	}
	g.ctrl.Close()
}

// pageRuns calls f for each run of consecutive pfns in pfns (in order),
// with the run's index range.
func pageRuns(pfns []uint64, f func(i, j int) error) error {
	for i := 0; i < len(pfns); {
		j := i + 1
		for j < len(pfns) && pfns[j] == pfns[j-1]+1 {
			j++
		}
		if err := f(i, j); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// readv reads the child's pages pfns into buf with process_vm_readv.
func (g *guestProc) readv(pfns []uint64, buf []byte) error {
	var local []unix.Iovec
	var remote []unix.RemoteIovec
	err := pageRuns(pfns, func(i, j int) error {
		n := (j - i) * pageSize
		if pfns[j-1] >= g.cfg.Pages {
			return fmt.Errorf("pfn %d beyond %d pages", pfns[j-1], g.cfg.Pages)
		}
		var iov unix.Iovec
		iov.Base = &buf[i*pageSize]
		iov.SetLen(n)
		local = append(local, iov)
		remote = append(remote, unix.RemoteIovec{Base: g.base + uintptr(pfns[i])*pageSize, Len: n})
		return nil
	})
	if err != nil {
		return err
	}
	// IOV_MAX is 1024: go in slices.
	for off := 0; off < len(local); off += 1024 {
		end := min(len(local), off+1024)
		want := 0
		for _, r := range remote[off:end] {
			want += r.Len
		}
		n, err := unix.ProcessVMReadv(g.pid, local[off:end], remote[off:end], 0)
		if err != nil {
			return fmt.Errorf("read lab guest memory: %w", err)
		}
		if n != want {
			return fmt.Errorf("read lab guest memory: short read %d of %d bytes", n, want)
		}
	}
	return nil
}

// writev overwrites present pages of the child (pre-copy re-sends).
func (g *guestProc) writev(pfn uint64, data []byte) error {
	local := []unix.Iovec{{Base: &data[0]}}
	local[0].SetLen(len(data))
	remote := []unix.RemoteIovec{{Base: g.base + uintptr(pfn)*pageSize, Len: len(data)}}
	n, err := unix.ProcessVMWritev(g.pid, local, remote, 0)
	if err != nil {
		return fmt.Errorf("write lab guest memory: %w", err)
	}
	if n != len(data) {
		return fmt.Errorf("write lab guest memory: short write %d of %d", n, len(data))
	}
	return nil
}

// Source is a running lab domain being migrated away.
type Source struct {
	g      *guestProc
	pm     *uffd.Pagemap
	states []VCPUState
	regs   []uffd.Region
}

// StartSource starts a lab domain with cfg, running its workload.
func StartSource(cfg Config) (*Source, error) {
	g, pass, err := startGuest(cfg, "source")
	if err != nil {
		return nil, err
	}
	pass.Close()
	if err := g.hello(); err != nil {
		g.kill() // a guest that never said hello must not be left behind
		return nil, err
	}
	return &Source{g: g}, nil
}

// Report returns the guest's counters.
func (s *Source) Report() (Report, error) { return s.g.Report() }

// Kill ends the guest whatever its state (error paths, tests).
func (s *Source) Kill() { s.g.kill() }

// Info implements engine.Source.
func (s *Source) Info() engine.Info {
	cfg, _ := json.Marshal(s.g.cfg)
	return engine.Info{Name: s.g.cfg.Name, NumPages: s.g.cfg.Pages, PageSize: pageSize, VCPUs: uint32(s.g.cfg.VCPUs), Backend: Backend, Config: cfg}
}

// ReadPages implements engine.Source.
func (s *Source) ReadPages(pfns []uint64, buf []byte) error { return s.g.readv(pfns, buf) }

// StartDirtyLog implements engine.Source: the guest write-protects its
// memory (userfaultfd WP_ASYNC) and the parent scans its pagemap.
func (s *Source) StartDirtyLog() error {
	pm, err := uffd.OpenPagemap(s.g.pid)
	if err != nil {
		return err
	}
	if _, err := s.g.call(request{Op: "dirtylog-start"}); err != nil {
		pm.Close()
		return err
	}
	s.pm = pm
	return nil
}

// DirtyPages implements engine.Source.
func (s *Source) DirtyPages(dst []uint64) ([]uint64, error) {
	if s.pm == nil {
		return nil, errors.New("dirty log not started")
	}
	var err error
	s.regs, err = s.pm.ScanWritten(s.g.base, s.g.base+uintptr(s.g.cfg.Pages)*pageSize, true, s.regs[:0])
	if err != nil {
		return nil, fmt.Errorf("scan dirty pages: %w", err)
	}
	dst = dst[:0]
	for _, r := range s.regs {
		for a := r.Start; a < r.End; a += pageSize {
			dst = append(dst, uint64((uintptr(a)-s.g.base)/pageSize))
		}
	}
	return dst, nil
}

// StopDirtyLog implements engine.Source.
func (s *Source) StopDirtyLog() error {
	if s.pm == nil {
		return nil
	}
	s.pm.Close()
	s.pm = nil
	_, err := s.g.call(request{Op: "dirtylog-stop"})
	return err
}

// Pause implements engine.Source.
func (s *Source) Pause() error {
	rep, err := s.g.call(request{Op: "pause"})
	if err != nil {
		return err
	}
	s.states = rep.States
	return nil
}

// CoreState implements engine.Source: the vCPUs' workload state.
func (s *Source) CoreState() ([]byte, error) {
	if s.states == nil {
		return nil, errors.New("core state of a running domain")
	}
	return json.Marshal(s.states)
}

// CorePFNs implements engine.Source: a lab guest has no page tables the
// hypervisor walks, so nothing must precede resume.
func (s *Source) CorePFNs() ([]uint64, error) { return nil, nil }

// Resume implements engine.Source.
func (s *Source) Resume() error {
	_, err := s.g.call(request{Op: "resume", States: s.states})
	return err
}

// Destroy implements engine.Source.
func (s *Source) Destroy() error { return s.g.exit() }

// Dest is a lab domain being received.
//
// Its memory is registered with the userfaultfd in MISSING and WP modes
// (WP_ASYNC), and every page is placed write-protected: data pages with
// UFFDIO_COPY in WP mode, zero pages (UFFDIO_ZEROPAGE has no WP mode) with
// UFFDIO_ZEROPAGE then UFFDIO_WRITEPROTECT, or once the guest runs, short
// runs as copies of a zero buffer (see placeRunning). The guest's first
// write to a page then clears its protection in the kernel, without a
// message, and PAGEMAP_SCAN reports the page written: that is how ReadBack
// knows which pages hold the guest's content rather than the source's.
// Writes of our own (pre-copy overwrites) are followed by
// UFFDIO_WRITEPROTECT, so they never count as the guest's.
type Dest struct {
	g    *guestProc
	u    *uffd.UFFD
	pm   *uffd.Pagemap // the guest's pagemap: its written pages
	msgs []uffd.Msg

	// resumeMu is held shared by placements that rely on the guest not
	// running (resumed false), and exclusively by Resume to set resumed.
	resumeMu sync.RWMutex
	resumed  bool
	// zeroWritten has a bit for each page the resumed guest wrote while it
	// was being placed as a zero page, before its write protection: the
	// kernel's record does not show those writes.
	zeroWritten []uint64
	regs        []uffd.Region // ReadBack's scan buffer (ReadBack is not concurrent)
	closeMu     sync.Once
}

// NewDest creates the destination lab domain described by a stream's
// domain header (its Config is the source's lab Config).
func NewDest(h *wire.DomainHeader) (*Dest, error) {
	if h.Backend != Backend {
		return nil, fmt.Errorf("this receiver hosts lab domains, the stream carries a %q domain", h.Backend)
	}
	var cfg Config
	if err := json.Unmarshal(h.Config, &cfg); err != nil {
		return nil, fmt.Errorf("lab domain config: %w", err)
	}
	if cfg.Pages != h.NumPages || h.PageSize != pageSize {
		return nil, fmt.Errorf("lab domain config says %d pages, stream header %d pages of %d bytes", cfg.Pages, h.NumPages, h.PageSize)
	}
	g, pass, err := startGuest(cfg, "dest")
	if err != nil {
		return nil, err
	}
	fd, err := uffd.RecvFD(pass)
	pass.Close()
	if err != nil {
		g.kill()
		return nil, fmt.Errorf("receive the lab guest's userfaultfd: %w", err)
	}
	if err := g.hello(); err != nil {
		unix.Close(fd)
		g.kill()
		return nil, err
	}
	pm, err := uffd.OpenPagemap(g.pid)
	if err != nil {
		unix.Close(fd)
		g.kill()
		return nil, err
	}
	return &Dest{g: g, u: uffd.FromFD(fd), pm: pm, msgs: make([]uffd.Msg, 256), zeroWritten: make([]uint64, (cfg.Pages+63)/64)}, nil
}

// Report returns the guest's counters.
func (d *Dest) Report() (Report, error) { return d.g.Report() }

// Exit stops the guest after the migration (the lab's end of life).
func (d *Dest) Exit() error {
	d.pm.Close()
	return d.g.exit()
}

// Test hooks: placedHook is called after each run of pages is placed;
// zeroPlacedHook between mapping a run of zero pages for the running guest
// and protecting it, where a vCPU's write is not in the kernel's record.
var (
	placedHook     func(d *Dest, run []engine.Page)
	zeroPlacedHook func(d *Dest, first uint64, pages int)
)

// Place implements engine.Dest with UFFDIO_COPY (WP mode) / UFFDIO_ZEROPAGE
// over runs of consecutive pages, write-protected (see Dest); before resume
// a page already present is overwritten in place (a pre-copy round re-sent
// it) and protected again.
func (d *Dest) Place(pages []engine.Page) error {
	for i := 0; i < len(pages); {
		j := i + 1
		zero := pages[i].Data == nil
		for j < len(pages) && pages[j].PFN == pages[j-1].PFN+1 && (pages[j].Data == nil) == zero &&
			(zero || contiguous(pages[j-1].Data, pages[j].Data)) {
			j++
		}
		if err := d.placeRun(pages[i:j], zero); err != nil {
			return err
		}
		if placedHook != nil {
			placedHook(d, pages[i:j])
		}
		i = j
	}
	return nil
}

// contiguous says whether b starts where a ends. (Compared as integers:
// a pointer just past a's allocation is not a valid pointer, and the race
// detector's checkptr rejects forming it.)
func contiguous(a, b []byte) bool {
	return uintptr(unsafe.Pointer(unsafe.SliceData(b))) == uintptr(unsafe.Pointer(unsafe.SliceData(a)))+uintptr(len(a))
}

func (d *Dest) placeRun(run []engine.Page, zero bool) error {
	d.resumeMu.RLock()
	if !d.resumed {
		defer d.resumeMu.RUnlock()
		return d.placeStopped(run, zero)
	}
	d.resumeMu.RUnlock()
	return d.placeRunning(run, zero)
}

// placeStopped places a run before the resume: the guest does not run, so
// nothing can write between placing a page and protecting it.
func (d *Dest) placeStopped(run []engine.Page, zero bool) error {
	addr := d.g.base + uintptr(run[0].PFN)*pageSize
	n := uintptr(len(run)) * pageSize
	var err error
	if zero {
		err = d.u.ZeroPage(addr, n, true)
	} else {
		err = d.u.CopyWP(addr, unsafe.Slice(unsafe.SliceData(run[0].Data), int(n)), true)
	}
	if err != nil {
		if !errors.Is(err, uffd.ErrExist) {
			return fmt.Errorf("place pfn %#x+%d: %w", run[0].PFN, len(run), err)
		}
		// Some pages were present: overwrite each (the others were placed).
		zeroPage := make([]byte, pageSize)
		for _, p := range run {
			data := p.Data
			if data == nil {
				data = zeroPage
			}
			if err := d.g.writev(p.PFN, data); err != nil {
				return err
			}
		}
	} else if !zero {
		return nil
	}
	// Zero pages, and pages our writes marked written: protect them.
	if err := d.u.WriteProtect(addr, n, true); err != nil {
		return fmt.Errorf("place pfn %#x+%d: %w", run[0].PFN, len(run), err)
	}
	return nil
}

// zeroCopyMax is the longest run of zero pages the resumed guest gets as
// copies of a zero buffer (UFFDIO_COPY in WP mode, one ioctl, about 1 µs a
// page); longer runs are mapped to the shared zero page and protected
// after (UFFDIO_ZEROPAGE, UFFDIO_WRITEPROTECT, PAGEMAP_SCAN, UFFDIO_WAKE:
// about 4 µs plus 0.25 µs a page, and no memory).
const zeroCopyMax = 4

var zeroPages = make([]byte, zeroCopyMax*pageSize) // never written

// placeRunning places a run the resumed guest is waiting for or may touch.
// Long runs of zero pages are mapped without waking their waiters and
// write-protected; a vCPU that wrote one in between replaced it by a copy
// of its own, so the pages no longer on the zero pfn afterwards are the
// guest's writes.
func (d *Dest) placeRunning(run []engine.Page, zero bool) error {
	addr := d.g.base + uintptr(run[0].PFN)*pageSize
	n := uintptr(len(run)) * pageSize
	if !zero || len(run) <= zeroCopyMax {
		var src []byte
		if zero {
			src = zeroPages[:n]
		} else {
			src = unsafe.Slice(unsafe.SliceData(run[0].Data), int(n))
		}
		if err := d.u.CopyWP(addr, src, true); err != nil {
			return fmt.Errorf("place pfn %#x+%d: %w", run[0].PFN, len(run), err)
		}
		return nil
	}
	if err := d.u.ZeroPage(addr, n, false); err != nil {
		// Not protected (protecting pages not placed would leave markers
		// UFFDIO_ZEROPAGE refuses): those placed read as written, which
		// exempts them from the check but never fails a good migration.
		_ = d.u.Wake(addr, n)
		return fmt.Errorf("place pfn %#x+%d: %w", run[0].PFN, len(run), err)
	}
	if zeroPlacedHook != nil {
		zeroPlacedHook(d, run[0].PFN, len(run))
	}
	werr := d.u.WriteProtect(addr, n, true)
	var regs []uffd.Region
	var serr error
	if werr == nil {
		regs, serr = d.pm.Scan(addr, addr+n, uffd.PageIsPFNZero, 0, nil)
	}
	if err := d.u.Wake(addr, n); err != nil {
		return fmt.Errorf("place pfn %#x+%d: %w", run[0].PFN, len(run), err)
	}
	if werr != nil {
		return fmt.Errorf("place pfn %#x+%d: %w", run[0].PFN, len(run), werr)
	}
	if serr != nil {
		// Which pages were written is unknown: count them all.
		regs = []uffd.Region{{Start: uint64(addr), End: uint64(addr + n)}}
	}
	for _, r := range regs {
		for a := uintptr(r.Start); a < uintptr(r.End); a += pageSize {
			p := uint64((a - d.g.base) / pageSize)
			atomic.OrUint64(&d.zeroWritten[p>>6], 1<<(p&63))
		}
	}
	return nil
}

// overwrite replaces a present page's content with data, behind the
// guest's back: it does not count as the guest's write.
func (d *Dest) overwrite(pfn uint64, data []byte) error {
	if err := d.g.writev(pfn, data); err != nil {
		return err
	}
	return d.u.WriteProtect(d.g.base+uintptr(pfn)*pageSize, pageSize, true)
}

// ReadBack implements engine.ReadBacker: the pages as the guest's memory
// holds them (process_vm_readv), then those of them the guest has written
// since the resume: the PAGEMAP_SCAN written bits collected after the
// read (a page written before it was read is reported; one written after
// may be, which does no harm), and the zero pages written while placed.
func (d *Dest) ReadBack(pfns []uint64, buf []byte) ([]uint64, error) {
	if len(pfns) == 0 {
		return nil, nil
	}
	if err := d.g.readv(pfns, buf); err != nil {
		return nil, err
	}
	lo, hi := pfns[0], pfns[0]
	for _, p := range pfns {
		lo, hi = min(lo, p), max(hi, p)
	}
	hi++
	var err error
	d.regs, err = d.pm.ScanWritten(d.g.base+uintptr(lo)*pageSize, d.g.base+uintptr(hi)*pageSize, false, d.regs[:0])
	if err != nil {
		return nil, fmt.Errorf("scan the lab guest's written pages: %w", err)
	}
	w := make([]bool, hi-lo)
	for _, r := range d.regs {
		for a := uintptr(r.Start); a < uintptr(r.End); a += pageSize {
			w[(a-d.g.base)/pageSize-uintptr(lo)] = true
		}
	}
	var out []uint64
	for _, p := range pfns {
		if w[p-lo] || atomic.LoadUint64(&d.zeroWritten[p>>6])&(1<<(p&63)) != 0 {
			out = append(out, p)
		}
	}
	return out, nil
}

// Discard implements engine.Dest.
func (d *Dest) Discard(pfns []uint64) error {
	for i := 0; i < len(pfns); i += 8192 {
		if _, err := d.g.call(request{Op: "discard", PFNs: pfns[i:min(len(pfns), i+8192)]}); err != nil {
			return err
		}
	}
	return nil
}

// ReadFaults implements engine.Dest.
func (d *Dest) ReadFaults(dst []uint64) ([]uint64, error) {
	n, err := d.u.ReadMsgs(d.msgs)
	if err != nil {
		if errors.Is(err, uffd.ErrClosed) {
			return nil, engine.ErrClosed
		}
		return nil, err
	}
	dst = dst[:0]
	for _, m := range d.msgs[:n] {
		if m.Event != uffd.EventPagefault {
			continue
		}
		a := uintptr(m.Address)
		if a < d.g.base {
			continue
		}
		dst = append(dst, uint64((a-d.g.base)/pageSize))
	}
	return dst, nil
}

// Resume implements engine.Dest.
func (d *Dest) Resume(core []byte) error {
	var states []VCPUState
	if err := json.Unmarshal(core, &states); err != nil {
		return fmt.Errorf("lab core state: %w", err)
	}
	d.resumeMu.Lock() // placements relying on a stopped guest are over
	d.resumed = true
	d.resumeMu.Unlock()
	_, err := d.g.call(request{Op: "resume", States: states})
	return err
}

// Destroy implements engine.Dest.
func (d *Dest) Destroy() error {
	d.Close()
	d.pm.Close()
	d.g.kill()
	return nil
}

// Close implements engine.Dest: fault delivery stops, and the working set
// stops growing (it counts pages touched during the migration).
func (d *Dest) Close() error {
	d.closeMu.Do(func() {
		_, _ = d.g.call(request{Op: "track-stop"})
		d.u.Interrupt()
	})
	return nil
}

// GuestReport implements engine.Reporter.
func (d *Dest) GuestReport() engine.GuestReport {
	r, err := d.g.Report()
	if err != nil {
		return engine.GuestReport{}
	}
	return engine.GuestReport{WorkingSet: r.Touched, Progress: r.Ops, IntegrityErrors: r.Integrity}
}
