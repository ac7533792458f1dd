// Package prepage decides the order in which a post-copy source pushes the
// pages the destination has not asked for yet: adaptive pre-paging in the
// manner of Hines & Gopalan (VEE'09), plus the pre-record priority lists of
// Shan (2020).
//
// A Policy is a plain state machine with no I/O: the engine feeds it demand
// faults (Fault) and what it sent by other ways (Sent: fault replies, core
// pages; Unsent: pages re-dirtied that must go again), and asks it for the
// next page to push (Next). The policy keeps its own record of what has
// gone, learnt from those calls alone, so a page that crossed the wire,
// pushed or faulted, is never chosen again: every page is sent once.
//
// Policies:
//   - none: push in pfn order (a plain scan of unsent pages).
//   - forward: a bubble after the latest fault's pivot p: p+1, p+2, ...
//   - dual: a bubble both ways around the pivot: p+1, p-1, p+2, p-2, ...
//   - multi: dual bubbles around the K most recent pivots, served round
//     robin, so that a guest with several active regions (or vCPUs) is
//     served in each of them.
//
// With every bubble, a new fault moves the pivot (the stale bubble is
// dropped), and once the bubbles run dry the policy falls back to the scan.
package prepage

import (
	"fmt"
	"sort"
	"strings"
)

// Policy chooses the next page to push. Implementations are not safe for
// concurrent use: the engine serialises calls under one lock.
type Policy interface {
	// Fault records a demand fault at pfn (whether or not the page was
	// already sent): the pivot moves there.
	Fault(pfn uint64)
	// Next returns the next unsent page to push and marks it sent. It
	// returns false once every page has been sent.
	Next() (uint64, bool)
	// Sent records that pfn went by another way (a fault reply, a core
	// page) or never needs to (a page with no memory): Next skips it.
	Sent(pfn uint64)
	// Unsent records that pfn must go again (written after it was sent,
	// before the pause): Next may return it once more.
	Unsent(pfn uint64)
}

// Options configure a policy.
type Options struct {
	// Pivots is K for multi (default 4).
	Pivots int
	// Priority, if not empty, is served before the bubbles and the scan:
	// the pre-record plan. After a fault on a page not sent yet, the policy
	// interleaves its bubble with the priority list for FaultBurst pages,
	// because such a fault means the plan missed a page the guest needs
	// now, and its neighbours are likely next. A fault on a page already
	// pushed (still in flight) changes nothing, the plan had it, unless
	// it is part of a walk: the guest is right behind the push front (see
	// prioritized).
	Priority []uint64
	// FaultBurst is how many pages after each fault alternate between the
	// fault's bubble and the priority list (default 64).
	FaultBurst int
	// BlindBurst is how many pages after a blind fault come from the
	// fault's bubble alone (default 4·FaultBurst). A fault is blind when
	// no page of the priority list lies within FaultBurst/2 pages of it:
	// the guest went where the plan predicted nothing (a new job, a
	// process that did not run while recording), so the plan's next pages
	// say nothing about what it needs now, and the bubble gets the link,
	// as plain dual pre-paging would give it. A blind fault just past the
	// edge of the previous blind bubble doubles the burst (the guest
	// consumed that bubble as fast as it came), and so does each further
	// fault of a walk (see prioritized).
	BlindBurst int
}

// Names lists the bubble policies New accepts.
var Names = []string{"none", "forward", "dual", "multi"}

// New returns the named policy for a domain of pages pages, none of them
// sent yet.
func New(name string, pages uint64, opt Options) (Policy, error) {
	sent := NewBitmap(pages)
	if opt.Pivots <= 0 {
		opt.Pivots = 4
	}
	if opt.FaultBurst <= 0 {
		opt.FaultBurst = 64
	}
	if opt.BlindBurst <= 0 {
		opt.BlindBurst = 4 * opt.FaultBurst
	}
	var p *bubbles
	switch name {
	case "none":
		p = &bubbles{sent: sent, k: 0}
	case "forward":
		p = &bubbles{sent: sent, k: 1, forwardOnly: true}
	case "dual":
		p = &bubbles{sent: sent, k: 1}
	case "multi":
		p = &bubbles{sent: sent, k: opt.Pivots}
	default:
		return nil, fmt.Errorf("unknown pre-paging policy %q (want %s)", name, strings.Join(Names, ", "))
	}
	if len(opt.Priority) == 0 {
		return p, nil
	}
	for _, pfn := range opt.Priority {
		if pfn >= sent.Len() {
			return nil, fmt.Errorf("priority pfn %d beyond the domain's %d pages", pfn, sent.Len())
		}
	}
	planned := SortedUnique(opt.Priority)
	return &prioritized{inner: p, list: opt.Priority, planned: planned, burst: opt.FaultBurst, blindBurst: opt.BlindBurst, lastFault: -1}, nil
}

// bubble is one pivot's two cursors. fwd is the next candidate above the
// pivot, back the next below it (back < 0 once exhausted).
type bubble struct {
	fwd, back int64
	turn      bool // dual: whose turn, false = forward
}

