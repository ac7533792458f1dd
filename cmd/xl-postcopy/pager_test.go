//go:build cgo

package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
)

// fakeXen is a unit-test double of the hypervisor's paging operations with
// Xen's rules: nominate needs a resident page nobody maps, evict needs a
// nominated one, load needs a paged-out one (else ENOENT).
type fakeXen struct {
	pause   int
	mem     map[uint64][]byte
	typ     map[uint64]string // "rw", "paging_out", "paged"
	busy    map[uint64]bool   // nominate refuses (EBUSY)
	loadErr error
	loads   []uint64
	info    xenctrl.DomainInfo
	// pausedDuringEvict records the pause depth seen by nominate/evict.
	pausedDuringEvict []int
}

func newFakeXen(gfns ...uint64) *fakeXen {
	x := &fakeXen{mem: map[uint64][]byte{}, typ: map[uint64]string{}, busy: map[uint64]bool{}}
	for _, g := range gfns {
		x.mem[g] = bytes.Repeat([]byte{byte(g)}, xenctrl.PageSize)
		x.typ[g] = "rw"
	}
	return x
}

func (x *fakeXen) Pause(uint32) error { x.pause++; return nil }
func (x *fakeXen) Unpause(uint32) error {
	if x.pause == 0 {
		return syscall.EINVAL
	}
	x.pause--
	return nil
}

func (x *fakeXen) Domain(dom uint32) (xenctrl.DomainInfo, error) {
	i := x.info
	i.ID = dom
	return i, nil
}

func (x *fakeXen) ReadPages(_ uint32, gfns []uint64) ([][]byte, error) {
	out := make([][]byte, len(gfns))
	for i, g := range gfns {
		if x.typ[g] == "rw" {
			out[i] = append([]byte(nil), x.mem[g]...)
		}
	}
	return out, nil
}

func (x *fakeXen) PagingNominate(_ uint32, g uint64) error {
	x.pausedDuringEvict = append(x.pausedDuringEvict, x.pause)
	if x.typ[g] != "rw" || x.busy[g] {
		return syscall.EBUSY
	}
	x.typ[g] = "paging_out"
	return nil
}

func (x *fakeXen) PagingEvict(_ uint32, g uint64) error {
	x.pausedDuringEvict = append(x.pausedDuringEvict, x.pause)
	if x.typ[g] != "paging_out" {
		return syscall.EBUSY
	}
	x.typ[g] = "paged"
	x.mem[g] = make([]byte, xenctrl.PageSize) // scrubbed
	return nil
}

func (x *fakeXen) PagingLoad(_ uint32, g uint64, page []byte) error {
	if x.loadErr != nil {
		return x.loadErr
	}
	if x.typ[g] != "paged" && x.typ[g] != "paging_out" {
		return syscall.ENOENT
	}
	if len(page) != xenctrl.PageSize {
		return syscall.EINVAL
	}
	x.loads = append(x.loads, g)
	x.mem[g] = append([]byte(nil), page...)
	x.typ[g] = "rw"
	return nil
}

// fakeRing stands in for the vm_event ring: queued requests, recorded
// responses and notifications.
type fakeRing struct {
	reqs      []xenctrl.Request
	rsps      []xenctrl.Response
	notifies  int
	pending   int // answered requests not yet covered by a notify
	withEvent bool
}

func (r *fakeRing) GetRequest() (xenctrl.Request, bool, error) {
	if len(r.reqs) == 0 {
		return xenctrl.Request{}, false, nil
	}
	q := r.reqs[0]
	r.reqs = r.reqs[1:]
	return q, true, nil
}

func (r *fakeRing) PutResponse(rsp xenctrl.Response) error {
	r.rsps = append(r.rsps, rsp)
	r.pending++
	return nil
}

func (r *fakeRing) Notify() error { r.notifies++; r.pending = 0; return nil }

func (r *fakeRing) Wait(time.Duration) (bool, error) {
	return r.withEvent && len(r.reqs) > 0, nil
}

func (r *fakeRing) State() xenctrl.RingState { return xenctrl.RingState{} }

func (r *fakeRing) ResponseVersions(int) []uint32 { return nil }

func pagingReq(gfn uint64, flags, pflags uint32) xenctrl.Request {
	return xenctrl.Request{Version: xenctrl.VMEventInterfaceVersion, Flags: flags, Reason: xenctrl.ReasonMemPaging,
		VCPUID: 0, GFN: gfn, P2MType: 10, PagingFlags: pflags}
}

func TestEvictSavesContentPausedAndCountsFailures(t *testing.T) {
	x := newFakeXen(0x100, 0x101, 0x102)
	x.busy[0x101] = true
	p := newSelfTestPager(x, 5, nil)
	require.NoError(t, p.evict([]uint64{0x100, 0x101, 0x102, 0x999}))
	assert.Equal(t, 2, p.stats.Evicted)
	assert.Equal(t, 2, p.stats.EvictFailures, "0x101 busy, 0x999 unmappable")
	assert.Equal(t, "paged", x.typ[0x100])
	assert.Equal(t, "rw", x.typ[0x101])
	assert.Equal(t, bytes.Repeat([]byte{0x02}, xenctrl.PageSize), p.saved[0x102], "content saved before eviction")
	assert.Zero(t, x.pause, "the domain is unpaused again")
	for _, depth := range x.pausedDuringEvict {
		assert.Equal(t, 1, depth, "nominate/evict run with the domain paused")
	}
	assert.Equal(t, 2, p.outstanding())
}

