package xendom

import (
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// bareDest is a Dest over gfns of a fresh fake domain with paging on and
// every gfn paged out, each with one vCPU waiting on it.
func bareDest(t *testing.T, gfns ...uint64) (*fakeHV, *Dest, *fakeRing) {
	t.Helper()
	h := newFakeHV()
	dom := h.newGuestDomain("dst")
	ring, err := h.EnablePaging(dom.id)
	require.NoError(t, err)
	done, err := h.PageOut(dom.id, gfns)
	require.NoError(t, err)
	require.Equal(t, len(gfns), done)
	d := &Dest{opt: DestOptions{HV: h, Logf: t.Logf}, dom: dom.id, gfns: gfns, zero: make([]byte, PageSize),
		pg: NewPager(h, dom.id, ring, gfns, PageEvicted, PagerOptions{Logf: t.Logf})}
	for i, g := range gfns {
		d.pg.pending[uint64(i)] = []xenctrl.Request{{Flags: xenctrl.FlagVCPUPaused, Reason: xenctrl.ReasonMemPaging,
			VCPUID: uint32(i), GFN: g}}
	}
	return h, d, ring.(*fakeRing)
}

func pagesFor(d *Dest, idx ...uint64) []engine.Page {
	var out []engine.Page
	for _, i := range idx {
		out = append(out, engine.Page{PFN: i, Data: pageOf("src", d.gfns[i])})
	}
	return out
}

// Pages are loaded many a call, and a load that fails half-way still
// answers the vCPUs waiting on the pages loaded before it (they would
// stay paused for ever: a retried Place finds them loaded and has nobody
// to wake).
func TestFailedLoadAnswersTheFaultsOfLoadedPages(t *testing.T) {
	h, d, ring := bareDest(t, 200, 201, 202, 203)
	h.loadErrGFN[202] = true
	err := d.Place(pagesFor(d, 0, 1, 2, 3))
	require.ErrorIs(t, err, syscall.EIO)
	require.ErrorContains(t, err, "0xca")
	h.mu.Lock()
	require.Equal(t, 1, h.loadCalls, "the four pages went in one call")
	require.Equal(t, 1, ring.answered[200])
	require.Equal(t, 1, ring.answered[201])
	require.Zero(t, ring.answered[202])
	require.Zero(t, ring.answered[203])
	h.mu.Unlock()
	require.Equal(t, uint64(2), d.Stats().Loaded)

	// The engine retries what failed: the rest goes in, each vCPU is
	// answered once.
	delete(h.loadErrGFN, 202)
	require.NoError(t, d.Place(pagesFor(d, 2, 3)))
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, g := range d.gfns {
		require.Equal(t, 1, ring.answered[g], "gfn %#x", g)
		require.Equal(t, pageOf("src", g), h.doms[d.dom].mem[g])
	}
	require.Equal(t, 2, h.loadCalls)
	require.Empty(t, h.errs)
}

// A page sent twice in one call is loaded once, with the later contents:
// a second load of the same gfn would fail (it is not paged out any more)
// and mark the page dropped.
func TestPageTwiceInOnePlace(t *testing.T) {
	h, d, ring := bareDest(t, 300, 301)
	pages := pagesFor(d, 0, 1)
	pages = append(pages, engine.Page{PFN: 0, Data: pageOf("later", 300)})
	require.NoError(t, d.Place(pages))
	st := d.Stats()
	require.Equal(t, uint64(2), st.Loaded)
	require.Zero(t, st.DroppedOnLoad)
	h.mu.Lock()
	defer h.mu.Unlock()
	require.Equal(t, pageOf("later", 300), h.doms[d.dom].mem[300])
	require.Equal(t, 1, ring.answered[300])
}

// A gfn the guest gave back (the load fails with ENOENT) is dropped and
// the rest of the batch still goes in, in a second call.
func TestGivenBackGFNInTheMiddleOfABatch(t *testing.T) {
	h, d, ring := bareDest(t, 400, 401, 402)
	h.guestRelease(d.dom, true, 401)
	require.NoError(t, d.Place(pagesFor(d, 0, 1, 2)))
	st := d.Stats()
	require.Equal(t, uint64(2), st.Loaded)
	require.Equal(t, uint64(1), st.DroppedOnLoad)
	require.Equal(t, []uint64{1}, d.Dropped())
	h.mu.Lock()
	defer h.mu.Unlock()
	require.Equal(t, 2, h.loadCalls)
	for _, g := range d.gfns {
		require.Equal(t, 1, ring.answered[g], "gfn %#x", g)
	}
}

// Page-out at setup goes to the hypervisor many gfns a call; a gfn that
// cannot be paged out does not stop the ones after it.
func TestPageOutInBatches(t *testing.T) {
	h := newFakeHV()
	dom := h.newGuestDomain("dst")
	_, err := h.EnablePaging(dom.id)
	require.NoError(t, err)
	gfns := make([]uint64, 600)
	for i := range gfns {
		gfns[i] = uint64(300 + i)
	}
	d := &Dest{opt: DestOptions{HV: h, Logf: t.Logf}, dom: dom.id, gfns: gfns,
		pg: NewPager(h, dom.id, nil, gfns, PageEvicted, PagerOptions{Logf: t.Logf})}
	h.mu.Lock()
	dom.state[310] = gsAbsent // not RAM: nominate fails
	h.mu.Unlock()
	idx := make([]uint64, len(gfns))
	for i := range idx {
		idx[i] = uint64(i)
	}
	failed, err := d.pg.PageOut(idx)
	require.ErrorIs(t, err, syscall.EINVAL)
	require.Equal(t, []uint64{10}, failed)
	h.mu.Lock()
	defer h.mu.Unlock()
	require.Equal(t, 2, h.pageOutCalls, "one call up to the failure, one after it")
	for i, g := range gfns {
		if i != 10 {
			require.Equal(t, gsPaged, dom.state[g], "gfn %#x", g)
			require.Equal(t, PageEvicted, d.pg.state[i])
		}
	}
}

// A whole migration pages out and loads in batches: at setup about one
// call per evictBatch gfns, after the resume one load call per Place
// rather than per page — and a hypervisor that stops a batch early (a
// preempted hypercall) still gets every page.
func TestPagingInBatches(t *testing.T) {
	for _, preempt := range []int{0, 5} {
		r := newRig(t)
		r.hv.preemptAt = preempt
		r.startDestGuest(30, 3)
		r.migrate(t, wire.ModePostcopy)
		r.requireSound(t)
		dst := r.destDom(t)
		r.checkSameMemory(t, dst)
		st := r.dest.Stats()
		r.hv.mu.Lock()
		calls, loads := r.hv.pageOutCalls, r.hv.loadCalls
		r.hv.mu.Unlock()
		require.Positive(t, st.Loaded)
		if preempt == 0 {
			require.LessOrEqual(t, calls, int(st.Evicted)/evictBatch+2, "page-out calls for %d gfns", st.Evicted)
			require.Less(t, loads, int(st.Loaded)/4, "loads for %d pages", st.Loaded)
		} else {
			require.GreaterOrEqual(t, loads, int(st.Loaded)/preempt, "a preempted batch was not continued")
		}
		require.Empty(t, r.hv.errs)
	}
}

// The core pages found at setup go before the pause; in the pause only
// the one the guest wrote since goes again, with its new contents, and
// nothing else of the core is sent then.
func TestEarlyCorePagesBeforeThePause(t *testing.T) {
	r := newRig(t)
	r.hv.onSuspend = func(dom uint32) {
		if dom != r.src.id {
			return
		}
		d := r.hv.doms[dom]
		d.mem[0x201] = pageOf("written while suspending", 0x201) // a per-CPU page
		d.dirty[0x201] = true
	}
	r.startDestGuest(20, 5)
	r.migrate(t, wire.ModePostcopy)
	r.requireSound(t)
	core := uint64(len(kernelPTGFNs) + 2*PerCPUSpan/PageSize)
	require.Equal(t, core, r.st.EarlyCorePages)
	require.Equal(t, uint64(1), r.st.EarlyCoreRedirtied)
	require.Equal(t, uint64(1), r.st.ResentPages)
	require.Equal(t, uint64(1), r.st.CorePages, "the pause sent more than the re-dirtied core page")
	dst := r.destDom(t)
	r.checkSameMemory(t, dst)
	r.hv.mu.Lock()
	defer r.hv.mu.Unlock()
	require.Equal(t, pageOf("written while suspending", 0x201), dst.mem[0x201])
}

// A request still on the ring when the loop stops (a vCPU touched a page
// as the last one came in) is answered before paging is disabled: the
// vCPU would otherwise stay paused on a ring that is gone.
func TestCloseAnswersRequestsLeftOnTheRing(t *testing.T) {
	h, d, ring := bareDest(t, 300, 301)
	require.NoError(t, d.Place(pagesFor(d, 0, 1)))
	d.closed = make(chan struct{})
	d.loopDone = make(chan struct{})
	close(d.loopDone) // the ring loop has stopped
	h.mu.Lock()
	ring.reqs = append(ring.reqs, xenctrl.Request{Flags: xenctrl.FlagVCPUPaused, Reason: xenctrl.ReasonMemPaging, VCPUID: 1, GFN: 301})
	before := ring.answered[301]
	h.mu.Unlock()
	require.NoError(t, d.Close())
	h.mu.Lock()
	defer h.mu.Unlock()
	require.Equal(t, before+1, ring.answered[301], "the request left on the ring was answered")
	require.True(t, ring.closed)
	require.Empty(t, h.errs)
}
