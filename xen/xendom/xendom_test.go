package xendom

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

const testXLConfig = "name = 'vm1'\ntype = 'pvh'\nmemory = 4\nhap = 1\n"

// rig is one source domain, the fakes, and what a migration left behind.
type rig struct {
	hv    *fakeHV
	xs    *fakeStore
	xl    *fakeXL
	src   *fdom
	dest  *Dest
	st    *engine.Stats
	ds    *engine.DestStats
	serr  error
	derr  error
	srcBE *Source
	pipes bool // net.Pipe instead of loopback TCP
	// beforeRun runs between NewSource and the migration (the source's
	// setup is done, the guest still runs).
	beforeRun func()

	touchMu  sync.Mutex
	touched  map[uint64][]byte
	touchErr []error
	vcpuDone chan struct{}
}

func newRig(t *testing.T, holes ...uint64) *rig {
	t.Helper()
	hv := newFakeHV()
	r := &rig{hv: hv, xs: &fakeStore{h: hv}, xl: &fakeXL{h: hv}, touched: map[uint64][]byte{}, vcpuDone: make(chan struct{})}
	r.src = hv.newGuestDomain("src", holes...)
	return r
}

// startDestGuest makes the destination's vCPUs run once unpaused: they
// read random gfns, faulting through the paging ring.
func (r *rig) startDestGuest(touches int, seed int64) {
	r.hv.onUnpause = func(dom uint32) {
		if dom == r.src.id {
			return
		}
		go func() {
			defer close(r.vcpuDone)
			rng := rand.New(rand.NewSource(seed))
			deadline := time.Now().Add(10 * time.Second)
			for i := 0; i < touches; i++ {
				g := uint64(rng.Intn(fRAMPages))
				p, err := r.hv.touch(dom, uint32(i%2), g, deadline)
				r.touchMu.Lock()
				if err != nil && len(r.touchErr) < 5 {
					r.touchErr = append(r.touchErr, err)
				} else if p != nil {
					r.touched[g] = p
				}
				r.touchMu.Unlock()
				if err != nil && strings.Contains(err.Error(), "no pager") {
					return
				}
			}
		}()
	}
}

func (r *rig) migrate(t *testing.T, mode wire.Mode) {
	t.Helper()
	s, err := NewSource(SourceOptions{HV: r.hv, XS: r.xs, XL: r.xl, Dom: r.src.id, Name: "vm1",
		XLConfig: []byte(testXLConfig), SuspendTimeout: 3 * time.Second, Logf: t.Logf})
	require.NoError(t, err)
	r.srcBE = s
	if r.beforeRun != nil {
		r.beforeRun()
	}
	factory := NewFactory(DestOptions{HV: r.hv, XL: r.xl, Poll: 2 * time.Millisecond, Logf: t.Logf})
	var dmu sync.Mutex
	wrapped := func(h *wire.DomainHeader) (engine.Dest, error) {
		d, err := factory(h)
		if err != nil {
			return nil, err
		}
		dmu.Lock()
		r.dest = d.(*Dest)
		dmu.Unlock()
		return d, nil
	}
	var a1, a2, b1, b2 net.Conn
	if r.pipes {
		// In order: RunDest reads the first stream header from its first
		// argument, and a pipe has no buffer to hold the other one.
		a1, b1 = net.Pipe()
		a2, b2 = net.Pipe()
	} else {
		a1, a2, b2, b1 = tcpPairs(t) // swapped: RunDest must sort them
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.ds, r.derr = engine.RunDest(ctx, b1, b2, wrapped, engine.DestOptions{})
	}()
	r.st, r.serr = engine.RunSource(ctx, s, a1, a2, engine.Options{Mode: mode, Prepaging: "dual", BatchPages: 16,
		WindowBytes: 128 << 10, MaxRounds: 3})
	<-done
}

// tcpPairs returns two loopback TCP connections (a1-b1, a2-b2). net.Pipe
// alone cannot test RunDest's sorting of the streams: it has no buffer,
// and RunDest reads the two stream headers in its argument order while
// RunSource writes bulk's first, so swapped pipes deadlock.
func tcpPairs(t *testing.T) (a1, a2, b1, b2 net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	pair := func() (net.Conn, net.Conn) {
		a, err := net.Dial("tcp", l.Addr().String())
		require.NoError(t, err)
		b, err := l.Accept()
		require.NoError(t, err)
		return a, b
	}
	a1, b1 = pair()
	a2, b2 = pair()
	return
}

// requireSound checks a migration that must have succeeded: no error on
// either side, the destination guest's touches done, every page verified
// and sent once.
func (r *rig) requireSound(t *testing.T) {
	t.Helper()
	require.NoError(t, r.serr)
	require.NoError(t, r.derr)
	<-r.vcpuDone
	require.True(t, r.st.Verified)
	require.Zero(t, r.st.RedundantPages)
}

func (r *rig) destDom(t *testing.T) *fdom {
	t.Helper()
	r.xl.mu.Lock()
	id := r.xl.lastDom
	r.xl.mu.Unlock()
	require.NotZero(t, id, "no destination domain created")
	r.hv.mu.Lock()
	defer r.hv.mu.Unlock()
	return r.hv.doms[id]
}

// srcRAM lists the gfns the source sends: RAM at suspend, not special.
func (r *rig) srcRAM() []uint64 {
	var out []uint64
	for g := range r.src.snapshot {
		if !slices.Contains(special, g) {
			out = append(out, g)
		}
	}
	slices.Sort(out)
	return out
}

