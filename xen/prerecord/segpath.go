package prerecord

import (
	"slices"

	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

// segPath is an incremental path of a bitmap-ordered trajectory being
// tracked: a chain of segments, one per round, each starting just past
// where the previous one ended, in the path's direction.
type segPath struct {
	dir              int // 0 until the second segment fixes it
	firstLo, firstHi uint64
	lo, hi           uint64 // the last segment
	firstRound       uint32
	lastRound        uint32
	lastIdx          int // trajectory index of the head access
	firstS, firstE   int // the first segment's accesses, for its steps
	pages            int
	fit              openPath // one point per round: (Round, head pfn)
	// steps counts the pfn steps between consecutive pages of the path,
	// inside segments and from one segment to the next (index: step in
	// pages, 1…MaxStepPages); nil until the path has two segments.
	steps []int
}

// countSteps adds the steps inside the segment acc[s:e].
func (p *segPath) countSteps(acc []trace.Access, s, e int) {
	for i := s + 1; i < e; i++ {
		p.steps[acc[i].PFN-acc[i-1].PFN]++
	}
}

// stride returns the path's most common step and whether at least three
// quarters of its steps are that one. A real walk is regular: a scan steps
// by 1, a column walk by its row length. Random writes that happen to chain
// up across rounds step by anything up to MaxStepPages.
func (p *segPath) stride() (uint64, bool) {
	var best, total int
	var s uint64
	for k, n := range p.steps {
		total += n
		if n > best {
			best, s = n, uint64(k)
		}
	}
	return s, total > 0 && 4*best >= 3*total
}

// head is the pfn the path had reached in its last segment.
func (p *segPath) head() uint64 {
	if p.dir < 0 {
		return p.lo
	}
	return p.hi
}

// continues reports whether segment x of a later round continues p in
// direction dir, and how far past p's end it starts.
func (p *segPath) continues(x segment, dir int, maxStep uint64) (uint64, bool) {
	if p.dir != 0 && p.dir != dir {
		return 0, false
	}
	if dir > 0 {
		// Starts at or just past the old end (a page written across the
		// round boundary is listed in both rounds) and moves on.
		if x.lo < p.hi || x.lo-p.hi > maxStep || x.hi <= p.hi {
			return 0, false
		}
		return x.lo - p.hi, true
	}
	if x.hi > p.lo || p.lo-x.hi > maxStep || x.lo >= p.lo {
		return 0, false
	}
	return p.lo - x.hi, true
}

// findSegmentPaths finds the incremental paths of a bitmap-ordered
// trajectory. Each round is split into segments (runs rising in steps of at
// most MaxStepPages). A segment continues an open path when it starts at
// most MaxStepPages past the path's last segment, in the path's direction,
// and its last segment is at most MaxGapRounds rounds old; among several
// candidates the one it starts nearest to wins, then the most recent. A
// path takes one segment per round. A segment that continues nothing opens
// a path (closing the least recently extended when MaxOpenPaths are open).
//
// A path is one point per round: t = Round, y = its head (the top of the
// segment moving up, the bottom moving down). It is accepted when it has at
// least MinPathRounds points, MinPathPoints pages and R2 ≥ MinR2, its slope
// agrees with its direction, and it is regular: three quarters of its steps
// from page to page are one stride (see segPath.stride). Its window then
// steps by that stride.
//
// Why rounds and not accesses: a dense random round (a key-value store
// writing all over its heap) lists as one long ascending run, which an
// access-level fit takes for a scan; across rounds such runs overlap
// instead of following each other, and nothing is accepted.
func findSegmentPaths(acc []trace.Access, npages uint64, opt Options) []Path {
	open := make([]segPath, 0, opt.MaxOpenPaths)
	var out []Path
	closePath := func(p *segPath) {
		if p.dir == 0 || p.fit.n < opt.MinPathRounds || p.pages < opt.MinPathPoints {
			return
		}
		a, b, r2 := lineFromMoments(p.fit.mt, p.fit.my, p.fit.stt, p.fit.syy, p.fit.sty)
		if r2 < opt.MinR2 || b == 0 || b != b || (b > 0) != (p.dir > 0) {
			return
		}
		stride, regular := p.stride()
		if !regular {
			return
		}
		first := p.firstLo
		if p.dir < 0 {
			first = p.firstHi
		}
		out = append(out, Path{A: a, B: b, R2: r2, Points: p.pages, FirstPFN: first, LastPFN: p.head(),
			Dir: p.dir, LastIndex: p.lastIdx, LastRound: p.lastRound, Stride: stride,
			Window: windowPages(b/float64(stride), opt)})
	}
	for _, r := range rounds(acc) {
		round := acc[r.s].Round
		// Paths too old to be continued are closed now, freeing their
		// slots for the segments of this round.
		for j := 0; j < len(open); {
			if round > open[j].lastRound && round-open[j].lastRound > uint32(opt.MaxGapRounds) {
				closePath(&open[j])
				open[j] = open[len(open)-1]
				open = open[:len(open)-1]
				continue
			}
			j++
		}
		segs := roundSegments(acc, r.s, r.e, npages, opt.MaxStepPages)
		for _, x := range segs {
			best, bestDir := -1, 0
			var bestGap uint64
			for j := range open {
				p := &open[j]
				if p.lastRound >= round || round-p.lastRound > uint32(opt.MaxGapRounds) {
					continue
				}
				for _, dir := range []int{1, -1} {
					gap, ok := p.continues(x, dir, opt.MaxStepPages)
					if !ok {
						continue
					}
					if best < 0 || gap < bestGap || (gap == bestGap && p.lastRound > open[best].lastRound) {
						best, bestDir, bestGap = j, dir, gap
					}
				}
			}
			if best >= 0 {
				p := &open[best]
				if p.dir == 0 {
					p.dir = bestDir
					first := p.firstHi
					if bestDir < 0 {
						first = p.firstLo
					}
					p.fit.add(float64(p.firstRound), float64(first))
					p.steps = make([]int, opt.MaxStepPages+1)
					p.countSteps(acc, p.firstS, p.firstE)
				}
				if bestGap > 0 {
					p.steps[bestGap]++
				}
				p.countSteps(acc, x.s, x.e)
				p.lo, p.hi, p.lastRound = x.lo, x.hi, round
				p.pages += x.e - x.s
				p.lastIdx = x.e - 1
				if p.dir < 0 {
					p.lastIdx = x.s
				}
				p.fit.add(float64(round), float64(p.head()))
				continue
			}
			if len(open) == opt.MaxOpenPaths {
				old := 0
				for j := range open {
					if open[j].lastRound < open[old].lastRound {
						old = j
					}
				}
				closePath(&open[old])
				open[old] = open[len(open)-1]
				open = open[:len(open)-1]
			}
			open = append(open, segPath{firstLo: x.lo, firstHi: x.hi, lo: x.lo, hi: x.hi,
				firstRound: round, lastRound: round, lastIdx: x.e - 1, firstS: x.s, firstE: x.e, pages: x.e - x.s})
		}
	}
	for j := range open {
		closePath(&open[j])
	}
	slices.SortFunc(out, func(x, y Path) int { return y.LastIndex - x.LastIndex })
	return out
}
