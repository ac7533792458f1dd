package xendom

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
)

// fakeOtherReason is a vm_event reason other than paging (VM_EVENT_REASON_
// MEM_ACCESS) that the fake ring accepts an answer to.
const fakeOtherReason = 1

// selfTestRig is a running fake guest with paging on and a self-test over
// gfns, not yet evicted.
func selfTestRig(t *testing.T, opt SelfTestOptions, gfns ...uint64) (*fakeHV, *fdom, *fakeRing, *selfTest) {
	t.Helper()
	h := newFakeHV()
	d := h.newGuestDomain("guest")
	ring, err := h.EnablePaging(d.id)
	require.NoError(t, err)
	opt.GFNs = gfns
	if opt.Poll == 0 {
		opt.Poll = time.Millisecond
	}
	opt.Logf, opt.Printf = t.Logf, t.Logf
	return h, d, ring.(*fakeRing), newSelfTest(h, d.id, ring, opt)
}

// raise puts requests on dom's paging ring, with an event or (signal
// false) for the timer to find.
func raise(h *fakeHV, dom uint32, signal bool, reqs ...xenctrl.Request) {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := h.doms[dom].ring
	r.reqs = append(r.reqs, reqs...)
	r.requests += len(reqs)
	if signal {
		select {
		case r.sig <- struct{}{}:
		default:
		}
	}
}

func pagingReq(gfn uint64, flags, pflags uint32) xenctrl.Request {
	return xenctrl.Request{Version: xenctrl.VMEventInterfaceVersion, Flags: flags, Reason: xenctrl.ReasonMemPaging,
		GFN: gfn, P2MType: 10, PagingFlags: pflags}
}

// serveOnce is one turn of the self-test's loop: the ring, then the faults.
func serveOnce(t *testing.T, st *selfTest) error {
	t.Helper()
	faults, err := st.pg.Serve(time.Millisecond)
	st.noteFirstRequest()
	require.NoError(t, err)
	return st.handle(faults)
}

func answered(h *fakeHV, r *fakeRing) (n int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, c := range r.answered {
		n += c
	}
	return n
}

// The pages are copied and paged out with the domain paused; a gfn that
// cannot be mapped, nominated or evicted counts as an eviction failure and
// stays the guest's, as it was.
func TestSelfTestEvictsPausedAndCountsFailures(t *testing.T) {
	h, d, _, st := selfTestRig(t, SelfTestOptions{Verify: true}, 300, 301, 302, 303, 2000)
	h.nominateErrGFN[301] = true
	h.evictErrGFN[302] = true // nominated, then refused: put back
	require.NoError(t, st.evict())
	s := st.stats()
	assert.Equal(t, 5, s.Asked)
	assert.Equal(t, 2, s.Evicted)
	assert.Equal(t, 3, s.EvictFailures, "301 nominate, 302 evict, 2000 not mappable")
	h.mu.Lock()
	assert.Equal(t, gsPaged, d.state[300])
	assert.Equal(t, gsRAM, d.state[301])
	assert.Equal(t, gsRAM, d.state[302])
	assert.Equal(t, pageOf("guest", 302), d.mem[302], "a gfn whose page-out failed keeps its content")
	assert.Equal(t, gsPaged, d.state[303])
	assert.False(t, d.info.Paused, "the domain runs again")
	require.NotEmpty(t, h.pausedAtPageOut)
	for _, p := range h.pausedAtPageOut {
		assert.True(t, p, "pages go out with the domain paused")
	}
	h.mu.Unlock()
	assert.Equal(t, pageOf("guest", 303), st.saved[3], "content saved before eviction")
	assert.Nil(t, st.saved[4])
	assert.Equal(t, 2, st.pg.Count(PageEvicted))
	assert.Equal(t, PageResident, st.pg.State(2))
}