type bubbles struct {
	sent        *Bitmap
	k           int // max live bubbles; 0 = scan only
	forwardOnly bool
	live        []bubble // most recent last
	rr          int      // round-robin position in live
	scan        uint64   // fallback cursor: everything below is sent
}

func (p *bubbles) Fault(pfn uint64) { p.fault(pfn, p.forwardOnly) }

func (p *bubbles) Sent(pfn uint64) {
	if pfn < p.sent.Len() {
		p.sent.Set(pfn)
	}
}

func (p *bubbles) Unsent(pfn uint64) {
	if pfn < p.sent.Len() {
		p.sent.Clear(pfn)
		// The scan's cursor promises everything below it is sent.
		p.scan = min(p.scan, pfn)
	}
}

// fault moves the pivot to pfn; a forward bubble has no backward side.
func (p *bubbles) fault(pfn uint64, forward bool) {
	if p.k == 0 || pfn >= p.sent.Len() {
		return
	}
	b := bubble{fwd: int64(pfn) + 1, back: int64(pfn) - 1}
	if forward {
		b.back = -1
	}
	if len(p.live) == p.k {
		copy(p.live, p.live[1:])
		p.live = p.live[:p.k-1]
	}
	p.live = append(p.live, b)
	// Serve the newest pivot first: it is where the guest is now.
	p.rr = len(p.live) - 1
}

// step returns the next unsent page of bubble b, or false when it is dry.
// Dual bubbles alternate forward and backward; a side that runs out hands
// its turns to the other.
func (p *bubbles) step(b *bubble) (uint64, bool) {
	n := int64(p.sent.Len())
	for b.fwd < n || b.back >= 0 {
		if b.fwd < n && (!b.turn || b.back < 0) {
			b.turn = true
			if pfn, ok := p.sent.NextClear(uint64(b.fwd)); ok {
				b.fwd = int64(pfn) + 1
				return pfn, true
			}
			b.fwd = n
			continue
		}
		b.turn = false
		if pfn, ok := p.sent.PrevClear(uint64(b.back)); ok {
			b.back = int64(pfn) - 1
			return pfn, true
		}
		b.back = -1
	}
	return 0, false
}

func (p *bubbles) Next() (uint64, bool) {
	if pfn, ok := p.nextBubble(); ok {
		return pfn, true
	}
	pfn, ok := p.sent.NextClear(p.scan)
	if !ok {
		p.scan = p.sent.Len()
		return 0, false
	}
	p.scan = pfn + 1
	p.sent.Set(pfn)
	return pfn, true
}

// nextBubble returns the next page of the live bubbles (round robin,
// newest first), dropping dry ones; false when none is left.
func (p *bubbles) nextBubble() (uint64, bool) {
	for len(p.live) > 0 {
		if p.rr >= len(p.live) {
			p.rr = 0
		}
		i := p.rr
		if pfn, ok := p.step(&p.live[i]); ok {
			p.sent.Set(pfn)
			// Round robin: newest first, then older ones in turn.
			p.rr = i - 1
			if p.rr < 0 {
				p.rr = len(p.live) - 1
			}
			return pfn, true
		}
		p.live = append(p.live[:i], p.live[i+1:]...)
		if p.rr > i {
			p.rr--
		}
	}
	return 0, false
}

// prioritized serves a fixed priority list first and lets faults move
// bubbles as dual pre-paging does, sharing the link according to what each
// fault says about the plan:
//
//   - a fault near the plan (an unsent page with listed pages close by)
//     interleaves its bubble with the list for FaultBurst pages: the plan
//     covers the area, the fault only says which part is needed now;
//   - a blind fault (nothing listed close by: a new job, a process that did
//     not run while recording) gives the bubble the link for a blind burst;
//     a blind fault at the edge of the previous blind bubble means the guest
//     consumed that bubble as fast as it came, so the next burst is twice
//     as long (a walk into memory the plan knows nothing about keeps the
//     link until it stops faulting);
//   - a walk (faults in a row, each a little above the previous: see
//     walkFaults and walkFaultsInFlight) gets a forward-only bubble for a
//     blind burst, growing like the blind one while the walk goes on. A
//     walker faulting on pages still in flight is right behind the push
//     front: the forward bubble moves the front ahead of it at the full
//     link rate.
//
// Any other fault on a page already pushed (still in flight) changes
// nothing: the plan had the page.
type prioritized struct {
	inner      *bubbles
	list       []uint64
	planned    []uint64 // list, sorted: is a fault near the plan?
	pos        int
	burst      int
	blindBurst int
	left       int   // pages of the current fault burst still to interleave
	bubble     bool  // whose turn in the burst
	blind      int   // pages of the current blind burst still to serve
	blindLen   int   // length of the latest blind burst
	lastBlind  bool  // the latest fault armed a blind burst
	lastFault  int64 // the previous fault; -1: none
	walk       int   // faults in a row each a little above the previous
}

