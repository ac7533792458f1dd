package xendom

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"syscall"
	"time"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
)

// The paging self-test proves the vm_event mechanism post-copy is built
// on, on the destination's own Pager: it evicts pages of a running guest
// and serves the guest's paging requests by loading the saved content
// back, the way a post-copy destination loads the pages it fetched from
// the source.

// SelfTestOptions configure SelfTest.
type SelfTestOptions struct {
	// GFNs are the gfns to evict: ascending, each once.
	GFNs []uint64
	// Timeout bounds the serving; then every gfn still out is restored.
	Timeout time.Duration
	// Linger is how long requests are still served once every evicted
	// gfn is back (stray requests, foreign mappings).
	Linger time.Duration
	// Poll is how long one wait for the event channel lasts at most: the
	// ring is looked at that often even without an event.
	Poll time.Duration
	// Verify checksums every saved page before loading it and reads
	// every loaded page back: dom0 memory in the nested lab was not
	// always what had been written.
	Verify bool
	// Logf gets the detail (every request); nil: none.
	Logf func(format string, a ...any)
	// Printf gets what is always shown: the progress every 5 s and the
	// first failures, the evidence when the test fails; nil: none.
	Printf func(format string, a ...any)
	// Evicted, if set, is called once the pages are out and the domain
	// runs again, before the serving starts.
	Evicted func(SelfTestStats)
}

// SelfTestStats are the self-test's counts; String prints them as the
// key=value list of the PAGER-STATS line.
type SelfTestStats struct {
	Asked          int // gfns given
	Evicted        int
	EvictFailures  int // not mappable to save, or page-out refused (page in use, ...)
	Requests       int // paging requests taken off the ring
	Loaded         int // evicted gfns loaded back because a request asked
	Plain          int // requests answered without loading (gfn already back, not ours, drop)
	EvictFailFlag  int // requests carrying MEM_PAGING_EVICT_FAIL
	Dropped        int // requests carrying MEM_PAGING_DROP_PAGE
	Foreign        int // requests raised by a foreign mapping, not a vCPU
	Paused         int // requests whose vCPU waits for our response
	LoadErrors     int
	Events         int // event-channel notifications seen
	PolledRequests int // requests found on the ring by the timer, without an event
	Restored       int // evicted gfns nobody asked for, loaded back at the end
	SavedCorrupt   int // saved pages whose checksum changed before loading (our memory corrupted)
	ReadbackBad    int // loaded pages that read back different from what was loaded
	FirstRequestMS int64
	LastLoadMS     int64
}

// String is the PAGER-STATS key=value list; lab scenarios parse it.
func (s SelfTestStats) String() string {
	return fmt.Sprintf("asked=%d evicted=%d evict_failures=%d requests=%d loaded=%d plain=%d evict_fail_flag=%d dropped=%d "+
		"foreign=%d vcpu_paused=%d load_errors=%d events=%d polled_requests=%d restored=%d saved_corrupt=%d readback_bad=%d "+
		"first_request_ms=%d last_load_ms=%d",
		s.Asked, s.Evicted, s.EvictFailures, s.Requests, s.Loaded, s.Plain, s.EvictFailFlag, s.Dropped,
		s.Foreign, s.Paused, s.LoadErrors, s.Events, s.PolledRequests, s.Restored, s.SavedCorrupt, s.ReadbackBad,
		s.FirstRequestMS, s.LastLoadMS)
}

// Verdict says why a finished self-test failed, or nil.
func (s SelfTestStats) Verdict() error {
	switch {
	case s.Evicted == 0:
		return errors.New("no page could be evicted (see --debug for nominate/evict errors)")
	case s.Requests == 0:
		return errors.New("pages were evicted but no paging request reached the ring: the guest never touched them, " +
			"or Xen did not raise requests for its accesses")
	case s.LoadErrors > 0:
		return fmt.Errorf("%d page loads failed", s.LoadErrors)
	case s.SavedCorrupt > 0:
		return fmt.Errorf("%d saved pages changed in the pager's own memory before they were loaded", s.SavedCorrupt)
	case s.ReadbackBad > 0:
		return fmt.Errorf("%d loaded pages read back different from what was loaded", s.ReadbackBad)
	case s.Loaded == 0:
		return errors.New("requests arrived but none asked for an evicted page")
	}
	return nil
}