// A request for an evicted gfn loads the saved page; a second request
// for it that raced the first is answered too, without a second load,
// with one notify for both; an EVICT_FAIL flag is counted.
func TestSelfTestLoadsOnRequestAndAnswersRepeatsPlainly(t *testing.T) {
	h, d, ring, st := selfTestRig(t, SelfTestOptions{Verify: true}, 0x200)
	require.NoError(t, st.evict())
	raise(h, d.id, true, pagingReq(0x200, xenctrl.FlagVCPUPaused, xenctrl.PagingEvictFail),
		pagingReq(0x200, xenctrl.FlagVCPUPaused, 0))
	require.NoError(t, serveOnce(t, st))
	h.mu.Lock()
	assert.Equal(t, gsRAM, d.state[0x200])
	assert.Equal(t, pageOf("guest", 0x200), d.mem[0x200], "the original content is back")
	assert.Equal(t, 2, ring.answered[0x200], "both vCPUs resumed")
	assert.Equal(t, 1, ring.notifies, "one notify per batch")
	assert.Empty(t, h.errs)
	h.mu.Unlock()
	s := st.stats()
	assert.Equal(t, 2, s.Requests)
	assert.Equal(t, 1, s.Loaded)
	assert.Equal(t, 1, s.Plain)
	assert.Equal(t, 2, s.Paused)
	assert.Equal(t, 1, s.EvictFailFlag)
	assert.Equal(t, 1, s.Events)
	assert.Zero(t, st.pg.Count(PageEvicted))
	assert.NoError(t, s.Verdict())
}

// Requests that need no page (DROP_PAGE, a gfn not ours from a foreign
// mapping, another reason than paging) are answered without a load; a
// failed load is answered too, so that the vCPU is not left paused.
func TestSelfTestDropForeignOtherReasonAndLoadErrors(t *testing.T) {
	h, d, ring, st := selfTestRig(t, SelfTestOptions{Verify: true}, 0x300, 0x301, 0x302)
	require.NoError(t, st.evict())
	other := pagingReq(0x302, xenctrl.FlagVCPUPaused, 0)
	other.Reason = fakeOtherReason
	raise(h, d.id, true, pagingReq(0x300, 0, xenctrl.PagingDropPage), pagingReq(0x3ff, xenctrl.FlagForeign, 0), other)
	require.NoError(t, serveOnce(t, st))
	h.mu.Lock()
	assert.Empty(t, d.loaded, "a dropped page, a gfn not ours and a non-paging request load nothing")
	h.mu.Unlock()
	s := st.stats()
	assert.Equal(t, 1, s.Dropped)
	assert.Equal(t, 1, s.Foreign)
	assert.Equal(t, 3, s.Plain)
	assert.Equal(t, 3, answered(h, ring), "every request is answered, or its ring slot is lost")
	assert.Equal(t, PageDropped, st.pg.State(0))
	assert.Equal(t, 2, st.pg.Count(PageEvicted), "0x301 and 0x302 still out")

	h.mu.Lock()
	h.loadErrGFN[0x301] = true
	h.mu.Unlock()
	raise(h, d.id, true, pagingReq(0x301, xenctrl.FlagVCPUPaused, 0))
	require.NoError(t, serveOnce(t, st), "the guest is alive: a failed load is counted, not fatal")
	s = st.stats()
	assert.Equal(t, 1, s.LoadErrors)
	assert.Equal(t, 4, answered(h, ring), "a failed load is still answered")
	assert.Equal(t, 1, st.pg.Count(PageEvicted), "a failed gfn is not waited for any more")
	assert.ErrorContains(t, s.Verdict(), "1 page loads failed")
}

// Xen may have the page back already (ENOENT on load): the request is
// answered plainly and the gfn is no longer outstanding.
func TestSelfTestLoadENOENTMeansAlreadyResident(t *testing.T) {
	h, d, _, st := selfTestRig(t, SelfTestOptions{Verify: true}, 0x3a0)
	require.NoError(t, st.evict())
	h.mu.Lock()
	d.state[0x3a0] = gsRAM // paged back in by someone else
	d.mem[0x3a0] = pageOf("guest", 0x3a0)
	h.mu.Unlock()
	raise(h, d.id, true, pagingReq(0x3a0, xenctrl.FlagVCPUPaused, 0))
	require.NoError(t, serveOnce(t, st))
	s := st.stats()
	assert.Zero(t, s.LoadErrors)
	assert.Zero(t, s.Loaded)
	assert.Equal(t, 1, s.Plain)
	assert.Zero(t, st.pg.Count(PageEvicted))
}

