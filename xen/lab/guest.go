package lab

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/xl-postcopy/xl-postcopy/xen/uffd"
)

// The lab domain runs in a child process of the migration tool: its vCPUs
// are threads touching an anonymous mapping. A separate process is not a
// convenience but a necessity: a Go thread that faults on a missing page
// blocks while holding its scheduler slot, and if the thread that serves
// faults needed that slot too the process would deadlock. The child owns
// the memory; the parent reads it (process_vm_readv), tracks its writes
// (PAGEMAP_SCAN on /proc/<child>/pagemap) and, at the destination, serves
// its faults through the userfaultfd the child hands over.

// envGuest names the environment variable that turns a re-executed
// xl-postcopy (or test binary) into a lab guest; its value is the JSON
// guestConfig.
const envGuest = "XLPC_LAB_GUEST"

// Child file descriptors (ExtraFiles order).
const (
	fdCtrl = 3 // JSON requests and replies
	fdPass = 4 // SCM_RIGHTS: the destination's userfaultfd
)

// pageMagic marks every initialised page: word 0 of page p holds
// pageMagic ^ p, which the workload checks on every operation, so a page
// that arrived wrong, zeroed or at the wrong pfn is caught in the guest.
const pageMagic = 0x584C50435F50470A

// guestConfig is what a child is started with.
type guestConfig struct {
	Role     string       `json:"role"` // "source" or "dest"
	Pages    uint64       `json:"pages"`
	Zero     uint64       `json:"zero"` // tail pages left zero (free memory)
	VCPUs    int          `json:"vcpus"`
	Workload WorkloadSpec `json:"workload"`
}

type request struct {
	Op     string      `json:"op"`
	States []VCPUState `json:"states,omitempty"`
	PFNs   []uint64    `json:"pfns,omitempty"`
}

type reply struct {
	Err     string      `json:"err,omitempty"`
	Base    uint64      `json:"base,omitempty"`
	States  []VCPUState `json:"states,omitempty"`
	Report  *report     `json:"report,omitempty"`
	Touched uint64      `json:"touched,omitempty"`
}

type report struct {
	Ops       uint64 `json:"ops"`
	Touched   uint64 `json:"touched"`
	Integrity uint64 `json:"integrity"`
	Running   bool   `json:"running"`
}

// IsGuest reports whether this process was started as a lab guest; main
// functions (and TestMain of packages that start lab domains) call
// GuestMain first when it is.
func IsGuest() bool { return os.Getenv(envGuest) != "" }

// GuestMain runs the lab guest and returns the process exit code.
func GuestMain() int {
	var cfg guestConfig
	if err := json.Unmarshal([]byte(os.Getenv(envGuest)), &cfg); err != nil {
		fmt.Fprintf(os.Stderr, "lab guest: bad %s: %v\n", envGuest, err)
		return 2
	}
	// vCPU threads may block in faults while holding a P: leave room for
	// the control goroutine and the runtime.
	runtime.GOMAXPROCS(cfg.VCPUs + 2)
	g, err := newGuest(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "lab guest: %v\n", err)
		return 1
	}
	if err := g.serve(); err != nil {
		fmt.Fprintf(os.Stderr, "lab guest: %v\n", err)
		return 1
	}
	return 0
}

type vcpu struct {
	st   VCPUState
	ops  atomic.Uint64 // mirrors st.Ops for reports
	sink uint64
	_    [64]byte // keep vCPUs' hot fields on separate cache lines
}

type guest struct {
	cfg   guestConfig
	wl    Workload
	mem   []byte
	base  unsafe.Pointer
	vcpus []*vcpu

	paused   atomic.Bool
	running  atomic.Bool
	tracking atomic.Bool
	parked   sync.WaitGroup
	unpark   atomic.Pointer[chan struct{}] // closed to release parked vCPUs
	mu       sync.Mutex                    // serialises pause and start
	started  bool

	touched   []uint64
	integrity atomic.Uint64

	wp *uffd.UFFD // source: write-protect tracking
	mf *uffd.UFFD // dest: missing-page faults and write tracking (handed to the parent)
}