// EvictError is SelfTest's error when the eviction itself could not be
// done (pause, copy, unpause): nothing was served, and the pages already
// out were restored (Restore: how that went).
type EvictError struct {
	Err     error
	Restore error
}

// Error says what failed, and how the restore went.
func (e *EvictError) Error() string { return fmt.Sprintf("%v (restore: %v)", e.Err, e.Restore) }

// Unwrap returns the eviction's error.
func (e *EvictError) Unwrap() error { return e.Err }

// RingInspector is a Ring that shows its indexes (*xenctrl.PagingRing):
// the self-test's progress lines carry them as evidence.
type RingInspector interface {
	State() xenctrl.RingState
	// ResponseVersions are the versions of the last n responses on the ring.
	ResponseVersions(n int) []uint32
}

// RingState is r's indexes as text, or "unknown" for a ring that does
// not show them.
func RingState(r Ring) string {
	if ri, ok := r.(RingInspector); ok {
		return ri.State().String()
	}
	return "unknown"
}

// SelfTest runs the paging self-test on dom, whose paging ring is ring
// (the caller enabled paging and disables it afterwards): it saves and
// evicts opt.GFNs with the domain paused, serves the guest's requests by
// loading the saved pages until every evicted gfn is back (plus
// opt.Linger), opt.Timeout passes or ctx is cancelled, then restores
// every gfn still out. The error is the serving's or the restore's (an
// *EvictError if nothing could be served); the stats' Verdict judges the
// run itself.
func SelfTest(ctx context.Context, hv Hypervisor, dom uint32, ring Ring, opt SelfTestOptions) (SelfTestStats, error) {
	t := newSelfTest(hv, dom, ring, opt)
	if err := t.evict(); err != nil {
		rerr := t.restore()
		return t.stats(), &EvictError{Err: err, Restore: rerr}
	}
	if opt.Evicted != nil {
		opt.Evicted(t.stats())
	}
	serveErr := t.serve(ctx)
	restoreErr := t.restore()
	if serveErr != nil {
		return t.stats(), serveErr
	}
	return t.stats(), restoreErr
}

// selfTest is one run of SelfTest.
type selfTest struct {
	hv   Hypervisor
	dom  uint32
	ring Ring
	pg   *Pager
	opt  SelfTestOptions
	// saved[i] is page i's content as saved before eviction (nil: not
	// saved, so never evicted), sums[i] its checksum then.
	saved [][]byte
	sums  []uint64
	// own are the counts the Pager does not keep; stats adds its own.
	own      SelfTestStats
	plain    int // requests the self-test answered without loading (the Pager counts its own)
	sawFirst bool
	start    time.Time
	failures int // reported by noteFailure
}

func newSelfTest(hv Hypervisor, dom uint32, ring Ring, opt SelfTestOptions) *selfTest {
	if opt.Logf == nil {
		opt.Logf = func(string, ...any) {}
	}
	if opt.Printf == nil {
		opt.Printf = func(string, ...any) {}
	}
	logf := opt.Logf
	pg := NewPager(hv, dom, ring, opt.GFNs, PageResident, PagerOptions{
		Logf: logf,
		Taken: func(r xenctrl.Request) {
			logf("request gfn %#x vcpu %d flags %#x paging_flags %#x p2mt %d", r.GFN, r.VCPUID, r.Flags, r.PagingFlags, r.P2MType)
		},
	})
	return &selfTest{hv: hv, dom: dom, ring: ring, pg: pg, opt: opt, saved: make([][]byte, len(opt.GFNs)),
		sums: make([]uint64, len(opt.GFNs)), start: time.Now()}
}

// stats are the run's counts: the self-test's own and its Pager's.
func (t *selfTest) stats() SelfTestStats {
	s := t.own
	ps := t.pg.Stats()
	s.Requests, s.Foreign, s.Paused = int(ps.Requests), int(ps.Foreign), int(ps.VCPUPaused)
	s.EvictFailFlag, s.Dropped = int(ps.EvictFailFlag), int(ps.Dropped)
	s.Events, s.PolledRequests = int(ps.Events), int(ps.PolledRequests)
	s.Plain = int(ps.Plain) + t.plain
	return s
}