// With a gfn nobody asks for, serve runs to the deadline; the restore
// then loads it with its saved content. With every gfn back, serve ends
// after the linger.
func TestSelfTestServesToTheDeadlineThenRestoresUnaskedPages(t *testing.T) {
	h, d, ring, st := selfTestRig(t, SelfTestOptions{Verify: true, Timeout: 200 * time.Millisecond}, 0x250, 0x251)
	require.NoError(t, st.evict())
	raise(h, d.id, false, pagingReq(0x250, xenctrl.FlagVCPUPaused, 0))
	start := time.Now()
	require.NoError(t, st.serve(context.Background()))
	assert.GreaterOrEqual(t, time.Since(start), 150*time.Millisecond, "0x251 is outstanding: serve runs to the deadline")
	s := st.stats()
	assert.Equal(t, 1, s.PolledRequests, "found by the timer, no event")
	assert.Equal(t, 1, s.Loaded)
	require.NoError(t, st.restore())
	s = st.stats()
	assert.Equal(t, 1, s.Restored)
	h.mu.Lock()
	assert.Equal(t, gsRAM, d.state[0x251])
	assert.Equal(t, pageOf("guest", 0x251), d.mem[0x251])
	assert.False(t, d.info.Paused)
	h.mu.Unlock()
	require.NoError(t, ring.Close())
	h.mu.Lock()
	assert.Empty(t, h.errs, "no gfn left paged out when paging goes off")
	h.mu.Unlock()

	st.opt.Timeout, st.opt.Linger = 10*time.Second, 20*time.Millisecond
	start = time.Now()
	require.NoError(t, st.serve(context.Background()))
	assert.Less(t, time.Since(start), 2*time.Second, "everything back: serve ends after the linger")
}

// dyingHV is a hypervisor whose domain is being destroyed: Xen answers
// paging ops on it with EINVAL and still lists it, dying.
type dyingHV struct{ *fakeHV }

func (x dyingHV) LoadPages(uint32, []uint64, []byte) (int, error) { return 0, syscall.EINVAL }

func (x dyingHV) Domain(dom uint32) (xenctrl.DomainInfo, error) {
	info, err := x.fakeHV.Domain(dom)
	info.Dying = true
	return info, err
}

// A load that fails on a dying domain ends the serving with the reason,
// and the restore stops at its first failure, saying how many gfns stay
// out.
func TestSelfTestDyingDomainStopsServeAndRestoreWithTheReason(t *testing.T) {
	h, d, _, st := selfTestRig(t, SelfTestOptions{Verify: true}, 0x260, 0x261, 0x262)
	require.NoError(t, st.evict())
	st.hv = dyingHV{h}
	st.pg.hv = st.hv
	raise(h, d.id, true, pagingReq(0x260, xenctrl.FlagVCPUPaused, 0))
	err := serveOnce(t, st)
	require.ErrorContains(t, err, "is dying")
	err = st.restore()
	require.ErrorContains(t, err, "is dying")
	assert.ErrorContains(t, err, "3 evicted gfns not restored")
	assert.Equal(t, 2, st.stats().LoadErrors, "one failed request load, then the restore stops at the first failure")
}

// The domain's end is named: gone, shut down (a triple fault is a
// reboot), and alive is no reason.
func TestSelfTestGuestGoneSaysWhy(t *testing.T) {
	h, d, _, st := selfTestRig(t, SelfTestOptions{}, 0x270)
	require.NoError(t, st.guestGone())
	h.mu.Lock()
	d.info.Shutdown, d.info.ShutdownReason = true, 1
	h.mu.Unlock()
	assert.ErrorContains(t, st.guestGone(), "shut down (reason 1")
	h.mu.Lock()
	delete(h.doms, d.id)
	h.mu.Unlock()
	assert.ErrorContains(t, st.guestGone(), "no longer exists")
}