func newGuest(cfg guestConfig) (*guest, error) {
	wl, err := NewWorkload(cfg.Workload)
	if err != nil {
		return nil, err
	}
	size := int(cfg.Pages) * pageSize
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("map %d MiB of guest memory: %w", size>>20, err)
	}
	g := &guest{cfg: cfg, wl: wl, mem: mem, base: unsafe.Pointer(&mem[0]), touched: make([]uint64, (cfg.Pages+63)/64)}
	ch := make(chan struct{})
	g.unpark.Store(&ch)
	for i := 0; i < cfg.VCPUs; i++ {
		g.vcpus = append(g.vcpus, &vcpu{st: InitState(i, cfg.Workload.Seed)})
	}
	switch cfg.Role {
	case "source":
		g.fill()
	case "dest":
		// MISSING: the parent serves the faults. WP with WP_ASYNC: the
		// parent places every page write-protected, so that the guest's
		// first write to it is recorded (PAGEMAP_SCAN) and the migration
		// can be verified from this memory (Dest.ReadBack).
		u, err := uffd.Open(uffd.FeatureWPAsync | uffd.FeatureWPUnpopulated)
		if err != nil {
			return nil, fmt.Errorf("userfaultfd with write-protect tracking (Linux ≥ 6.7): %w", err)
		}
		if err := u.Register(uintptr(g.base), uintptr(size), uffd.RegisterMissing|uffd.RegisterWP); err != nil {
			return nil, fmt.Errorf("register guest memory for missing faults and write tracking: %w", err)
		}
		g.mf = u
	default:
		return nil, fmt.Errorf("unknown role %q", cfg.Role)
	}
	return g, nil
}

// fill gives every usable page its marker and pseudo-random contents; the
// zero tail stays untouched, like free memory.
func (g *guest) fill() {
	usable := g.cfg.Pages - g.cfg.Zero
	for p := uint64(0); p < usable; p++ {
		w := unsafe.Slice((*uint64)(unsafe.Add(g.base, p*pageSize)), pageSize/8)
		w[0] = pageMagic ^ p
		x := p*0x9E3779B97F4A7C15 | 1
		for i := 1; i < len(w); i++ {
			w[i] = xorshift(&x)
		}
	}
}

func (g *guest) serve() error {
	ctrl, err := net.FileConn(os.NewFile(fdCtrl, "ctrl"))
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	dec := json.NewDecoder(ctrl)
	enc := json.NewEncoder(ctrl)
	hello := reply{Base: uint64(uintptr(g.base))}
	if g.mf != nil {
		pc, err := net.FileConn(os.NewFile(fdPass, "pass"))
		if err != nil {
			return fmt.Errorf("fd socket: %w", err)
		}
		if err := uffd.SendFD(pc.(*net.UnixConn), g.mf.FD()); err != nil {
			return fmt.Errorf("hand userfaultfd to the migration tool: %w", err)
		}
		pc.Close()
	} else {
		g.start(nil)
	}
	if err := enc.Encode(hello); err != nil {
		return err
	}
	for {
		var req request
		if err := dec.Decode(&req); err != nil {
			return nil // parent gone: the domain dies with its tool
		}
		rep := g.handle(&req)
		if err := enc.Encode(rep); err != nil {
			return nil
		}
		if req.Op == "exit" {
			return nil
		}
	}
}