// checkSameMemory holds every RAM gfn at the destination against the
// source's content at suspend time, and the special gfns against the
// destination's own.
func (r *rig) checkSameMemory(t *testing.T, dst *fdom) {
	t.Helper()
	r.hv.mu.Lock()
	defer r.hv.mu.Unlock()
	ram := r.srcRAM()
	require.Len(t, ram, len(r.src.snapshot)-len(special))
	for _, g := range ram {
		require.Equal(t, gsRAM, dst.state[g], "gfn %#x not resident at the destination", g)
		require.True(t, bytes.Equal(r.src.snapshot[g], dst.mem[g]), "gfn %#x differs from the source at suspend", g)
	}
	for _, g := range special {
		require.False(t, dst.loaded[g], "special gfn %#x was written at the destination", g)
		require.Zero(t, dst.evictions[g], "special gfn %#x was paged out", g)
		require.Equal(t, pageOf("kernel special", g), dst.mem[g], "special gfn %#x lost the destination's own content", g)
	}
	require.Empty(t, r.hv.errs, "protocol violations seen by the fake hypervisor")
}

func TestPostcopyMigrationEndToEnd(t *testing.T) {
	r := newRig(t)
	r.pipes = true
	writes := r.hv.runGuest(r.src, 1, 20*time.Microsecond)
	r.startDestGuest(300, 7)
	time.Sleep(20 * time.Millisecond) // the guest dirties memory before the migration starts
	r.migrate(t, wire.ModePostcopy)
	require.NoError(t, r.serr)
	require.NoError(t, r.derr)
	select {
	case <-r.vcpuDone:
	case <-time.After(5 * time.Second):
		t.Fatal("destination vCPU did not finish its touches")
	}
	require.Greater(t, writes(), 0, "the source guest wrote nothing before suspending")

	require.True(t, r.st.Verified)
	require.Zero(t, r.st.RedundantPages)
	// Every RAM page once, and the early core pages the running guest
	// wrote after they went once more in the pause.
	require.Equal(t, uint64(len(r.srcRAM()))+r.st.EarlyCoreRedirtied, r.st.PagesSent, "every RAM page exactly once")
	require.Equal(t, r.st.EarlyCoreRedirtied, r.st.ResentPages)
	require.NotNil(t, r.src.snapshot, "the source guest never suspended")

	dst := r.destDom(t)
	r.checkSameMemory(t, dst)

	// The destination guest's reads saw the source's memory, and some of
	// them went through the paging ring.
	r.touchMu.Lock()
	require.Empty(t, r.touchErr)
	require.NotEmpty(t, r.touched)
	for g, p := range r.touched {
		require.Equal(t, r.src.snapshot[g], p, "vCPU read of gfn %#x", g)
	}
	r.touchMu.Unlock()
	r.hv.mu.Lock()
	requests := dst.ring.requests
	r.hv.mu.Unlock()
	require.Greater(t, requests, 0, "no touch faulted through the ring")
	require.Equal(t, uint64(requests), r.dest.Stats().Requests)
	// QEMU's blocktime: all vCPUs blocked at once is never longer than
	// any one vCPU's blocked time; the vCPUs that faulted waited.
	require.NotNil(t, r.st.BlocktimeMs, "a Xen destination knows its blocktime")
	require.NotEmpty(t, r.st.VCPUBlocktimeMs)
	sum := 0.0
	for _, v := range r.st.VCPUBlocktimeMs {
		require.LessOrEqual(t, *r.st.BlocktimeMs, v)
		sum += v
	}
	require.Greater(t, sum, 0.0)

	// Page tables were in before the guest ran; the registers and TSC
	// are the source's.
	r.hv.mu.Lock()
	for _, g := range kernelPTGFNs {
		require.True(t, dst.loadedAtUnpause[g], "kernel page-table gfn %#x not loaded before unpause", g)
	}
	// Both vCPUs' per-CPU areas: 2 x 64 pages from gfn 0x200.
	for g := uint64(0x200); g < 0x200+2*PerCPUSpan/PageSize; g++ {
		require.True(t, dst.loadedAtUnpause[g], "per-CPU gfn %#x not loaded before unpause", g)
	}
	require.Equal(t, r.src.hvm, dst.setHVM)
	require.NotNil(t, dst.setTSC)
	require.Equal(t, r.src.tsc, *dst.setTSC)
	require.Empty(t, r.src.resumes, "the source was resumed after a successful migration")
	r.hv.mu.Unlock()
	require.Equal(t, uint64(len(kernelPTGFNs)), r.srcBE.Stats().PageTablePages)
	require.Equal(t, uint64(2*PerCPUSpan/PageSize), r.srcBE.Stats().PerCPUPages)
	// The core pages were found at setup too: kept resident at the
	// destination (never paged out) and written in a few batches.
	core := uint64(len(kernelPTGFNs) + 2*PerCPUSpan/PageSize)
	ss, ds := r.srcBE.Stats(), r.dest.Stats()
	require.Equal(t, core, ss.ResidentHint)
	require.Zero(t, ss.HintStale)
	require.Zero(t, ss.HintMissed)
	require.Equal(t, core, ds.Resident)
	require.Equal(t, core, ds.ResidentWritten)
	require.Zero(t, ds.ResidentLate)
	// They went before the pause; in the pause only those written since.
	require.Equal(t, core, r.st.EarlyCorePages)
	require.LessOrEqual(t, r.st.EarlyCoreRedirtied, core)
	require.Equal(t, r.st.EarlyCoreRedirtied, ds.Overwritten)
	require.Equal(t, uint64(fRAMPages)-core, ds.Evicted)
	r.hv.mu.Lock()
	for _, g := range kernelPTGFNs {
		require.Zero(t, dst.evictions[g], "kernel page-table gfn %#x was paged out", g)
	}
	require.Positive(t, r.hv.writeBatches)
	require.Less(t, r.hv.writeBatches, int(core)/4, "resident pages written one by one")
	r.hv.mu.Unlock()
	// PD 102's entry beyond max gpfn is in the user half: not walked.
	require.Equal(t, uint64(0), r.srcBE.Stats().WalkSkipped)

	// Toolstack: NAME--incoming created from the source's config, the
	// source renamed away and destroyed, the destination kept.
	r.xl.mu.Lock()
	defer r.xl.mu.Unlock()
	require.Equal(t, []string{"vm1--incoming"}, r.xl.created)
	require.Equal(t, []string{testXLConfig}, r.xl.configs)
	require.Equal(t, []string{fmt.Sprintf("%d:vm1--migratedaway", r.src.id)}, r.xl.renames)
	require.Equal(t, []uint32{r.src.id}, r.xl.destroyed)
}