// An interrupted self-test (SIGINT: ctx cancelled) still puts every
// evicted page back.
func TestSelfTestInterruptRestoresPages(t *testing.T) {
	h := newFakeHV()
	d := h.newGuestDomain("guest")
	ring, err := h.EnablePaging(d.id)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	var evicted SelfTestStats
	s, err := SelfTest(ctx, h, d.id, ring, SelfTestOptions{GFNs: []uint64{0x270, 0x271}, Timeout: 10 * time.Second,
		Poll: time.Millisecond, Verify: true, Logf: t.Logf, Printf: t.Logf,
		Evicted: func(s SelfTestStats) { evicted = s; cancel() }})
	require.ErrorContains(t, err, "interrupted")
	assert.Equal(t, 2, evicted.Evicted)
	assert.Equal(t, 2, s.Restored)
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, g := range []uint64{0x270, 0x271} {
		assert.Equal(t, gsRAM, d.state[g], "gfn %#x is back after the interruption", g)
		assert.Equal(t, pageOf("guest", g), d.mem[g])
	}
	assert.False(t, d.info.Paused)
}

// A saved copy that changed in our memory is counted before it is
// loaded; a page that reads back different from what was loaded is
// counted after.
func TestSelfTestVerifiesSavedCopyAndReadBack(t *testing.T) {
	h, d, _, st := selfTestRig(t, SelfTestOptions{Verify: true}, 0x280, 0x281)
	require.NoError(t, st.evict())
	st.saved[0][7] ^= 0xff // our copy rots after it was saved
	raise(h, d.id, true, pagingReq(0x280, xenctrl.FlagVCPUPaused, 0))
	require.NoError(t, serveOnce(t, st))
	s := st.stats()
	assert.Equal(t, 1, s.SavedCorrupt)
	assert.Zero(t, s.ReadbackBad, "the fake guest holds what was loaded")
	assert.ErrorContains(t, s.Verdict(), "changed in the pager's own memory")

	h.mu.Lock()
	h.corruptLoad = 0x281 // the hypervisor stores something else than what was loaded
	h.mu.Unlock()
	raise(h, d.id, true, pagingReq(0x281, xenctrl.FlagVCPUPaused, 0))
	require.NoError(t, serveOnce(t, st))
	s = st.stats()
	assert.Equal(t, 1, s.ReadbackBad)
	assert.Equal(t, 1, s.SavedCorrupt)
}

// Without --verify the corruption goes unseen (what the flag buys).
func TestSelfTestWithoutVerifyChecksNothing(t *testing.T) {
	h, d, _, st := selfTestRig(t, SelfTestOptions{Verify: false}, 0x280)
	require.NoError(t, st.evict())
	st.saved[0][7] ^= 0xff
	h.mu.Lock()
	h.corruptLoad = 0x280
	h.mu.Unlock()
	raise(h, d.id, true, pagingReq(0x280, xenctrl.FlagVCPUPaused, 0))
	require.NoError(t, serveOnce(t, st))
	s := st.stats()
	assert.Zero(t, s.SavedCorrupt)
	assert.Zero(t, s.ReadbackBad)
	assert.Equal(t, 1, s.Loaded)
}

// A domain that cannot be paused is an eviction error: nothing served,
// and the caller prints no stats.
func TestSelfTestEvictErrorWhenTheDomainCannotBePaused(t *testing.T) {
	h := newFakeHV()
	_, err := SelfTest(context.Background(), h, 42, nil, SelfTestOptions{GFNs: []uint64{1}, Timeout: time.Second, Poll: time.Millisecond})
	var ee *EvictError
	require.True(t, errors.As(err, &ee), "%v", err)
	assert.ErrorIs(t, err, syscall.ESRCH)
	assert.ErrorContains(t, err, "pause the domain before evicting")
	assert.ErrorContains(t, err, "(restore: ")
}