func TestHandleLoadsEvictedThenAnswersRepeatsPlainly(t *testing.T) {
	x := newFakeXen(0x200)
	p := newSelfTestPager(x, 5, nil)
	require.NoError(t, p.evict([]uint64{0x200}))
	ring := &fakeRing{reqs: []xenctrl.Request{
		pagingReq(0x200, xenctrl.FlagVCPUPaused, 0),
		pagingReq(0x200, xenctrl.FlagVCPUPaused, 0), // a second vCPU access raced the first
	}}
	n, err := p.drain(ring)
	require.NoError(t, err)
	assert.Equal(t, 2, n)
	assert.Equal(t, []uint64{0x200}, x.loads, "loaded once")
	assert.Equal(t, bytes.Repeat([]byte{0x00}, xenctrl.PageSize), x.mem[0x200], "original content (byte(0x200) = 0) is back")
	require.Len(t, ring.rsps, 2)
	for _, rsp := range ring.rsps {
		assert.Equal(t, uint64(0x200), rsp.GFN)
		assert.NotZero(t, rsp.Flags&xenctrl.FlagVCPUPaused, "the vCPU must be unpaused by the response")
		assert.Equal(t, uint32(xenctrl.ReasonMemPaging), rsp.Reason)
	}
	assert.Equal(t, 1, ring.notifies, "one notify per drained batch")
	assert.Equal(t, 1, p.stats.Loaded)
	assert.Equal(t, 1, p.stats.Plain)
	assert.Equal(t, 2, p.stats.Paused)
	assert.Zero(t, p.outstanding())
	assert.NoError(t, p.stats.verdict())
}

func TestHandleDropUnknownAndErrors(t *testing.T) {
	x := newFakeXen(0x300, 0x301)
	p := newSelfTestPager(x, 5, nil)
	require.NoError(t, p.evict([]uint64{0x300, 0x301}))
	ring := &fakeRing{reqs: []xenctrl.Request{
		pagingReq(0x300, 0, xenctrl.PagingDropPage),
		pagingReq(0x777, xenctrl.FlagForeign, 0), // not ours
	}}
	_, err := p.drain(ring)
	require.NoError(t, err)
	assert.Empty(t, x.loads, "a dropped page and an unknown gfn are not loaded")
	assert.Equal(t, 1, p.stats.Dropped)
	assert.Equal(t, 1, p.stats.Foreign)
	assert.Len(t, ring.rsps, 2, "every request is answered, or its ring slot is lost")

	x.loadErr = fmt.Errorf("load: %w", syscall.ENOMEM)
	ring.reqs = []xenctrl.Request{pagingReq(0x301, xenctrl.FlagVCPUPaused, 0)}
	_, err = p.drain(ring)
	require.NoError(t, err)
	assert.Equal(t, 1, p.stats.LoadErrors)
	assert.Len(t, ring.rsps, 3, "a failed load is still answered so the vCPU is not left paused")
	assert.ErrorContains(t, p.stats.verdict(), "1 page loads failed")
}

func TestLoadENOENTMeansAlreadyResident(t *testing.T) {
	x := newFakeXen(0x400)
	p := newSelfTestPager(x, 5, nil)
	require.NoError(t, p.evict([]uint64{0x400}))
	x.typ[0x400] = "rw" // paged back by someone else
	ring := &fakeRing{reqs: []xenctrl.Request{pagingReq(0x400, xenctrl.FlagVCPUPaused, 0)}}
	_, err := p.drain(ring)
	require.NoError(t, err)
	assert.Zero(t, p.stats.LoadErrors)
	assert.Equal(t, 1, p.stats.Plain)
	assert.Zero(t, p.outstanding())
}

func TestServeStopsAfterLingerAndRestoreLoadsTheRest(t *testing.T) {
	x := newFakeXen(0x500, 0x501)
	p := newSelfTestPager(x, 5, nil)
	require.NoError(t, p.evict([]uint64{0x500, 0x501}))
	ring := &fakeRing{reqs: []xenctrl.Request{pagingReq(0x500, xenctrl.FlagVCPUPaused, 0)}}
	start := time.Now()
	require.NoError(t, p.serve(ring, time.Now().Add(200*time.Millisecond), 0, time.Millisecond))
	assert.GreaterOrEqual(t, time.Since(start), 150*time.Millisecond, "0x501 is outstanding: serve runs to the deadline")
	assert.Equal(t, 1, p.stats.PolledRequests, "found by the timer, no event")
	require.NoError(t, p.restore(ring))
	assert.Equal(t, 1, p.stats.Restored)
	assert.Equal(t, "rw", x.typ[0x501])
	assert.Equal(t, bytes.Repeat([]byte{0x01}, xenctrl.PageSize), x.mem[0x501])
	assert.Zero(t, x.pause)

	// Everything back: serve returns after linger, long before the deadline.
	ring2 := &fakeRing{withEvent: true}
	start = time.Now()
	require.NoError(t, p.serve(ring2, time.Now().Add(10*time.Second), 20*time.Millisecond, time.Millisecond))
	assert.Less(t, time.Since(start), 2*time.Second)
}