// readBatch is how many gfns one foreign mapping saves: a bounded
// mapping, and the guest's pages copied in few calls.
const readBatch = 256

// evict saves and evicts the gfns with the domain paused, so that no
// guest write can land between our copy and the eviction (evict does not
// look for such writes: one would be lost). Pages are copied before
// paging them out: a foreign mapping holds a reference, and nominate
// wants none (ReadPages leaves no mapping behind).
func (t *selfTest) evict() (err error) {
	gfns := t.opt.GFNs
	t.own.Asked = len(gfns)
	if err := t.hv.Pause(t.dom); err != nil {
		return fmt.Errorf("pause the domain before evicting: %w", err)
	}
	defer func() {
		if uerr := t.hv.Unpause(t.dom); uerr != nil && err == nil {
			err = fmt.Errorf("unpause the domain after evicting: %w", uerr)
		}
	}()
	buf := make([]byte, readBatch*PageSize)
	var toEvict []uint64
	for at := 0; at < len(gfns); at += readBatch {
		part := gfns[at:min(at+readBatch, len(gfns))]
		failed, err := t.hv.ReadPages(t.dom, part, buf)
		if err != nil {
			return fmt.Errorf("save the pages to evict: gfns %#x..%#x: %w", part[0], part[len(part)-1], err)
		}
		for j, g := range part {
			if slices.Contains(failed, j) {
				t.opt.Logf("gfn %#x not mappable, not evicting it", g)
				t.own.EvictFailures++
				continue
			}
			i := at + j
			t.saved[i] = bytes.Clone(buf[j*PageSize : (j+1)*PageSize])
			t.sums[i] = pageSum(t.saved[i])
			toEvict = append(toEvict, uint64(i))
		}
	}
	for at := 0; at < len(toEvict); at += evictBatch {
		chunk := toEvict[at:min(at+evictBatch, len(toEvict))]
		failed, err := t.pg.PageOut(chunk)
		if err != nil {
			t.noteFailure("page out %d of %d gfns failed (first: %v)", len(failed), len(chunk), err)
		}
		t.own.Evicted += len(chunk) - len(failed)
		t.own.EvictFailures += len(failed)
		for _, i := range failed {
			t.undoPageOut(i)
		}
	}
	return nil
}

// undoPageOut puts back a gfn whose page-out failed: its nominate or its
// evict was refused, and the hypervisor does not say which. A nominated
// gfn a touch would page in is loaded back now with its (unchanged,
// the domain is paused) saved content; ENOENT says it was never
// nominated. Only a gfn that cannot be put back stays in the test
// (evicted: served on request, restored at the end).
func (t *selfTest) undoPageOut(i uint64) {
	g := t.pg.gfns[i]
	_, err := t.pg.Load([]uint64{i}, []uint64{g}, t.saved[i])
	if err != nil {
		t.noteFailure("gfn %#x: page-out failed and it cannot be loaded back (%v): it is served as evicted", g, err)
		t.pg.SetState(i, PageEvicted)
		return
	}
	t.pg.SetState(i, PageResident)
	t.saved[i] = nil
}

func pageSum(b []byte) uint64 {
	h := fnv.New64a()
	h.Write(b)
	return h.Sum64()
}