// A gfn ballooned out at the source is released at the destination and
// never sent; a gfn the fresh destination lacks is populated.
func TestBallooningReconciled(t *testing.T) {
	const ballooned, missing = 500, 600
	r := newRig(t, ballooned)
	r.hv.destShape = func(d *fdom) {
		delete(d.state, missing)
		delete(d.mem, missing)
	}
	r.startDestGuest(50, 3)
	r.migrate(t, wire.ModePostcopy)
	require.NoError(t, r.serr)
	require.NoError(t, r.derr)
	require.True(t, r.st.Verified)
	require.Equal(t, uint64(fRAMPages-1), r.st.PagesSent)
	dst := r.destDom(t)
	r.checkSameMemory(t, dst)
	r.hv.mu.Lock()
	defer r.hv.mu.Unlock()
	require.Equal(t, []uint64{ballooned}, dst.decreased)
	require.Equal(t, []uint64{missing}, dst.populated)
	require.Equal(t, gsAbsent, dst.state[ballooned])
	require.False(t, dst.loaded[ballooned])
	require.Zero(t, dst.evictions[ballooned])
	require.Equal(t, r.src.snapshot[missing], dst.mem[missing])
	st := r.dest.Stats()
	require.Equal(t, uint64(1), st.Released)
	require.Equal(t, uint64(1), st.Populated)
}

// A destination that cannot enable paging fails the migration before the
// guest is even asked to suspend: the source runs on, the half-made
// destination is destroyed.
func TestFailureBeforeSuspendKeepsSourceRunning(t *testing.T) {
	r := newRig(t)
	r.hv.enablePagingErr = errors.New("vm_event ring busy")
	r.migrate(t, wire.ModePostcopy)
	require.Error(t, r.serr)
	require.Contains(t, r.serr.Error(), "vm_event ring busy")
	require.Contains(t, r.serr.Error(), "enable vm_event paging")
	r.hv.mu.Lock()
	require.False(t, r.src.info.Shutdown, "source left suspended")
	require.False(t, r.src.info.Dying)
	r.hv.mu.Unlock()
	dst := r.destDom(t)
	r.xl.mu.Lock()
	defer r.xl.mu.Unlock()
	require.Equal(t, []uint32{dst.id}, r.xl.destroyed, "only the destination is destroyed")
	require.Empty(t, r.xl.renames)
	r.xs.mu.Lock()
	defer r.xs.mu.Unlock()
	require.NotContains(t, r.xs.writes, fmt.Sprintf("/local/domain/%d/control/shutdown=suspend", r.src.id))
}

// A failure after the guest suspended but before GO (a page-table page
// cannot be loaded) resumes the suspended guest with a fast resume. The
// page went before the pause with the early core pages; the guest writes
// it while suspending, so it goes again in the pause, and that write fails.
func TestFailureAfterSuspendResumesSource(t *testing.T) {
	r := newRig(t)
	r.hv.onSuspend = func(dom uint32) {
		if dom != r.src.id {
			return
		}
		r.hv.doms[dom].dirty[111] = true // a kernel PDPT: a core page, loaded before GO
		r.hv.loadErrGFN[111] = true
	}
	r.startDestGuest(10, 1)
	r.migrate(t, wire.ModePostcopy)
	require.Error(t, r.serr)
	require.Contains(t, r.serr.Error(), "injected")
	r.hv.mu.Lock()
	require.NotNil(t, r.src.snapshot, "the guest never suspended: the failure came too early for this test")
	require.Equal(t, []bool{true}, r.src.resumes, "want one fast resume")
	require.False(t, r.src.info.Shutdown, "source left suspended")
	require.False(t, r.src.info.Dying)
	r.hv.mu.Unlock()
	dst := r.destDom(t)
	r.hv.mu.Lock()
	require.False(t, dst.unpaused, "destination ran")
	r.hv.mu.Unlock()
	r.xl.mu.Lock()
	defer r.xl.mu.Unlock()
	require.Equal(t, []uint32{dst.id}, r.xl.destroyed, "only the destination is destroyed")
	// Either never renamed, or renamed back.
	if len(r.xl.renames) > 0 {
		require.Equal(t, fmt.Sprintf("%d:vm1", r.src.id), r.xl.renames[len(r.xl.renames)-1])
	}
}