// The whole self-test against a guest that touches every evicted page:
// each touch pauses the vCPU until the pager loads the saved page, and
// the guest reads its own content back.
func TestSelfTestServesAGuestThatTouchesEveryPage(t *testing.T) {
	h := newFakeHV()
	d := h.newGuestDomain("guest")
	ring, err := h.EnablePaging(d.id)
	require.NoError(t, err)
	var gfns []uint64
	for g := uint64(0x300); g < 0x340; g++ {
		gfns = append(gfns, g)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var guestErrs []error
	s, err := SelfTest(context.Background(), h, d.id, ring, SelfTestOptions{GFNs: gfns, Timeout: 20 * time.Second,
		Linger: 10 * time.Millisecond, Poll: time.Millisecond, Verify: true, Logf: func(string, ...any) {}, Printf: t.Logf,
		Evicted: func(SelfTestStats) {
			for v, part := range [][]uint64{gfns[:32], gfns[32:]} {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for _, g := range part {
						got, err := h.touch(d.id, uint32(v), g, time.Now().Add(10*time.Second))
						if err == nil && string(got) != string(pageOf("guest", g)) {
							err = fmt.Errorf("gfn %#x: the guest reads other content", g)
						}
						if err != nil {
							mu.Lock()
							guestErrs = append(guestErrs, err)
							mu.Unlock()
						}
					}
				}()
			}
		}})
	wg.Wait()
	require.NoError(t, err)
	require.Empty(t, guestErrs)
	require.NoError(t, s.Verdict())
	assert.Equal(t, len(gfns), s.Evicted)
	assert.Equal(t, len(gfns), s.Requests)
	assert.Equal(t, len(gfns), s.Loaded)
	assert.Equal(t, len(gfns), s.Paused)
	assert.Zero(t, s.Restored, "every page was asked for")
	assert.Zero(t, s.Plain)
	assert.Positive(t, s.FirstRequestMS+s.LastLoadMS)
	require.NoError(t, ring.Close())
	h.mu.Lock()
	defer h.mu.Unlock()
	assert.Empty(t, h.errs)
}

func TestSelfTestVerdictNamesTheMissingStep(t *testing.T) {
	assert.ErrorContains(t, SelfTestStats{}.Verdict(), "no page could be evicted")
	assert.ErrorContains(t, SelfTestStats{Evicted: 3}.Verdict(), "no paging request")
	assert.ErrorContains(t, SelfTestStats{Evicted: 3, Requests: 2, Plain: 2}.Verdict(), "none asked for an evicted page")
	assert.ErrorContains(t, SelfTestStats{Evicted: 3, Requests: 3, Loaded: 3, ReadbackBad: 1}.Verdict(), "read back different")
	assert.NoError(t, SelfTestStats{Evicted: 3, Requests: 3, Loaded: 3}.Verdict())
}

// The lab scenarios parse the PAGER-STATS keys, in this order.
func TestSelfTestStatsLineKeys(t *testing.T) {
	line := SelfTestStats{Asked: 1, Evicted: 2, EvictFailures: 3, Requests: 4, Loaded: 5, Plain: 6, EvictFailFlag: 7, Dropped: 8,
		Foreign: 9, Paused: 10, LoadErrors: 11, Events: 12, PolledRequests: 13, Restored: 14, SavedCorrupt: 15, ReadbackBad: 16,
		FirstRequestMS: 17, LastLoadMS: 18}.String()
	want := "asked=1 evicted=2 evict_failures=3 requests=4 loaded=5 plain=6 evict_fail_flag=7 dropped=8 foreign=9 vcpu_paused=10 " +
		"load_errors=11 events=12 polled_requests=13 restored=14 saved_corrupt=15 readback_bad=16 first_request_ms=17 last_load_ms=18"
	assert.Equal(t, want, line)
	assert.Len(t, strings.Fields(line), 18)
}