// load loads page i's saved content and returns the requests now to be
// answered and whether the page was loaded (not: Xen had it in already).
// With Verify it first checks that the saved copy is unchanged since it
// was taken and afterwards reads the guest page back through a foreign
// mapping: a mismatch there means the guest does not hold what we loaded.
func (t *selfTest) load(i uint64) ([]xenctrl.Request, bool, error) {
	g, page := t.pg.gfns[i], t.saved[i]
	if t.opt.Verify && pageSum(page) != t.sums[i] {
		t.own.SavedCorrupt++
		t.noteFailure("gfn %#x: the saved copy changed in our memory since it was saved", g)
	}
	wake, err := t.pg.Load([]uint64{i}, []uint64{g}, page)
	if err != nil {
		return wake, false, err
	}
	if t.pg.State(i) == PageDropped {
		// Xen says the gfn is not paged (out or in) any more: it is
		// back already; the responses still resume the vCPUs.
		t.opt.Logf("load gfn %#x: already resident", g)
		return wake, false, nil
	}
	if !t.opt.Verify {
		return wake, true, nil
	}
	back := make([]byte, PageSize)
	failed, err := t.hv.ReadPages(t.dom, []uint64{g}, back)
	if err != nil || len(failed) > 0 {
		t.noteFailure("gfn %#x: cannot read the loaded page back: %v", g, err)
		return wake, true, nil
	}
	if !bytes.Equal(back, page) {
		t.own.ReadbackBad++
		diff := 0
		for k := range page {
			if page[k] != back[k] {
				diff++
			}
		}
		t.noteFailure("gfn %#x: loaded page reads back different (%d bytes differ; saved sum %x, loaded sum %x, read back sum %x)",
			g, diff, t.sums[i], pageSum(page), pageSum(back))
	}
	return wake, true, nil
}

// handle serves the faults the Pager returned: an evicted page is loaded
// from its saved copy, any other (not evicted by us, or a failed load)
// is answered plainly. Every request gets a response, one notify for
// all: an unanswered request keeps its ring slot and its vCPU for ever.
func (t *selfTest) handle(faults []uint64) error {
	var wake []xenctrl.Request
	var gone error
	for _, i := range faults {
		if t.pg.State(i) != PageEvicted || t.saved[i] == nil {
			reqs := t.pg.TakePending(i, t.pg.State(i))
			t.plain += len(reqs)
			wake = append(wake, reqs...)
			continue
		}
		reqs, loaded, err := t.load(i)
		if err != nil {
			t.own.LoadErrors++
			t.noteFailure("%v", err)
			if gone = t.guestGone(); gone != nil {
				// Left evicted: nothing can be loaded any more, and the
				// restore says how many gfns stayed out.
				gone = fmt.Errorf("load gfn %#x: %w", t.pg.gfns[i], gone)
				break
			}
			reqs = append(reqs, t.pg.TakePending(i, PageLoaded)...)
		}
		if loaded {
			t.own.Loaded++
			t.own.LastLoadMS = time.Since(t.start).Milliseconds()
			t.plain += max(0, len(reqs)-1) // a second vCPU's access raced the first
		} else {
			t.plain += len(reqs)
		}
		wake = append(wake, reqs...)
	}
	if len(wake) > 0 {
		if err := t.pg.Answer(wake); err != nil {
			return errors.Join(gone, err)
		}
	}
	return gone
}

// noteFirstRequest records when the first request came.
func (t *selfTest) noteFirstRequest() {
	if !t.sawFirst && t.pg.Stats().Requests > 0 {
		t.sawFirst = true
		t.own.FirstRequestMS = time.Since(t.start).Milliseconds()
	}
}

// serve answers requests until every evicted gfn is back and Linger has
// passed since, or until Timeout, or until ctx is cancelled (the caller's
// SIGINT: the pages still out are then restored, so an interrupted test
// does not strand the guest).
func (t *selfTest) serve(ctx context.Context) error {
	deadline := time.Now().Add(t.opt.Timeout)
	var doneAt time.Time
	lastReport := time.Now()
	lastRequests := -1
	for {
		now := time.Now()
		if now.After(deadline) {
			return nil
		}
		select {
		case <-ctx.Done():
			return errors.New("interrupted; evicted pages are being restored")
		default:
		}
		if t.pg.Count(PageEvicted) == 0 {
			if doneAt.IsZero() {
				doneAt = now
			}
			if now.Sub(doneAt) >= t.opt.Linger {
				return nil
			}
		}
		faults, err := t.pg.Serve(t.opt.Poll)
		t.noteFirstRequest()
		if err != nil {
			return err
		}
		if err := t.handle(faults); err != nil {
			return err
		}
		if time.Since(lastReport) >= 5*time.Second {
			lastReport = time.Now()
			if gone := t.guestGone(); gone != nil {
				return gone
			}
			s, out := t.stats(), t.pg.Count(PageEvicted)
			t.opt.Printf("t=%ds outstanding=%d %v ring[%v]", int(time.Since(t.start).Seconds()), out, s, RingState(t.ring))
			if s.Requests == lastRequests && out > 0 {
				// No request for 5 s with pages still out: if a vCPU waits
				// for a response Xen rejected, the ring shows it.
				var versions []uint32
				if ri, ok := t.ring.(RingInspector); ok {
					versions = ri.ResponseVersions(8)
				}
				t.opt.Printf("no request for 5 s; versions of the last responses on the ring: %v", versions)
			}
			lastRequests = s.Requests
		}
	}
}