// A guest that never suspends: the source times out and withdraws the
// request; the domain keeps running.
func TestSuspendTimeoutWithdrawsRequest(t *testing.T) {
	r := newRig(t)
	r.xs.ignore = true
	s, err := NewSource(SourceOptions{HV: r.hv, XS: r.xs, XL: r.xl, Dom: r.src.id, Name: "vm1",
		XLConfig: []byte(testXLConfig), SuspendTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	err = s.Pause()
	require.Error(t, err)
	require.Contains(t, err.Error(), "did not suspend")
	require.NoError(t, s.Resume())
	path := fmt.Sprintf("/local/domain/%d/control/shutdown", r.src.id)
	require.Equal(t, []string{path + "=suspend", path + "="}, r.xs.writes)
	require.Empty(t, r.src.resumes)
}

func TestRefusePostcopy(t *testing.T) {
	err := RefusePostcopy(xenctrl.DomainInfo{HVM: false})
	require.Error(t, err)
	require.Contains(t, err.Error(), "PV domain")
	require.Contains(t, err.Error(), "--mode precopy")
	err = RefusePostcopy(xenctrl.DomainInfo{HVM: true, HAP: false})
	require.Error(t, err)
	require.Contains(t, err.Error(), "HAP")
	require.Contains(t, err.Error(), "--mode precopy")
	require.NoError(t, RefusePostcopy(xenctrl.DomainInfo{HVM: true, PVH: true, HAP: true}))
	// HVM: its device model's state would be lost (issue 15).
	err = RefusePostcopy(xenctrl.DomainInfo{HVM: true, HAP: true})
	var re *RefusedError
	require.ErrorAs(t, err, &re)
	require.Equal(t, RefusedDeviceModel, re.Kind)
	require.Contains(t, err.Error(), "device model")
	require.Contains(t, err.Error(), "--mode precopy")
	require.ErrorAs(t, RefusePostcopy(xenctrl.DomainInfo{}), &re)
	require.Equal(t, RefusedPV, re.Kind)

	// NewSource refuses too, before touching the guest.
	hv := newFakeHV()
	d := hv.newGuestDomain("pv")
	d.info.HVM, d.info.PVH = false, false
	_, err = NewSource(SourceOptions{HV: hv, XS: &fakeStore{h: hv}, XL: &fakeXL{h: hv}, Dom: d.id, Name: "pv"})
	require.ErrorContains(t, err, "--mode precopy")
}

func TestParseCPUs(t *testing.T) {
	ctx := hvmContext(0x42, 0x77)
	cpus, err := ParseCPUs(ctx)
	require.NoError(t, err)
	require.Len(t, cpus, 2)
	for i, want := range []uint64{0x42, 0x77} {
		require.Equal(t, uint16(i), cpus[i].VCPU)
		require.Equal(t, want<<12, cpus[i].CR3)
		require.Equal(t, uint64(1<<31|1), cpus[i].CR0)
		require.Equal(t, uint64(1<<5), cpus[i].CR4)
		require.Equal(t, uint64(1<<8|1<<10), cpus[i].EFER)
		require.Equal(t, 0x1000+uint64(i), cpus[i].RIP)
	}

	t.Run("truncated", func(t *testing.T) {
		for _, n := range []int{0, 5, len(ctx) - 4} { // mid-descriptor, mid-END
			_, err := ParseCPUs(ctx[:n])
			require.Error(t, err, "length %d", n)
		}
		// Cut inside the second CPU record's body.
		_, err := ParseCPUs(ctx[:len(ctx)-8-100])
		require.ErrorContains(t, err, "overruns")
	})
	t.Run("overrun", func(t *testing.T) {
		bad := slices.Clone(ctx)
		off := 8 + 24 // the first CPU record's descriptor
		require.Equal(t, uint16(2), binary.LittleEndian.Uint16(bad[off:]))
		binary.LittleEndian.PutUint32(bad[off+4:], 0xffffffff)
		_, err := ParseCPUs(bad)
		require.ErrorContains(t, err, "overruns")
	})
	t.Run("short CPU record", func(t *testing.T) {
		var b []byte
		b = binary.LittleEndian.AppendUint16(b, 2)
		b = binary.LittleEndian.AppendUint16(b, 0)
		b = binary.LittleEndian.AppendUint32(b, 600)
		b = append(b, make([]byte, 600)...)
		b = append(b, make([]byte, 8)...) // END
		_, err := ParseCPUs(b)
		require.ErrorContains(t, err, "want at least")
	})
	t.Run("no CPU", func(t *testing.T) {
		_, err := ParseCPUs(make([]byte, 8))
		require.ErrorContains(t, err, "no CPU record")
	})
}

// Hybrid: one pre-copy round while the guest writes, then post-copy; the
// pages re-dirtied after the round are paged out again at the destination
// and still end up with the source's final content.
func TestHybridDiscardsRedirtiedPages(t *testing.T) {
	r := newRig(t)
	r.hv.runGuest(r.src, 2, 5*time.Microsecond)
	r.startDestGuest(200, 9)
	r.migrate(t, wire.ModeHybrid)
	r.requireSound(t)
	require.Equal(t, 1, r.st.PrecopyRounds)
	require.Greater(t, r.st.DiscardedPages, uint64(0), "the guest re-dirtied nothing after the pre-copy round")
	dst := r.destDom(t)
	r.checkSameMemory(t, dst)
	r.hv.mu.Lock()
	var reEvicted uint64
	for _, n := range dst.evictions {
		if n >= 2 {
			reEvicted++
		}
	}
	r.hv.mu.Unlock()
	require.Greater(t, reEvicted, uint64(0), "no page paged out again after the pre-copy round")
	require.LessOrEqual(t, reEvicted, r.st.DiscardedPages)
	r.touchMu.Lock()
	defer r.touchMu.Unlock()
	require.Empty(t, r.touchErr)
	for g, p := range r.touched {
		require.Equal(t, r.src.snapshot[g], p, "vCPU read of gfn %#x", g)
	}
}

// newTestDest makes the destination of src's stream without an engine:
// the tests then drive Place, Resume and the ring themselves.
func newTestDest(t *testing.T, hv *fakeHV, src *fdom) *Dest {
	t.Helper()
	xl := &fakeXL{h: hv}
	s, err := NewSource(SourceOptions{HV: hv, XS: &fakeStore{h: hv}, XL: xl, Dom: src.id, Name: "vm1", XLConfig: []byte(testXLConfig)})
	require.NoError(t, err)
	info := s.Info()
	d, err := newDest(DestOptions{HV: hv, XL: xl, Poll: time.Millisecond, Logf: t.Logf,
		Progress: func(string, int, int) {}}, &wire.DomainHeader{Mode: wire.ModePostcopy, PageSize: info.PageSize,
		NumPages: info.NumPages, VCPUs: info.VCPUs, Name: info.Name, Backend: info.Backend, Config: info.Config})
	require.NoError(t, err)
	return d
}

// The destination's ring loop: requests it cannot serve from the stream
// (not its gfn, a dropped page, not a paging request) are answered at
// once; a request for a paged-out gfn of the domain becomes a fault and is
// answered only once the page is placed, and by then the page is in.
func TestDestRingLoop(t *testing.T) {
	hv := newFakeHV()
	src := hv.newGuestDomain("src")
	d := newTestDest(t, hv, src)
	defer d.Destroy()
	dom := hv.doms[d.DomID()]
	// The core pages of the source's hint stay resident; the rest is paged out.
	require.Equal(t, fRAMPages, int(d.Stats().Evicted+d.Stats().Resident))
	require.Equal(t, len(kernelPTGFNs)+2*PerCPUSpan/PageSize, int(d.Stats().Resident))

	push := func(q xenctrl.Request) {
		hv.mu.Lock()
		dom.ring.reqs = append(dom.ring.reqs, q)
		hv.mu.Unlock()
		select {
		case dom.ring.sig <- struct{}{}:
		default:
		}
	}
	answered := func(g uint64) int {
		hv.mu.Lock()
		defer hv.mu.Unlock()
		return dom.ring.answered[g]
	}
	plain := xenctrl.Request{Flags: xenctrl.FlagVCPUPaused, Reason: xenctrl.ReasonMemPaging}
	notOurs := plain
	notOurs.GFN = fStorePFN
	drop := plain
	drop.GFN, drop.PagingFlags = 5, xenctrl.PagingDropPage
	push(notOurs)
	push(drop)
	require.Eventually(t, func() bool { return answered(fStorePFN) == 1 && answered(5) == 1 }, 2*time.Second, time.Millisecond)

	// A vCPU faults on gfn 42 (page index 42: gfns 0..1023 are RAM).
	got := make(chan []byte, 1)
	go func() {
		p, err := hv.touch(dom.id, 0, 42, time.Now().Add(3*time.Second))
		if err != nil {
			p = []byte(err.Error())
		}
		got <- p
	}()
	faults, err := d.ReadFaults(nil)
	require.NoError(t, err)
	require.Equal(t, []uint64{42}, faults)
	time.Sleep(10 * time.Millisecond)
	require.Zero(t, answered(42), "answered before the page arrived")
	page := pageOf("sent", 42)
	require.NoError(t, d.Place([]engine.Page{{PFN: 42, Data: page}}))
	select {
	case p := <-got:
		require.Equal(t, page, p)
	case <-time.After(3 * time.Second):
		t.Fatal("vCPU never resumed")
	}
	require.Equal(t, 1, answered(42))
	st := d.Stats()
	require.Equal(t, uint64(3), st.Requests)
	require.Equal(t, uint64(2), st.PlainResponses)
	require.Equal(t, uint64(1), st.Loaded)
	require.Empty(t, hv.errs)
}

// busyXL refuses a rename while the name is still taken, like xl does.
type busyXL struct {
	fakeXL
	busy  int // renames refused before one succeeds
	tries int
}

func (b *busyXL) Rename(dom uint32, name string) error {
	b.tries++
	if b.tries <= b.busy {
		return fmt.Errorf("xl rename %d %s: domain with name %q already exists", dom, name, name)
	}
	return b.fakeXL.Rename(dom, name)
}

func TestDestRenameWaitsForTheName(t *testing.T) {
	xl := &busyXL{busy: 2}
	d := &Dest{opt: DestOptions{XL: xl}, dom: 7, cfg: DomainConfig{Name: "vm1"}}
	require.NoError(t, d.Rename())
	require.Equal(t, 3, xl.tries, "retried until the source's copy gave the name up")
	require.Equal(t, []string{"7:vm1"}, xl.renames)
}

// The guest changes its kernel page tables between the setup walk and the
// pause: a table the hint named is no longer one (still sent with the core
// pages, since the destination kept it resident), and a new table the hint
// lacked was paged out there and is paged in before the guest runs.
func TestResidentHintGoesStale(t *testing.T) {
	r := newRig(t)
	const newPDPT = 120
	r.beforeRun = func() {
		r.hv.mu.Lock()
		defer r.hv.mu.Unlock()
		m := r.src.mem
		m[newPDPT] = make([]byte, PageSize)
		binary.LittleEndian.PutUint64(m[newPDPT][3*8:], pte(112)) // the same PD as PDPT 111 had
		binary.LittleEndian.PutUint64(m[100][511*8:], pte(newPDPT))
		binary.LittleEndian.PutUint64(m[110][511*8:], pte(newPDPT))
	}
	r.startDestGuest(100, 3)
	r.migrate(t, wire.ModePostcopy)
	r.requireSound(t)
	dst := r.destDom(t)
	r.checkSameMemory(t, dst)

	ss, ds := r.srcBE.Stats(), r.dest.Stats()
	require.Equal(t, uint64(1), ss.HintStale, "PDPT 111 is no longer a table")
	require.Equal(t, uint64(1), ss.HintMissed, "PDPT 120 is a new one")
	require.Equal(t, ss.ResidentHint, ds.ResidentWritten)
	require.Zero(t, ds.ResidentLate)
	r.hv.mu.Lock()
	defer r.hv.mu.Unlock()
	require.True(t, dst.loadedAtUnpause[newPDPT], "the new table was not in before the guest ran")
	require.Equal(t, 1, dst.evictions[newPDPT], "the new table was not paged out at setup")
	require.True(t, dst.loadedAtUnpause[111], "the stale hint page was not written before the guest ran")
	require.Zero(t, dst.evictions[111])
}

// A resident gfn the stream never filled is paged out before the guest
// runs, so that the guest faults instead of reading the domain builder's
// content.
func TestResidentNotSentIsPagedOutAtResume(t *testing.T) {
	hv := newFakeHV()
	src := hv.newGuestDomain("src")
	d := newTestDest(t, hv, src)
	defer d.Destroy()
	require.Positive(t, d.Stats().Resident)
	// Only the first kernel table comes; the rest of the hint never does.
	require.NoError(t, d.Place([]engine.Page{{PFN: 100, Data: pageOf("sent", 100)}}))
	core, err := json.Marshal(coreState{HVM: src.hvm, TSC: src.tsc})
	require.NoError(t, err)
	require.NoError(t, d.Resume(core))
	st := d.Stats()
	require.Equal(t, st.Resident-1, st.ResidentLate)
	hv.mu.Lock()
	defer hv.mu.Unlock()
	dom := hv.doms[d.DomID()]
	require.Equal(t, gsRAM, dom.state[100])
	for _, g := range kernelPTGFNs[1:] {
		require.Equal(t, gsPaged, dom.state[g], "resident gfn %#x left as the builder wrote it", g)
	}
	require.Empty(t, hv.errs)
}

// The guest's balloon gives pages back and takes a hole again between the
// setup (the page set) and the pause: the pause's page set says so to the
// destination, which releases and populates the same gfns. Nothing is
// sent for the pages given back, and the page taken again arrives with
// its content.
func TestBalloonBetweenSetupAndPause(t *testing.T) {
	for _, mode := range []wire.Mode{wire.ModePostcopy, wire.ModeHybrid} {
		t.Run(mode.String(), func(t *testing.T) {
			const hole = 700
			r := newRig(t, hole)
			released := []uint64{300, 301, 650}
			r.hv.pagedOK = map[uint64]bool{300: true, 301: true, 650: true}
			r.beforeRun = func() {
				r.hv.guestRelease(r.src.id, false, released...)
				r.hv.guestPopulate(r.src.id, hole)
			}
			r.startDestGuest(100, 5)
			r.migrate(t, mode)
			r.requireSound(t)
			require.Equal(t, uint64(3), r.st.DroppedPages)
			require.Equal(t, uint64(1), r.st.AddedPages)
			dst := r.destDom(t)
			r.checkSameMemory(t, dst) // gfn 700 included: RAM at suspend
			r.hv.mu.Lock()
			defer r.hv.mu.Unlock()
			for _, g := range released {
				require.NotEqual(t, gsRAM, dst.state[g], "gfn %#x was given back at the source", g)
				require.False(t, dst.loaded[g], "gfn %#x was loaded at the destination", g)
			}
			require.Equal(t, pageOf("repopulated", hole), dst.mem[hole])
			st := r.dest.Stats()
			require.Equal(t, uint64(3), st.SetKeptPaged, "paged-out gfns cannot be released on Xen 4.17")
			require.Equal(t, uint64(1), st.SetAdded)
			if mode == wire.ModePostcopy {
				require.Zero(t, r.srcBE.Stats().UnreadablePages, "no page read after it left the set")
			}
		})
	}
}

// In hybrid mode the pre-copy round reads pages the guest is giving back
// right then: they cannot be read, nothing is sent for them (not zeroes),
// and the pause finds them gone.
func TestBalloonDuringPrecopyRound(t *testing.T) {
	r := newRig(t)
	released := []uint64{20, 21, 500}
	r.hv.pagedOK = map[uint64]bool{20: true, 21: true, 500: true}
	r.beforeRun = func() {
		// Unmappable now, released by the time the guest suspends: the
		// pre-copy read fails, the pause's page types say "gone".
		for _, g := range released {
			r.hv.unmappable[g] = true
		}
		r.hv.onSuspend = func(id uint32) {
			if id == r.src.id {
				r.hv.guestReleaseLocked(id, released...)
			}
		}
	}
	r.startDestGuest(100, 9)
	r.migrate(t, wire.ModeHybrid)
	r.requireSound(t)
	require.Equal(t, uint64(len(released)), r.st.UnreadableReads)
	require.Equal(t, uint64(len(released)), r.st.DroppedPages)
	require.Equal(t, uint64(len(released)), r.srcBE.Stats().UnreadablePages)
	dst := r.destDom(t)
	r.hv.mu.Lock()
	defer r.hv.mu.Unlock()
	for _, g := range released {
		// Left paged out, or a zero page if the guest touched it: never
		// anything from the source.
		if dst.state[g] == gsRAM {
			require.Equal(t, make([]byte, PageSize), dst.mem[g], "gfn %#x", g)
		}
	}
}

// A gfn that is still RAM but cannot be read (the guest put a grant
// mapping over it) is never sent as zeroes. Hybrid: the pre-copy round
// finds it, the pause reads it again, and the migration stops before GO
// with the domain running at the source. Post-copy: the pause cannot read
// every page, so the push finds it after GO and the migration stops there,
// the source copy kept with all its memory.
func TestUnreadableRAMIsNeverSent(t *testing.T) {
	for mode, want := range map[wire.Mode]engine.Where{wire.ModeHybrid: engine.RunsAtSource, wire.ModePostcopy: engine.AfterGo} {
		t.Run(mode.String(), func(t *testing.T) {
			r := newRig(t)
			r.beforeRun = func() { r.hv.unmappable[444] = true }
			if mode == wire.ModePostcopy {
				r.startDestGuest(20, 1)
			}
			r.migrate(t, mode)
			require.Error(t, r.serr)
			where, ok := engine.WhereOf(r.serr)
			require.True(t, ok)
			require.Equal(t, want, where, "%v", r.serr)
			require.ErrorContains(t, r.serr, "0x1bc") // page index 444
			dst := r.destDom(t)
			r.hv.mu.Lock()
			defer r.hv.mu.Unlock()
			require.False(t, dst.loaded[444], "an unreadable page reached the destination")
			if mode == wire.ModeHybrid {
				require.False(t, r.src.info.Shutdown, "the source guest is not running again")
				require.Equal(t, []bool{true}, r.src.resumes)
			} else {
				require.Empty(t, r.src.resumes, "the source copy was resumed after GO")
			}
		})
	}
}

// The resumed guest gives back pages that have not arrived yet, racing
// the push: with Xen's DROP_PAGE on the ring, or before it (the load then
// fails with ENOENT). Neither may end the receiver; the pages are not
// verified (not the guest's memory any more) and the rest is.
func TestGuestReleaseAtDestinationRacesPush(t *testing.T) {
	for _, quiet := range []bool{false, true} {
		t.Run(fmt.Sprintf("quiet=%v", quiet), func(t *testing.T) {
			r := newRig(t)
			released := []uint64{900, 901, 950, 1000}
			r.hv.onUnpause = func(dom uint32) {
				if dom == r.src.id {
					return
				}
				// Right at the resume, before the push gets that far.
				r.hv.guestRelease(dom, quiet, released...)
				close(r.vcpuDone)
			}
			r.migrate(t, wire.ModePostcopy)
			r.requireSound(t)
			require.Equal(t, uint64(len(released)), r.st.GuestDroppedPages)
			st := r.dest.Stats()
			if quiet {
				require.Equal(t, uint64(len(released)), st.DroppedOnLoad)
			} else {
				require.Equal(t, uint64(len(released)), st.Dropped+st.DroppedOnLoad)
			}
			dst := r.destDom(t)
			r.hv.mu.Lock()
			defer r.hv.mu.Unlock()
			for _, g := range released {
				require.Equal(t, gsAbsent, dst.state[g])
			}
			require.Empty(t, r.hv.errs)
		})
	}
}

// A destination whose domain creation fails (xl create killed by its time
// limit) returns an error, never a typed nil the engine would call.
func TestDestCreateFailureIsNoPanic(t *testing.T) {
	hv := newFakeHV()
	src := hv.newGuestDomain("src")
	s, err := NewSource(SourceOptions{HV: hv, XS: &fakeStore{h: hv}, XL: &fakeXL{h: hv}, Dom: src.id, Name: "vm1", XLConfig: []byte(testXLConfig)})
	require.NoError(t, err)
	hv.enablePagingErr = errors.New("xl create -p: signal: killed")
	info := s.Info()
	d, err := NewFactory(DestOptions{HV: hv, XL: &fakeXL{h: hv}})(&wire.DomainHeader{Mode: wire.ModePostcopy, PageSize: PageSize,
		NumPages: info.NumPages, Backend: Backend, Config: info.Config})
	require.ErrorContains(t, err, "killed")
	require.True(t, d == nil, "a failed factory returned a typed nil (%T)", d)
}

// DirtyPages returns this round's pages only, whatever slice it is given
// back (the engine passes the previous round's).
func TestDirtyPagesStartsAfresh(t *testing.T) {
	hv := newFakeHV()
	src := hv.newGuestDomain("src")
	s, err := NewSource(SourceOptions{HV: hv, XS: &fakeStore{h: hv}, XL: &fakeXL{h: hv}, Dom: src.id, Name: "vm1", XLConfig: []byte(testXLConfig)})
	require.NoError(t, err)
	require.NoError(t, s.StartDirtyLog())
	hv.write(src.id, 7, pageOf("a", 7))
	round1, err := s.DirtyPages(nil)
	require.NoError(t, err)
	require.Equal(t, []uint64{7}, round1)
	hv.write(src.id, 9, pageOf("b", 9))
	round2, err := s.DirtyPages(round1)
	require.NoError(t, err)
	require.Equal(t, []uint64{9}, round2)
}

// `verified` reads the destination back: a page the hypervisor stored
// wrongly makes it false; pages the resumed guest wrote are left out of
// the comparison, not counted as wrong.
func TestVerifiedFromDestinationMemory(t *testing.T) {
	for _, corrupt := range []bool{false, true} {
		t.Run(fmt.Sprintf("corrupt=%v", corrupt), func(t *testing.T) {
			r := newRig(t)
			if corrupt {
				r.hv.corruptLoad = 800 // paged out (not a resident per-CPU page)
			}
			r.hv.onUnpause = func(dom uint32) {
				if dom == r.src.id {
					return
				}
				go func() {
					defer close(r.vcpuDone)
					deadline := time.Now().Add(10 * time.Second)
					for _, g := range []uint64{500, 501} {
						if _, err := r.hv.touch(dom, 0, g, deadline); err == nil {
							r.hv.write(dom, g, pageOf("written at the destination", g))
						}
					}
				}()
			}
			r.migrate(t, wire.ModePostcopy)
			<-r.vcpuDone
			require.NotNil(t, r.st)
			require.Equal(t, "memory", r.st.VerifiedFrom)
			require.GreaterOrEqual(t, r.st.GuestWrittenPages, uint64(2))
			require.Greater(t, r.st.VerifiedPages, uint64(fRAMPages-200))
			if !corrupt {
				require.NoError(t, r.serr)
				require.True(t, r.st.Verified)
				return
			}
			require.Error(t, r.serr)
			require.False(t, r.st.Verified)
			require.Equal(t, uint64(1), r.st.MismatchedPages)
		})
	}
}

// Holes a balloon can have left join the page space as absent pages; a
// hole larger than what the domain may still populate (an MMIO hole, the
// gap below the special pages) does not.
func TestPageSpaceHoles(t *testing.T) {
	ram := []uint64{0, 1, 4, 5, 6, 0x1000, 0x1001}
	space, absent := withHoles(ram, 8, func(g uint64) bool { return g == 3 })
	require.Equal(t, []uint64{0, 1, 2, 4, 5, 6, 0x1000, 0x1001}, space)
	require.Equal(t, []bool{false, false, true, false, false, false, false, false}, absent)
}

// pauseWith pauses a fresh guest that takes 200 ms to suspend, with the
// store xs makes, and returns the stats and the Domain calls Pause made.
func pauseWith(t *testing.T, xs func(*fakeHV) Store) (SourceStats, int) {
	t.Helper()
	hv := newFakeHV()
	hv.suspendDelay = 200 * time.Millisecond
	src := hv.newGuestDomain("src")
	s, err := NewSource(SourceOptions{HV: hv, XS: xs(hv), XL: &fakeXL{h: hv}, Dom: src.id, Name: "vm1", XLConfig: []byte(testXLConfig)})
	require.NoError(t, err)
	hv.mu.Lock()
	before := hv.domainCalls
	hv.mu.Unlock()
	require.NoError(t, s.Pause())
	hv.mu.Lock()
	defer hv.mu.Unlock()
	return s.Stats(), hv.domainCalls - before
}

// The suspend is awaited on xenstored's @releaseDomain watch where the
// store offers one: a handful of hypercalls, not one every 2 ms; a watch
// that never fires still ends by the slow poll, and says so.
func TestPauseWaitsOnTheDomainWatch(t *testing.T) {
	polled, pollCalls := pauseWith(t, func(hv *fakeHV) Store { return &fakeStore{h: hv} })
	require.False(t, polled.SuspendWatched)
	watched, watchCalls := pauseWith(t, func(hv *fakeHV) Store { return watchingStore{fakeStore: &fakeStore{h: hv}} })
	require.True(t, watched.SuspendWatched, "the suspend was not noticed on the watch (%+v, %d calls, polling %d)", watched, watchCalls, pollCalls)
	require.GreaterOrEqual(t, watched.SuspendMs, 200.0)
	require.Less(t, watchCalls*3, pollCalls, "watching made %d Domain calls, polling %d", watchCalls, pollCalls)
	deaf, _ := pauseWith(t, func(hv *fakeHV) Store { return watchingStore{fakeStore: &fakeStore{h: hv}, deaf: true} })
	require.False(t, deaf.SuspendWatched, "a watch that never fired was credited")
	require.GreaterOrEqual(t, deaf.SuspendMs, 200.0)
}

// A take-over reopens the paused source copy with the page space its
// first source saved: the same pages under the same indexes, even where
// the page space would now come out different (a hole the guest's
// balloon filled since the setup); a domain that runs is refused.
func TestReopenSourceKeepsThePageSpace(t *testing.T) {
	hv := newFakeHV()
	src := hv.newGuestDomain("src", 40)
	s, err := NewSource(SourceOptions{HV: hv, XS: &fakeStore{h: hv}, XL: &fakeXL{h: hv}, Dom: src.id, Name: "vm1", XLConfig: []byte(testXLConfig)})
	require.NoError(t, err)
	space := s.PageSpace()
	n := s.Info().NumPages

	_, err = ReopenSource(SourceOptions{HV: hv, XL: &fakeXL{h: hv}, Dom: src.id, Name: "vm1"}, "vm1", space)
	require.ErrorContains(t, err, "runs", "a running domain is not a migration's paused copy")

	require.NoError(t, hv.Pause(src.id))
	r, err := ReopenSource(SourceOptions{HV: hv, XL: &fakeXL{h: hv}, Dom: src.id, Name: "vm1"}, "vm1--migratedaway", space)
	require.NoError(t, err)
	require.Equal(t, n, r.Info().NumPages)
	require.Equal(t, s.Info().Absent, r.Info().Absent, "the balloon's hole is absent again (reading it would fail)")
	require.NotEmpty(t, r.Info().Absent, "the test shows nothing without a hole")
	idx := []uint64{0, 1, n / 2, n - 1}
	a := make([]byte, len(idx)*PageSize)
	b := make([]byte, len(idx)*PageSize)
	require.NoError(t, s.ReadPages(idx, a))
	require.NoError(t, r.ReadPages(idx, b))
	require.Equal(t, a, b, "the same index reads the same gfn")

	_, err = ReopenSource(SourceOptions{HV: hv, Dom: src.id, Name: "vm1"}, "vm1", json.RawMessage(`[{"first":0,"count":99999999}]`))
	require.ErrorContains(t, err, "beyond", "a page space larger than the domain is not its own")
	_, err = ReopenSource(SourceOptions{HV: hv, Dom: src.id, Name: "vm1"}, "vm1", json.RawMessage(`{`))
	require.ErrorContains(t, err, "does not parse")
}

// Summed times print as microseconds, not as float noise.
func TestAddSinceStaysOnTheMicrosecondGrid(t *testing.T) {
	sum := 0.0
	t0 := time.Now().Add(-1234 * time.Microsecond)
	for range 5000 {
		sum = addSince(sum, t0)
	}
	b, err := json.Marshal(sum)
	require.NoError(t, err)
	frac := string(b)
	if i := strings.IndexByte(frac, '.'); i >= 0 {
		frac = frac[i+1:]
	} else {
		frac = ""
	}
	require.LessOrEqual(t, len(frac), 3, "%s has more than microseconds", b)
}