// walkFaults is how many faults in a row, each a little above the previous,
// make a walk: three faults (two steps up). Random accesses within a
// region of R pages step up by at most s = 4·FaultBurst with probability
// s/R·(1−s/2R) each (a fifth for a 4 MiB job region and the default
// FaultBurst), so two steps in a row happen by chance on 1 fault in 20:
// a single step up would take every fifth fault of a random-access job
// for a walker and turn its bubble forward-only.
const walkFaults = 2

// walkFaultsInFlight is walkFaults for a fault on a page still in flight,
// whose step up must also be at most 2·FaultBurst. Pages in flight are the
// latest pushed, so while the plan pushes a region in ascending order, a
// guest accessing that region at random faults on them a little above one
// another far more often than at random: a walk of in-flight faults needs
// three steps up in a row. A walker right behind the push front makes one
// such step per batch it waits for.
const walkFaultsInFlight = 3

// nearPlan reports whether a listed page lies within burst/2 of pfn.
func (p *prioritized) nearPlan(pfn uint64) bool {
	h := uint64(p.burst / 2)
	lo := pfn - min(pfn, h)
	i := sort.Search(len(p.planned), func(i int) bool { return p.planned[i] >= lo })
	return i < len(p.planned) && p.planned[i]-lo <= 2*h
}

// atBubbleEdge reports whether pfn lies just past a side of the newest
// bubble: the next page that side would have sent, or a few above/below.
func (p *prioritized) atBubbleEdge(pfn uint64) bool {
	k := len(p.inner.live)
	if k == 0 {
		return false
	}
	const slack = 8
	b, q := p.inner.live[k-1], int64(pfn)
	return (b.fwd < int64(p.inner.sent.Len()) && q >= b.fwd && q-b.fwd <= slack) ||
		(b.back >= 0 && q <= b.back && b.back-q <= slack)
}

func (p *prioritized) Sent(pfn uint64)   { p.inner.Sent(pfn) }
func (p *prioritized) Unsent(pfn uint64) { p.inner.Unsent(pfn) }

func (p *prioritized) Fault(pfn uint64) {
	if pfn >= p.inner.sent.Len() {
		return
	}
	inFlight := p.inner.sent.Test(pfn)
	edge := !inFlight && p.lastBlind && p.atBubbleEdge(pfn)
	step, need := uint64(4*p.burst), walkFaults
	if inFlight {
		step, need = uint64(2*p.burst), walkFaultsInFlight
	}
	up := p.lastFault >= 0 && pfn > uint64(p.lastFault) && pfn-uint64(p.lastFault) <= step
	p.lastFault = int64(pfn)
	if up {
		p.walk++
	} else {
		p.walk = 0
	}
	walking := p.walk >= need
	if inFlight && !walking {
		// The plan (or a bubble) had the page and the guest is just
		// close behind the push: a bubble here would only take the link
		// from the plan.
		return
	}
	grow := p.lastBlind && (walking || edge)
	if grow {
		p.blindLen = min(2*p.blindLen, int(p.inner.sent.Len()))
	} else {
		p.blindLen = p.blindBurst
	}
	p.inner.fault(pfn, walking || p.inner.forwardOnly)
	p.lastBlind = true
	if walking {
		// The pages below the fault are behind the walker: the bubble
		// goes forward only and gets the link, so that none of it is
		// spent behind the walker and the front stays ahead of it. The
		// listed pages below the fault stay listed: a guest accessing a
		// listed region at random makes such a walk now and then, and
		// skipping them would leave it the region's pages to fault on.
		p.left, p.blind = 0, p.blindLen
		return
	}
	if !edge && p.nearPlan(pfn) {
		p.lastBlind = false
		p.left, p.bubble, p.blind = p.burst, true, 0
		return
	}
	p.left, p.blind = 0, p.blindLen
}

func (p *prioritized) nextListed() (uint64, bool) {
	for p.pos < len(p.list) {
		pfn := p.list[p.pos]
		p.pos++
		if p.inner.sent.Set(pfn) {
			return pfn, true
		}
	}
	return 0, false
}

func (p *prioritized) Next() (uint64, bool) {
	if p.blind > 0 {
		p.blind--
		if pfn, ok := p.inner.nextBubble(); ok {
			return pfn, true
		}
	}
	if p.left > 0 {
		p.left--
		turn := p.bubble
		p.bubble = !p.bubble
		if turn {
			// Only the bubble: once it is dry the list goes on, not the
			// fallback scan.
			if pfn, ok := p.inner.nextBubble(); ok {
				return pfn, true
			}
		}
	}
	if pfn, ok := p.nextListed(); ok {
		return pfn, true
	}
	return p.inner.Next()
}

// SortedUnique returns pfns sorted with duplicates removed; a helper for
// callers building priority lists and discard sets.
func SortedUnique(pfns []uint64) []uint64 {
	s := append([]uint64(nil), pfns...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	out := s[:0]
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}