func TestVerdictNamesTheMissingStep(t *testing.T) {
	assert.ErrorContains(t, pagerStats{}.verdict(), "no page could be evicted")
	assert.ErrorContains(t, pagerStats{Evicted: 3}.verdict(), "no paging request")
	assert.ErrorContains(t, pagerStats{Evicted: 3, Requests: 2, Plain: 2}.verdict(), "none asked for an evicted page")
	assert.NoError(t, pagerStats{Evicted: 3, Requests: 3, Loaded: 3}.verdict())
}

func TestParseGFNList(t *testing.T) {
	g, err := parseGFNList("0x10-12,5, 11\n20")
	require.NoError(t, err)
	assert.Equal(t, []uint64{0x5, 0x10, 0x11, 0x12, 0x20}, g)

	f := filepath.Join(t.TempDir(), "gfns")
	require.NoError(t, os.WriteFile(f, []byte("a-b\nc\n"), 0o600))
	g, err = parseGFNList("@" + f)
	require.NoError(t, err)
	assert.Equal(t, []uint64{0xa, 0xb, 0xc}, g)

	for _, bad := range []string{"", "zz", "12-10", "1-", "0-ffffffff", "@/nonexistent/gfns"} {
		_, err := parseGFNList(bad)
		assert.Error(t, err, bad)
	}
}

func TestDyingDomainStopsServeAndRestoreWithTheReason(t *testing.T) {
	x := newFakeXen(0x600, 0x601, 0x602)
	p := newSelfTestPager(x, 5, nil)
	require.NoError(t, p.evict([]uint64{0x600, 0x601, 0x602}))
	// Xen answers paging ops on a dying domain with EINVAL.
	x.loadErr = syscall.EINVAL
	x.info.Dying = true
	ring := &fakeRing{reqs: []xenctrl.Request{pagingReq(0x600, xenctrl.FlagVCPUPaused, 0)}}
	_, err := p.drain(ring)
	require.ErrorContains(t, err, "is dying")
	err = p.restore(ring)
	require.ErrorContains(t, err, "is dying")
	assert.ErrorContains(t, err, "evicted gfns not restored")
	assert.Equal(t, 2, p.stats.LoadErrors, "one failed request load, then restore stops at the first failure")
}

func TestServeStopsWhenInterrupted(t *testing.T) {
	x := newFakeXen(0x700)
	p := newSelfTestPager(x, 5, nil)
	require.NoError(t, p.evict([]uint64{0x700}))
	stop := make(chan struct{})
	close(stop)
	p.stop = stop
	err := p.serve(&fakeRing{}, time.Now().Add(10*time.Second), 0, time.Millisecond)
	require.ErrorContains(t, err, "interrupted")
	require.NoError(t, p.restore(&fakeRing{}))
	assert.Equal(t, "rw", x.typ[0x700], "the page is back after an interruption")
}

func TestLoadVerifiesSavedCopyAndReadBack(t *testing.T) {
	x := newFakeXen(0x800, 0x801)
	p := newSelfTestPager(x, 5, nil)
	require.NoError(t, p.evict([]uint64{0x800, 0x801}))
	p.saved[0x800][7] ^= 0xff // our copy rots after it was saved
	ring := &fakeRing{reqs: []xenctrl.Request{pagingReq(0x800, xenctrl.FlagVCPUPaused, 0)}}
	_, err := p.drain(ring)
	require.NoError(t, err)
	assert.Equal(t, 1, p.stats.SavedCorrupt)
	assert.Zero(t, p.stats.ReadbackBad, "the fake guest holds what was loaded")
	assert.ErrorContains(t, p.stats.verdict(), "changed in the pager's own memory")

	// A hypervisor that stores something else than what was loaded.
	bad := &lyingXen{fakeXen: x}
	p.x = bad
	ring.reqs = []xenctrl.Request{pagingReq(0x801, xenctrl.FlagVCPUPaused, 0)}
	_, err = p.drain(ring)
	require.NoError(t, err)
	assert.Equal(t, 1, p.stats.ReadbackBad)
}

// lyingXen loads a page with one byte flipped.
type lyingXen struct{ *fakeXen }

func (l *lyingXen) PagingLoad(dom uint32, g uint64, page []byte) error {
	c := append([]byte(nil), page...)
	c[0] ^= 1
	return l.fakeXen.PagingLoad(dom, g, c)
}