// restore loads every gfn still evicted, with the domain paused, and
// answers what is on the ring, so that disabling paging leaves no gfn the
// guest could fault on without a pager.
func (t *selfTest) restore() error {
	if err := t.hv.Pause(t.dom); err != nil {
		return fmt.Errorf("pause the domain to restore pages: %w", err)
	}
	var firstErr error
	keep := func(err error) {
		if err != nil && firstErr == nil {
			firstErr = err
		}
	}
	t.poll(keep)
	var out []uint64
	for i := range t.pg.gfns {
		if t.pg.State(uint64(i)) == PageEvicted {
			out = append(out, uint64(i))
		}
	}
	var wake []xenctrl.Request
	for _, i := range out {
		g := t.pg.gfns[i]
		if t.saved[i] == nil {
			// Cannot happen by construction (only saved gfns are evicted);
			// say so loudly rather than load garbage.
			t.own.LoadErrors++
			keep(fmt.Errorf("gfn %#x is evicted but its content was never saved", g))
			continue
		}
		reqs, _, err := t.load(i)
		wake = append(wake, reqs...)
		if err != nil {
			t.own.LoadErrors++
			keep(fmt.Errorf("restore: %w", err))
			if gone := t.guestGone(); gone != nil {
				firstErr = fmt.Errorf("%w; %d evicted gfns not restored", gone, len(out)-t.own.Restored)
				break
			}
			continue
		}
		t.own.Restored++
	}
	if len(wake) > 0 {
		// Requests that waited for a page only the restore loaded (a
		// failed load earlier); counted plain: no request asked the load.
		t.plain += len(wake)
		keep(t.pg.Answer(wake))
	}
	t.poll(keep)
	if err := t.hv.Unpause(t.dom); err != nil {
		keep(fmt.Errorf("unpause after restoring pages: %w", err))
	}
	return firstErr
}

// poll serves what is on the ring now, without waiting.
func (t *selfTest) poll(keep func(error)) {
	faults, err := t.pg.Poll()
	t.noteFirstRequest()
	keep(err)
	keep(t.handle(faults))
}

// guestGone says why the domain cannot be paged any more (dying, gone,
// shut down), or returns nil while it is alive. Xen answers paging ops on
// a dying domain with EINVAL, which alone would be misleading.
func (t *selfTest) guestGone() error {
	info, err := t.hv.Domain(t.dom)
	switch {
	case errors.Is(err, syscall.ESRCH):
		return fmt.Errorf("domain %d no longer exists", t.dom)
	case err != nil:
		return nil // cannot tell; let the caller's own error stand
	case info.Dying:
		return fmt.Errorf("domain %d is dying (destroyed, or restarted by xl after a reboot/triple fault)", t.dom)
	case info.Shutdown:
		return fmt.Errorf("domain %d shut down (reason %d: 0 poweroff, 1 reboot — also a triple fault —, 2 suspend, 3 crash): see `xl dmesg`",
			t.dom, info.ShutdownReason)
	}
	return nil
}

// noteFailure reports the first few failures through Printf (they are
// the evidence when the self-test fails), the rest through Logf.
func (t *selfTest) noteFailure(format string, a ...any) {
	t.failures++
	if t.failures <= 10 {
		t.opt.Printf(format, a...)
	} else {
		t.opt.Logf(format, a...)
	}
}
