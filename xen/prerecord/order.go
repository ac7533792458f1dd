package prerecord

import (
	"cmp"
	"math"
	"slices"

	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

// Stages a candidate page comes from.
const (
	stageRecorded uint8 = iota
	stagePredicted
	stageHotspot
)

// cand is a page proposed for the send order by one stage, with its score
// (about: how many touches per round to expect from it right after resume)
// and a sequence number that orders equal scores.
type cand struct {
	pfn   uint64
	score float64
	seq   int
	stage uint8
}

// pageStat is one distinct recorded page.
type pageStat struct {
	pfn        uint64
	count      int     // accesses recorded
	firstRound uint32  // earliest round it was recorded in
	lastRound  uint32  // latest round it was recorded in
	score      float64 // Σ 2^(−age/HalfLifeRounds) over its accesses
}

// pageStats returns the distinct pages of acc in first-touch order with
// their counts and scores, an index from pfn to position, and the last
// round of the trajectory. A record age rounds older than the last round
// adds 2^(−age/halfLife) to its page's score: a page written in every
// recent round scores highest, one written long ago and never since
// (a finished job, a slice of a scan now elsewhere) lowest.
func pageStats(acc []trace.Access, halfLife float64) ([]pageStat, map[uint64]int, uint32) {
	var last uint32
	for _, a := range acc {
		last = max(last, a.Round)
	}
	index := make(map[uint64]int)
	var pages []pageStat
	for _, a := range acc {
		i, ok := index[a.PFN]
		if !ok {
			i = len(pages)
			index[a.PFN] = i
			pages = append(pages, pageStat{pfn: a.PFN, firstRound: a.Round})
		}
		pg := &pages[i]
		pg.count++
		pg.lastRound = max(pg.lastRound, a.Round)
		pg.firstRound = min(pg.firstRound, a.Round)
		pg.score += decay(last-min(last, a.Round), halfLife)
	}
	return pages, index, last
}

// live reports whether the guest was still walking the path when the
// trajectory ended: its last segment is at most MaxGapRounds rounds old.
func (p *Path) live(last uint32, opt Options) bool {
	return last-min(last, p.LastRound) <= uint32(opt.MaxGapRounds)
}

// windowCandidates appends the window's pages, LastPFN+Dir·Stride·k for k
// = 1…Window, nearest first, stopping at 0 and npages. A live path reaches
// the page d pfns ahead in t = d/|B| rounds from its last segment (less the
// rounds already gone since), so the page scores 2^(−t/HalfLifeRounds):
// like a page to be touched once t rounds from now. A path that stopped
// before the trajectory ended predicts nothing certain: only its first
// MinWindowPages pages are proposed, at score 0, after everything else.
// At most budget pages are proposed.
func (p *Path) windowCandidates(cands []cand, seq *int, npages uint64, last uint32, budget uint64, opt Options) []cand {
	live := p.live(last, opt)
	lag := float64(last - min(last, p.LastRound))
	rate := math.Abs(p.B)
	stride := max(p.Stride, 1)
	win := min(p.Window, budget)
	if !live {
		win = min(win, opt.MinWindowPages)
	}
	for k := uint64(1); k <= win; k++ {
		if k > math.MaxUint64/stride {
			break
		}
		d := k * stride
		var q uint64
		if p.Dir > 0 {
			if p.LastPFN >= npages-1 || d > npages-1-p.LastPFN {
				break
			}
			q = p.LastPFN + d
		} else {
			if d > p.LastPFN {
				break
			}
			q = p.LastPFN - d
		}
		score := 0.0
		if live {
			t := max(0, float64(d)/rate-lag)
			score = math.Exp2(-t / opt.HalfLifeRounds)
		}
		cands = append(cands, cand{pfn: q, score: score, seq: *seq, stage: stagePredicted})
		*seq++
	}
	return cands
}

// pfnRange is the pfn range [lo, hi].
type pfnRange struct{ lo, hi uint64 }

// mergeSpans sorts spans and merges overlapping ones.
func mergeSpans(s []pfnRange) []pfnRange {
	slices.SortFunc(s, func(x, y pfnRange) int { return cmp.Compare(x.lo, y.lo) })
	out := s[:0]
	for _, x := range s {
		if k := len(out) - 1; k >= 0 && x.lo <= out[k].hi {
			out[k].hi = max(out[k].hi, x.hi)
			continue
		}
		out = append(out, x)
	}
	return out
}

// inSpans reports whether q is in one of the sorted, disjoint spans.
func inSpans(s []pfnRange, q uint64) bool {
	k, _ := slices.BinarySearchFunc(s, q, func(x pfnRange, q uint64) int {
		switch {
		case x.hi < q:
			return -1
		case x.lo > q:
			return 1
		}
		return 0
	})
	return k < len(s) && s[k].lo <= q && q <= s[k].hi
}

// Advance brings the plan up to date with written, the pages written since
// the trajectory ended (one more dirty-log round, read just before the
// switchover, after the plan was built). Each live path's head moves along
// the pages it wrote meanwhile, gaps of up to MaxStepPages allowed, and the
// pages between its old and new head go to the end of Order: the walker is
// past them, and at the path's pace planning time alone is hundreds of
// pages. Nothing else changes; written may be in any order. It returns how
// many pages it moved.
func (p *Plan) Advance(written []uint64, opt Options) int {
	opt = opt.withDefaults()
	if len(written) == 0 || len(p.Paths) == 0 {
		return 0
	}
	w := slices.Clone(written)
	slices.Sort(w)
	has := func(q uint64) bool {
		_, ok := slices.BinarySearch(w, q)
		return ok
	}
	var passed []pfnRange
	for i := range p.Paths {
		path := &p.Paths[i]
		if !path.Live {
			continue
		}
		head := path.LastPFN
		for {
			next, found := head, false
			for k := uint64(1); k <= opt.MaxStepPages; k++ {
				if path.Dir > 0 {
					if head > math.MaxUint64-k {
						break
					}
					next = head + k
				} else {
					if k > head {
						break
					}
					next = head - k
				}
				if has(next) {
					found = true
					break
				}
			}
			if !found {
				break
			}
			head = next
		}
		if head == path.LastPFN {
			continue
		}
		if path.Dir > 0 {
			passed = append(passed, pfnRange{path.LastPFN + 1, head})
		} else {
			passed = append(passed, pfnRange{head, path.LastPFN - 1})
		}
		path.LastPFN = head
	}
	if len(passed) == 0 {
		return 0
	}
	passed = mergeSpans(passed)
	keep := p.Order[:0:0]
	var moved []uint64
	for _, q := range p.Order {
		if inSpans(passed, q) {
			moved = append(moved, q)
		} else {
			keep = append(keep, q)
		}
	}
	p.Order = append(keep, moved...)
	return len(moved)
}

// behindScore rescores a recorded page that a live path has walked past.
// Passed once (or twice in consecutive rounds, a page written across a
// round boundary), it is behind the walker and scores 0. Passed twice or
// more, τ rounds apart on average with τ ≥ 2, the walker is periodic (a
// scan wrapping around its buffer): it comes back at lastRound + τ, t
// rounds from the end, and scores 2^(−|t|/halfLife) like a window page; a
// page that should have come back long ago is stale. A page written in
// nearly every round (three times or more, τ < 2) is hot whatever walks
// past it, and keeps its score.
func (pg *pageStat) behindScore(last uint32, halfLife float64) float64 {
	if pg.count < 2 {
		return 0
	}
	tau := float64(pg.lastRound-pg.firstRound) / float64(pg.count-1)
	switch {
	case tau >= 2:
		t := float64(pg.lastRound) + tau - float64(last)
		return math.Exp2(-math.Abs(t) / halfLife)
	case pg.count >= 3:
		return pg.score
	}
	return 0
}

// clipPeriodic ends the window of a walker that is sweeping a buffer again
// at the end of that buffer. When the pages just ahead of the head were
// recorded too (at least MinPathPoints of them, in a run with gaps of at
// most MaxStepPages), the walker is going over memory it wrote on an
// earlier sweep, and past the end of that run it wraps to the buffer's
// start rather than going on: the window stops there, and the pages after
// the wrap score for the sweep's return (behindScore). A stream through
// fresh memory has nothing recorded ahead and keeps its whole window.
func (p *Path) clipPeriodic(index map[uint64]int, npages uint64, opt Options) {
	end, run := p.LastPFN, 0
	for {
		next, found := end, false
		for k := uint64(1); k <= opt.MaxStepPages; k++ {
			if p.Dir > 0 {
				if end+k >= npages {
					break
				}
				next = end + k
			} else {
				if k > end {
					break
				}
				next = end - k
			}
			if _, ok := index[next]; ok {
				found = true
				break
			}
		}
		if !found {
			break
		}
		end = next
		run++
	}
	if run < opt.MinPathPoints {
		return
	}
	d := end - p.LastPFN
	if p.Dir < 0 {
		d = p.LastPFN - end
	}
	p.Window = min(p.Window, d/max(p.Stride, 1))
}