func (g *guest) handle(req *request) (rep reply) {
	fail := func(err error) reply { return reply{Err: err.Error()} }
	size := uintptr(len(g.mem))
	switch req.Op {
	case "dirtylog-start":
		u, err := uffd.Open(uffd.FeatureWPAsync | uffd.FeatureWPUnpopulated)
		if err != nil {
			return fail(fmt.Errorf("dirty tracking needs userfaultfd write-protect (Linux ≥ 6.7): %w", err))
		}
		if err := u.Register(uintptr(g.base), size, uffd.RegisterWP); err != nil {
			u.Close()
			return fail(fmt.Errorf("register write-protect: %w", err))
		}
		if err := u.WriteProtect(uintptr(g.base), size, true); err != nil {
			u.Close()
			return fail(fmt.Errorf("write-protect guest memory: %w", err))
		}
		g.wp = u
	case "dirtylog-stop":
		if g.wp != nil {
			_ = g.wp.WriteProtect(uintptr(g.base), size, false)
			g.wp.Close()
			g.wp = nil
		}
	case "pause":
		g.pause()
		for _, v := range g.vcpus {
			rep.States = append(rep.States, v.st)
		}
	case "resume":
		if len(req.States) != 0 && len(req.States) != len(g.vcpus) {
			return fail(fmt.Errorf("core state has %d vCPUs, domain has %d", len(req.States), len(g.vcpus)))
		}
		g.start(req.States)
	case "track":
		g.tracking.Store(true)
	case "track-stop":
		g.tracking.Store(false)
	case "discard":
		err := pageRuns(req.PFNs, func(i, j int) error {
			lo, hi := req.PFNs[i], req.PFNs[j-1]+1
			if hi > g.cfg.Pages {
				return fmt.Errorf("discard pfn %d beyond %d pages", hi-1, g.cfg.Pages)
			}
			if err := unix.Madvise(g.mem[lo*pageSize:hi*pageSize], unix.MADV_DONTNEED); err != nil {
				return fmt.Errorf("discard pfns %d-%d: %w", lo, hi-1, err)
			}
			return nil
		})
		if err != nil {
			return fail(err)
		}
	case "report":
		r := &report{Integrity: g.integrity.Load(), Running: g.running.Load()}
		for _, v := range g.vcpus {
			r.Ops += v.ops.Load()
		}
		for i := range g.touched {
			r.Touched += uint64(popcount(atomic.LoadUint64(&g.touched[i])))
		}
		rep.Report = r
	case "exit":
	default:
		return fail(fmt.Errorf("unknown op %q", req.Op))
	}
	return rep
}

// start runs (or, after a pause, resumes) the vCPUs from states.
func (g *guest) start(states []VCPUState) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for i, s := range states {
		g.vcpus[i].st = s
		g.vcpus[i].ops.Store(s.Ops)
	}
	if g.cfg.Role == "dest" {
		g.tracking.Store(true)
	}
	g.paused.Store(false)
	g.running.Store(true)
	if !g.started {
		g.started = true
		for _, v := range g.vcpus {
			go g.run(v)
		}
		return
	}
	ch := make(chan struct{})
	old := g.unpark.Swap(&ch)
	close(*old)
}

// pause stops every vCPU at an operation boundary and waits for it.
func (g *guest) pause() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.running.Load() {
		return
	}
	g.parked.Add(len(g.vcpus))
	g.paused.Store(true)
	g.parked.Wait()
	g.running.Store(false)
}

func (g *guest) run(v *vcpu) {
	runtime.LockOSThread()
	for {
		if g.paused.Load() {
			// start swaps in a new channel before clearing paused and
			// closes the old one, so this wait always ends on resume.
			ch := g.unpark.Load()
			g.parked.Done()
			<-*ch
			continue
		}
		g.step(v)
	}
}

// step performs one workload operation: compute, then touch one line.
func (g *guest) step(v *vcpu) {
	st := &v.st
	pfn, line, write := g.wl.Next(st)
	x := st.RNG | 1
	for i := 0; i < g.cfg.Workload.OpCost; i++ {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
	}
	page := unsafe.Add(g.base, pfn*pageSize)
	if *(*uint64)(page) != pageMagic^pfn {
		g.integrity.Add(1)
	}
	w := (*[8]uint64)(unsafe.Add(page, uintptr(line)*64))
	if write {
		w[1] = x
	} else {
		v.sink += w[1] + w[7]
	}
	v.sink += x
	if g.tracking.Load() {
		atomic.OrUint64(&g.touched[pfn>>6], 1<<(pfn&63))
	}
	st.Ops++
	v.ops.Store(st.Ops)
}

func popcount(x uint64) int {
	n := 0
	for x != 0 {
		x &= x - 1
		n++
	}
	return n
}

// pageSize is the lab domain's page size (x86's).
const pageSize = 4096
