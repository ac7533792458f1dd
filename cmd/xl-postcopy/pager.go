//go:build cgo

package main

import (
	"bytes"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
)

// pager-selftest proves the vm_event paging mechanism post-copy is built on:
// it evicts pages of a running guest and serves the guest's paging requests
// by loading the saved content back, the way the destination of a post-copy
// migration will load pages fetched from the source.

func init() {
	register(&command{
		name:    "pager-selftest",
		args:    "[options] <domain>",
		summary: "evict guest pages and serve the paging requests (vm_event paging self-test)",
		setup: func(fs *pflag.FlagSet) {
			fs.String("gfns", "", "gfns to evict: hex ranges `LIST` like 1a00-1aff,1c00 (or @FILE holding them)")
			fs.Duration("timeout", 60*time.Second, "serve requests at most this long, then page every remaining gfn back in")
			fs.Duration("linger", 3*time.Second, "after every evicted gfn is back, keep serving stray requests this long")
			fs.Int("limit", 0, "evict only the first N gfns of the list (0: all)")
			fs.Duration("poll", 20*time.Millisecond, "look at the ring at least this often even without an event")
			fs.Bool("verify", true, "checksum saved pages before loading them and read every loaded page back")
			fs.Bool("debug", false, "log every libxc call and every request")
		},
		run: runPagerSelftest,
	})
}

// pagerXen is what the self-test needs from the hypervisor; xenctrl.Handle
// provides it, tests use a double.
type pagerXen interface {
	Pause(dom uint32) error
	Unpause(dom uint32) error
	// ReadPages copies the content of gfns; pages[i] is nil when gfn i
	// could not be mapped. No mapping is left behind.
	ReadPages(dom uint32, gfns []uint64) (pages [][]byte, err error)
	PagingNominate(dom uint32, gfn uint64) error
	PagingEvict(dom uint32, gfn uint64) error
	PagingLoad(dom uint32, gfn uint64, page []byte) error
	Domain(dom uint32) (xenctrl.DomainInfo, error)
}

// pagerRing is the vm_event ring as the pager uses it (*xenctrl.PagingRing).
type pagerRing interface {
	GetRequest() (xenctrl.Request, bool, error)
	PutResponse(xenctrl.Response) error
	Notify() error
	Wait(timeout time.Duration) (bool, error)
	State() xenctrl.RingState
	ResponseVersions(n int) []uint32
}

// gfnState is where a gfn of the self-test stands.
type gfnState int

const (
	gfnResident gfnState = iota // not (or no longer) evicted by us
	gfnEvicted                  // evicted, content saved
	gfnLoaded                   // loaded back after a request
)

// pagerStats are the self-test's counts, printed as one key=value line.
type pagerStats struct {
	Asked          int // gfns given
	Evicted        int
	EvictFailures  int // nominate or evict refused (page in use, ...)
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

func (s pagerStats) String() string {
	return fmt.Sprintf("asked=%d evicted=%d evict_failures=%d requests=%d loaded=%d plain=%d evict_fail_flag=%d dropped=%d "+
		"foreign=%d vcpu_paused=%d load_errors=%d events=%d polled_requests=%d restored=%d saved_corrupt=%d readback_bad=%d "+
		"first_request_ms=%d last_load_ms=%d",
		s.Asked, s.Evicted, s.EvictFailures, s.Requests, s.Loaded, s.Plain, s.EvictFailFlag, s.Dropped,
		s.Foreign, s.Paused, s.LoadErrors, s.Events, s.PolledRequests, s.Restored, s.SavedCorrupt, s.ReadbackBad,
		s.FirstRequestMS, s.LastLoadMS)
}

// xenPagerHandle adapts xenctrl.Handle to pagerXen.
type xenPagerHandle struct {
	*xenctrl.Handle
	logf func(string, ...any)
}

// ReadPages maps gfns in batches, copies them and unmaps at once: a
// foreign mapping holds a page reference, and Xen refuses to nominate a
// page with extra references.
func (x xenPagerHandle) ReadPages(dom uint32, gfns []uint64) ([][]byte, error) {
	const batch = 256
	out := make([][]byte, len(gfns))
	for i := 0; i < len(gfns); i += batch {
		part := gfns[i:min(i+batch, len(gfns))]
		m, err := x.MapBatch(dom, xenctrl.ProtRead, part)
		if err != nil {
			return nil, fmt.Errorf("map gfns %#x..%#x: %w", part[0], part[len(part)-1], err)
		}
		for j, g := range part {
			pg, perr := m.Page(j)
			if perr != nil {
				x.logf("gfn %#x not mappable, not evicting it: %v", g, perr)
				continue
			}
			out[i+j] = append([]byte(nil), pg...)
		}
		if err := m.Unmap(); err != nil {
			return nil, fmt.Errorf("unmap saved gfns: %w", err)
		}
	}
	return out, nil
}

// selfTestPager evicts a set of gfns and pages them back in on request.
type selfTestPager struct {
	x     pagerXen
	dom   uint32
	saved map[uint64][]byte
	sums  map[uint64]uint64 // checksum of saved[gfn] taken when it was saved
	state map[uint64]gfnState
	// verify enables the checksum and read-back checks of loadSaved.
	verify bool
	stats  pagerStats
	start  time.Time
	// stop, when closed, ends serve early (SIGINT/SIGTERM): the pages still
	// out are then restored, so an interrupted test does not strand the guest.
	stop <-chan struct{}
	// failures counts the failures reported by noteFailure.
	failures int
	logf     func(format string, a ...any)
}

func newSelfTestPager(x pagerXen, dom uint32, logf func(string, ...any)) *selfTestPager {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	return &selfTestPager{x: x, dom: dom, saved: map[uint64][]byte{}, sums: map[uint64]uint64{},
		state: map[uint64]gfnState{}, logf: logf, start: time.Now(), verify: true}
}

// evict saves and evicts gfns with the domain paused, so that no guest
// write can land between our copy and the eviction (evict does not look
// for such writes: one would be lost). Pages are copied before nominating:
// a foreign mapping holds a reference, and nominate wants none.
func (p *selfTestPager) evict(gfns []uint64) (err error) {
	p.stats.Asked = len(gfns)
	if err := p.x.Pause(p.dom); err != nil {
		return fmt.Errorf("pause the domain before evicting: %w", err)
	}
	defer func() {
		if uerr := p.x.Unpause(p.dom); uerr != nil && err == nil {
			err = fmt.Errorf("unpause the domain after evicting: %w", uerr)
		}
	}()
	pages, err := p.x.ReadPages(p.dom, gfns)
	if err != nil {
		return fmt.Errorf("save the pages to evict: %w", err)
	}
	for i, g := range gfns {
		if i < len(pages) && pages[i] != nil {
			p.saved[g] = pages[i]
			p.sums[g] = pageSum(pages[i])
		}
	}
	for _, g := range gfns {
		if _, ok := p.saved[g]; !ok {
			p.stats.EvictFailures++
			continue
		}
		if err := p.x.PagingNominate(p.dom, g); err != nil {
			p.noteFailure("nominate gfn %#x: %v", g, err)
			p.stats.EvictFailures++
			delete(p.saved, g)
			continue
		}
		if err := p.x.PagingEvict(p.dom, g); err != nil {
			// The gfn stays nominated (paging_out); a guest touch of it
			// raises a request flagged EVICT_FAIL, which serve answers
			// by loading the (unchanged, still present) page.
			p.noteFailure("evict gfn %#x: %v", g, err)
			p.stats.EvictFailures++
			p.state[g] = gfnEvicted
			continue
		}
		p.state[g] = gfnEvicted
		p.stats.Evicted++
	}
	return nil
}

func pageSum(b []byte) uint64 {
	h := fnv.New64a()
	h.Write(b)
	return h.Sum64()
}

// loadSaved loads the saved content of gfn. With verify it first checks
// that the saved copy is unchanged since it was taken (dom0 memory in the
// nested lab is not always what was written) and afterwards reads the
// guest page back through a foreign mapping: a mismatch there means the
// guest does not hold what we loaded.
func (p *selfTestPager) loadSaved(gfn uint64) error {
	page := p.saved[gfn]
	if p.verify && pageSum(page) != p.sums[gfn] {
		p.stats.SavedCorrupt++
		p.noteFailure("gfn %#x: the saved copy changed in our memory since it was saved", gfn)
	}
	if err := p.x.PagingLoad(p.dom, gfn, page); err != nil {
		return err
	}
	if !p.verify {
		return nil
	}
	back, err := p.x.ReadPages(p.dom, []uint64{gfn})
	if err != nil || len(back) != 1 || back[0] == nil {
		p.noteFailure("gfn %#x: cannot read the loaded page back: %v", gfn, err)
		return nil
	}
	if !bytes.Equal(back[0], page) {
		p.stats.ReadbackBad++
		diff := 0
		for i := range page {
			if page[i] != back[0][i] {
				diff++
			}
		}
		p.noteFailure("gfn %#x: loaded page reads back different (%d bytes differ; saved sum %x, loaded sum %x, read back sum %x)",
			gfn, diff, p.sums[gfn], pageSum(page), pageSum(back[0]))
	}
	return nil
}

// guestGone says why the domain cannot be paged any more (dying, gone,
// shut down), or returns nil while it is alive. Xen answers paging ops on a
// dying domain with EINVAL, which alone would be misleading.
func (p *selfTestPager) guestGone() error {
	info, err := p.x.Domain(p.dom)
	switch {
	case errors.Is(err, syscall.ESRCH):
		return fmt.Errorf("domain %d no longer exists", p.dom)
	case err != nil:
		return nil // cannot tell; let the caller's own error stand
	case info.Dying:
		return fmt.Errorf("domain %d is dying (destroyed, or restarted by xl after a reboot/triple fault)", p.dom)
	case info.Shutdown:
		return fmt.Errorf("domain %d shut down (reason %d: 0 poweroff, 1 reboot — also a triple fault —, 2 suspend, 3 crash): see `xl dmesg`",
			p.dom, info.ShutdownReason)
	}
	return nil
}

// noteFailure reports the first few failures even without --debug: they
// are the evidence when the self-test fails.
func (p *selfTestPager) noteFailure(format string, a ...any) {
	p.failures++
	if p.failures <= 10 {
		fmt.Fprintf(os.Stderr, "pager-selftest: "+format+"\n", a...)
	} else {
		p.logf(format, a...)
	}
}

// outstanding is the number of evicted gfns not loaded back yet.
func (p *selfTestPager) outstanding() int {
	n := 0
	for _, s := range p.state {
		if s == gfnEvicted {
			n++
		}
	}
	return n
}

// handle answers one request. Every request gets a response, even those
// that need nothing: an unanswered request keeps its ring slot for ever.
func (p *selfTestPager) handle(ring pagerRing, req xenctrl.Request) error {
	p.stats.Requests++
	if p.stats.Requests == 1 {
		p.stats.FirstRequestMS = time.Since(p.start).Milliseconds()
	}
	if req.Flags&xenctrl.FlagForeign != 0 {
		p.stats.Foreign++
	}
	if req.Flags&xenctrl.FlagVCPUPaused != 0 {
		p.stats.Paused++
	}
	if req.PagingFlags&xenctrl.PagingEvictFail != 0 {
		p.stats.EvictFailFlag++
	}
	loaded := false
	switch {
	case req.Reason != xenctrl.ReasonMemPaging:
		p.logf("request with reason %d on the paging ring: answering plainly", req.Reason)
	case req.PagingFlags&xenctrl.PagingDropPage != 0:
		// The guest gave the page up (ballooned it): nothing to load.
		p.stats.Dropped++
		if p.state[req.GFN] == gfnEvicted {
			p.state[req.GFN] = gfnResident
		}
	case p.state[req.GFN] == gfnEvicted:
		err := p.loadSaved(req.GFN)
		switch {
		case err == nil:
			loaded = true
		case errors.Is(err, syscall.ENOENT):
			// Xen says the gfn is not paged (out or in) any more: it is
			// back already; the response below still resumes the vCPU.
			p.logf("load gfn %#x: already resident (%v)", req.GFN, err)
		default:
			p.stats.LoadErrors++
			p.noteFailure("load gfn %#x: %v", req.GFN, err)
			if gone := p.guestGone(); gone != nil {
				return fmt.Errorf("load gfn %#x: %w", req.GFN, gone)
			}
		}
		p.state[req.GFN] = gfnLoaded
	}
	if loaded {
		p.stats.Loaded++
		p.stats.LastLoadMS = time.Since(p.start).Milliseconds()
	} else {
		p.stats.Plain++
	}
	if err := ring.PutResponse(xenctrl.ResponseFor(req)); err != nil {
		return fmt.Errorf("answer the request for gfn %#x: %w", req.GFN, err)
	}
	return nil
}

// drain answers every request on the ring and notifies Xen once if it
// answered any. It returns how many it answered.
func (p *selfTestPager) drain(ring pagerRing) (int, error) {
	n := 0
	for {
		req, ok, err := ring.GetRequest()
		if !ok {
			break
		}
		if err != nil {
			// A version mismatch: still answer, Xen is waiting.
			p.logf("request: %v", err)
		}
		p.logf("request gfn %#x vcpu %d flags %#x paging_flags %#x p2mt %d", req.GFN, req.VCPUID, req.Flags, req.PagingFlags, req.P2MType)
		if err := p.handle(ring, req); err != nil {
			return n, err
		}
		n++
	}
	if n > 0 {
		if err := ring.Notify(); err != nil {
			return n, fmt.Errorf("notify Xen of %d responses: %w", n, err)
		}
	}
	return n, nil
}

// serve answers requests until every evicted gfn is back and linger has
// passed since, or until deadline.
func (p *selfTestPager) serve(ring pagerRing, deadline time.Time, linger, poll time.Duration) error {
	var doneAt time.Time
	lastReport := time.Now()
	lastRequests := -1
	for {
		now := time.Now()
		if now.After(deadline) {
			return nil
		}
		select {
		case <-p.stop:
			return errors.New("interrupted; evicted pages are being restored")
		default:
		}
		if p.outstanding() == 0 {
			if doneAt.IsZero() {
				doneAt = now
			}
			if now.Sub(doneAt) >= linger {
				return nil
			}
		}
		ev, err := ring.Wait(poll)
		if err != nil {
			return fmt.Errorf("wait for the paging event channel: %w", err)
		}
		if ev {
			p.stats.Events++
		}
		n, err := p.drain(ring)
		if err != nil {
			return err
		}
		if !ev {
			p.stats.PolledRequests += n
		}
		if time.Since(lastReport) >= 5*time.Second {
			lastReport = time.Now()
			if gone := p.guestGone(); gone != nil {
				return gone
			}
			fmt.Fprintf(os.Stderr, "pager-selftest: t=%ds outstanding=%d %v ring[%v]\n",
				int(time.Since(p.start).Seconds()), p.outstanding(), p.stats, ring.State())
			if p.stats.Requests == lastRequests && p.outstanding() > 0 {
				// No request for 5 s with pages still out: if a vCPU waits
				// for a response Xen rejected, the ring shows it.
				fmt.Fprintf(os.Stderr, "pager-selftest: no request for 5 s; versions of the last responses on the ring: %v\n",
					ring.ResponseVersions(8))
			}
			lastRequests = p.stats.Requests
		}
	}
}

// restore loads every gfn still evicted, with the domain paused, and
// answers what is on the ring, so that disabling paging leaves no gfn the
// guest could fault on without a pager.
func (p *selfTestPager) restore(ring pagerRing) error {
	if err := p.x.Pause(p.dom); err != nil {
		return fmt.Errorf("pause the domain to restore pages: %w", err)
	}
	var firstErr error
	keep := func(err error) {
		if firstErr == nil {
			firstErr = err
		}
	}
	if _, err := p.drain(ring); err != nil {
		keep(err)
	}
	gfns := make([]uint64, 0, len(p.state))
	for g, s := range p.state {
		if s == gfnEvicted {
			gfns = append(gfns, g)
		}
	}
	sort.Slice(gfns, func(i, j int) bool { return gfns[i] < gfns[j] })
	for _, g := range gfns {
		if _, ok := p.saved[g]; !ok {
			// Cannot happen by construction (only saved gfns are evicted);
			// say so loudly rather than load garbage.
			p.stats.LoadErrors++
			keep(fmt.Errorf("gfn %#x is evicted but its content was never saved", g))
			continue
		}
		err := p.loadSaved(g)
		if err != nil && !errors.Is(err, syscall.ENOENT) {
			p.stats.LoadErrors++
			keep(fmt.Errorf("restore gfn %#x: %w", g, err))
			if gone := p.guestGone(); gone != nil {
				keep(gone)
				firstErr = fmt.Errorf("%w; %d evicted gfns not restored", gone, len(gfns)-p.stats.Restored)
				break
			}
			continue
		}
		p.state[g] = gfnResident
		p.stats.Restored++
	}
	if _, err := p.drain(ring); err != nil {
		keep(err)
	}
	if err := p.x.Unpause(p.dom); err != nil {
		keep(fmt.Errorf("unpause after restoring pages: %w", err))
	}
	return firstErr
}

// verdict says why a finished self-test failed, or nil.
func (s pagerStats) verdict() error {
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

// parseGFNList parses "1a00-1aff,1c00" (hex, 0x optional) into a sorted,
// duplicate-free list; "@FILE" reads the list from FILE (commas, spaces or
// newlines between items).
func parseGFNList(spec string) ([]uint64, error) {
	if strings.HasPrefix(spec, "@") {
		b, err := os.ReadFile(spec[1:])
		if err != nil {
			return nil, fmt.Errorf("read the gfn list: %w", err)
		}
		spec = string(b)
	}
	seen := map[uint64]bool{}
	var out []uint64
	items := strings.FieldsFunc(spec, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\t' || r == '\r' })
	for _, it := range items {
		lo, hi, isRange := strings.Cut(it, "-")
		a, err := parseHex(lo)
		if err != nil {
			return nil, fmt.Errorf("gfn list item %q: %w", it, err)
		}
		b := a
		if isRange {
			if b, err = parseHex(hi); err != nil {
				return nil, fmt.Errorf("gfn list item %q: %w", it, err)
			}
		}
		if b < a {
			return nil, fmt.Errorf("gfn list item %q: range ends before it starts", it)
		}
		if b-a >= 1<<22 {
			return nil, fmt.Errorf("gfn list item %q: more than 16 GiB of pages", it)
		}
		for g := a; g <= b; g++ {
			if !seen[g] {
				seen[g] = true
				out = append(out, g)
			}
		}
	}
	if len(out) == 0 {
		return nil, errors.New("the gfn list is empty")
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out, nil
}

func parseHex(s string) (uint64, error) {
	s = strings.TrimPrefix(strings.TrimPrefix(s, "0x"), "0X")
	v, err := strconv.ParseUint(s, 16, 64)
	if err != nil {
		return 0, fmt.Errorf("not a hex gfn: %w", err)
	}
	return v, nil
}

func runPagerSelftest(fs *pflag.FlagSet, args []string) error {
	if len(args) != 1 {
		return usagef("pager-selftest takes one domain, got %d arguments", len(args))
	}
	spec, _ := fs.GetString("gfns")
	timeout, _ := fs.GetDuration("timeout")
	linger, _ := fs.GetDuration("linger")
	poll, _ := fs.GetDuration("poll")
	debug, _ := fs.GetBool("debug")
	limit, _ := fs.GetInt("limit")
	verify, _ := fs.GetBool("verify")
	if spec == "" {
		return usagef("--gfns is required: the guest frames to evict")
	}
	if timeout <= 0 || poll <= 0 || linger < 0 || limit < 0 {
		return usagef("--timeout and --poll must be positive, --linger and --limit not negative")
	}
	gfns, err := parseGFNList(spec)
	if err != nil {
		return usagef("--gfns: %v", err)
	}
	if limit > 0 && limit < len(gfns) {
		gfns = gfns[:limit]
	}
	fmt.Fprintf(os.Stderr, "pager-selftest: %d gfns from %#x to %#x\n", len(gfns), gfns[0], gfns[len(gfns)-1])
	h, err := xenctrl.Open()
	if err != nil {
		return fmt.Errorf("pager-selftest: %w", err)
	}
	defer h.Close()
	logf := func(string, ...any) {}
	if debug {
		logf = func(format string, a ...any) {
			fmt.Fprintf(os.Stderr, "pager-selftest: "+format+"\n", a...)
		}
		h.SetDebug(func(msg string) { fmt.Fprintln(os.Stderr, "xenctrl:", msg) })
	}
	dom, err := resolveDomain(h, args[0])
	if err != nil {
		return err
	}
	info, err := h.Domain(dom)
	if err != nil {
		return fmt.Errorf("pager-selftest: %w", err)
	}
	if info.Kind() == "pv" {
		return fmt.Errorf("domain %d is PV: vm_event paging needs an HVM or PVH guest with HAP", dom)
	}
	ring, err := h.EnablePaging(dom)
	if err != nil {
		return fmt.Errorf("pager-selftest: enable paging on domain %d: %w", dom, err)
	}
	p := newSelfTestPager(xenPagerHandle{Handle: h, logf: logf}, dom, logf)
	p.verify = verify
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer func() {
		signal.Stop(sigs)
		close(sigs) // ends the goroutine below
	}()
	stop := make(chan struct{})
	go func() {
		if _, ok := <-sigs; ok {
			close(stop)
		}
	}()
	p.stop = stop
	closeRing := func() error {
		if err := ring.Close(); err != nil {
			return fmt.Errorf("disable paging: %w", err)
		}
		return nil
	}
	if err := p.evict(gfns); err != nil {
		rerr := p.restore(ring)
		_ = closeRing()
		return fmt.Errorf("pager-selftest: %w (restore: %v)", err, rerr)
	}
	if after, err := h.Domain(dom); err == nil {
		fmt.Fprintf(os.Stderr, "pager-selftest: evicted %d of %d gfns (%d failures); Xen counts %d paged pages\n",
			p.stats.Evicted, len(gfns), p.stats.EvictFailures, after.PagedPages)
	}
	// The scenario matches guest progress against this mark.
	fmt.Printf("PAGER-EVICTED evicted=%d\n", p.stats.Evicted)
	serveErr := p.serve(ring, time.Now().Add(timeout), linger, poll)
	restoreErr := p.restore(ring)
	fmt.Fprintf(os.Stderr, "pager-selftest: final ring[%v]\n", ring.State())
	closeErr := closeRing()
	paged := int64(-1)
	if after, err := h.Domain(dom); err == nil {
		paged = int64(after.PagedPages)
	}
	fmt.Printf("PAGER-STATS %v paged_pages_after=%d\n", p.stats, paged)
	for _, e := range []error{serveErr, restoreErr, closeErr, p.stats.verdict()} {
		if e != nil {
			return fmt.Errorf("pager-selftest: %w", e)
		}
	}
	return nil
}
