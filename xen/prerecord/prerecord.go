// Package prerecord turns a recorded memory-access trajectory into the order
// in which a post-copy migration pushes guest pages (Shan, "Research on
// pre-record virtual machine live migration", 2020).
//
// Three stages propose pages, each with a score that estimates how soon
// after resume the guest will touch the page (higher: sooner); Plan.Order
// is every proposed page once, highest score first:
//
//  1. Recorded: every distinct pfn of the trajectory. Its score sums
//     2^(−age/HalfLifeRounds) over its records, age in rounds before the
//     end of the trajectory: a page written in every recent round (hot)
//     comes first, one last written long ago (a finished job) late. Equal
//     scores keep first-touch order. Time is measured in log-dirty rounds.
//  2. Predicted (linear regression, Options.LR): incremental paths (runs
//     moving steadily through memory in one direction) that fit pfn = A +
//     B·t well are sequence sets; a live one (still moving when recording
//     stopped) reaches the page d pages past its head in d/|B| rounds, and
//     that page scores like a page to be touched once then. The pages a
//     live path walked past are behind the walker: passed once, they score
//     0; passed periodically (a scan wrapping around its buffer), they
//     score for when the walker comes back (pageStat.behindScore). So a
//     stream's next pages go before the recorded pages it has left behind,
//     and a hot page still goes before a window page many rounds ahead.
//  3. Hotspot (ISS-DBSCAN, Options.DBSCAN): the trajectory's pfns, sorted,
//     are clustered by density; the unrecorded pages around a hotspot's
//     busy pfns (the pages a process uses but did not write: code, data it
//     only reads) score half of the busy pfn they are near. This stage is
//     what helps when many small processes each touch a little memory,
//     where regression finds no paths.
//
// Trajectories from a dirty bitmap (Xen log-dirty, PAGEMAP_SCAN) list each
// round's pages in ascending pfn order, not in touch order. Such rounds are
// recognised (ascending, at most about one restart per round: see
// bitmapOrdered), each is sorted, and paths are then found
// across rounds, one point per round (findSegmentPaths); a trajectory in
// time order is followed access by access (findAccessPaths).
//
// Pages not in Plan.Order are left to the migration's ordinary background
// push (pre-paging or a linear scan); the plan only says what goes first.
//
// The package does no I/O: it is a pure function of the trajectory and the
// options, so it can be tested from tables and fuzzed.
package prerecord

import (
	"cmp"
	"slices"

	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

// Options tune the planner. DefaultOptions gives the values the package was
// designed with; a zero numeric field means "use the default", so callers can
// override one knob with a literal. To switch a float threshold off, give it
// a negative value (for example MinR2: -1 accepts every fit).
type Options struct {
	// LR enables linear-regression prediction windows.
	LR bool
	// DBSCAN enables ISS-DBSCAN hotspot pages.
	DBSCAN bool

	// MinPathPoints is the fewest accesses (pages) an incremental path
	// needs before it is fitted. Default 16: a chain of 16 strictly
	// monotone accesses each within MaxStepPages of the last is vanishingly
	// unlikely from random accesses, while a real scan covers 16 pages
	// (64 KiB) in a moment.
	MinPathPoints int
	// MaxStepPages is the largest pfn gap between consecutive accesses of one
	// path. Default 16 (64 KiB): it admits strided loops and scans whose
	// read-only pages log-dirty did not see, and keeps the chance that an
	// unrelated access joins a path at 16/npages per open path.
	MaxStepPages uint64
	// MinPathRounds is the fewest rounds a path of a bitmap-ordered
	// trajectory must span (points of its fit). Default 5: by chance, a
	// segment of a round is continued in the next round with probability
	// about segments·MaxStepPages/npages, so a false path needs that four
	// times in a row (and must also step regularly, see findSegmentPaths);
	// 5 rounds are 100 ms at the lab's 20 ms interval, 250 ms at Xen's
	// usual 50 ms.
	MinPathRounds int
	// MaxGapRounds is how many rounds a path may go unseen and still be
	// continued, and how old its last segment may be at the end of the
	// trajectory for it to be live. Default 3: a slow scan writes a page
	// only every few rounds.
	MaxGapRounds int
	// MinR2 is the coefficient of determination a path's fit needs to be a
	// sequence set. Default 0.9: a steady scan fits to >0.99 even when round
	// lengths jitter; a path whose rate changed several times does not.
	MinR2 float64
	// WindowRounds is how many rounds of the path's own progress the window
	// covers: the window is |B|·WindowRounds pages. Default 64: window pages
	// are merged with the recorded ones by score, and a page t rounds ahead
	// scores 2^(−t/HalfLifeRounds), so a long window never pushes a page the
	// guest wrote recently back; its far end only displaces pages the
	// trajectory says nothing about. A short one runs out while the guest
	// still streams, and from then on it faults. 64 rounds are 1.3 s at the
	// lab's 20 ms (a whole 1 Gbit post-copy of a 256 MiB guest), 3.2 s at
	// 50 ms.
	WindowRounds float64
	// MinWindowPages is the least a window covers, for paths so slow that
	// |B|·WindowRounds rounds to nothing. Default 32 (128 KiB, ~1 ms at
	// 1 Gbit/s): the next pages of a steady path are near-certain to be
	// touched, and sending them costs almost nothing.
	MinWindowPages uint64
	// MaxWindowPages caps one path's window, and all windows together
	// (the most recent paths first). Default 65536 (256 MiB, about 2 s of
	// a 1 Gbit link): only paths faster than 1024 pages per round (200 MB/s
	// at 20 ms) reach it alone; it bounds the plan's size.
	MaxWindowPages uint64
	// MaxOpenPaths is how many incremental paths are tracked at once; when a
	// new one opens, the least recently extended is closed. Default 32:
	// enough for a handful of interleaved streams plus noise.
	MaxOpenPaths int

	// EpsPages is the DBSCAN radius: two records are neighbours when their
	// pfns differ by at most EpsPages. Default 8 (32 KiB): allocators and
	// programs work in runs, and a hole of a few untouched pages inside a
	// busy region is still the same region. A hotspot can span about
	// records × EpsPages pages and all of its span is emitted, so keep it
	// small.
	EpsPages uint64
	// MinPts is the fewest records (the point itself included) within
	// ±EpsPages for a core point. Default 8: about one record per two pages
	// across the 17-page neighbourhood.
	MinPts int
	// DensityFactor raises MinPts on dense trajectories: the effective
	// minimum is max(MinPts, ceil(DensityFactor · n·(2·EpsPages+1)/npages))
	// for n records, so a hotspot must be DensityFactor times denser than
	// the trajectory spread evenly over the guest. Default 2. Negative
	// disables the rule.
	DensityFactor float64
	// NeighbourhoodPages is the width of one neighbourhood around a
	// hotspot's busy pfn. Default 32 (128 KiB), two DBSCAN radii.
	NeighbourhoodPages uint64
	// HalfLifeRounds is the recency half-life of every score: a record
	// this many rounds older than the trajectory's last round counts half,
	// and a window page this many rounds ahead of its path scores half.
	// Default 4 (80 ms at 20 ms rounds, 200 ms at 50 ms): a job that has
	// written its pages for 4 rounds outranks an equally busy job that
	// stopped just before it started, while a page written in every round
	// (score ≈ 6.3) still outranks one written once in the last round (1).
	HalfLifeRounds float64
}

// DefaultOptions returns the options with both predictors on and every
// threshold at its documented default.
func DefaultOptions() Options {
	return Options{
		LR:                 true,
		DBSCAN:             true,
		MinPathPoints:      16,
		MinPathRounds:      5,
		MaxGapRounds:       3,
		MaxStepPages:       16,
		MinR2:              0.9,
		WindowRounds:       64,
		MinWindowPages:     32,
		MaxWindowPages:     65536,
		MaxOpenPaths:       32,
		EpsPages:           8,
		MinPts:             8,
		DensityFactor:      2,
		NeighbourhoodPages: 32,
		HalfLifeRounds:     4,
	}
}

// withDefaults replaces zero fields by their defaults.
func (o Options) withDefaults() Options {
	d := DefaultOptions()
	if o.MinPathPoints == 0 {
		o.MinPathPoints = d.MinPathPoints
	}
	if o.MaxStepPages == 0 {
		o.MaxStepPages = d.MaxStepPages
	}
	if o.MinPathRounds <= 0 {
		o.MinPathRounds = d.MinPathRounds
	}
	if o.MaxGapRounds <= 0 {
		o.MaxGapRounds = d.MaxGapRounds
	}
	if o.MinR2 == 0 {
		o.MinR2 = d.MinR2
	}
	if o.WindowRounds == 0 {
		o.WindowRounds = d.WindowRounds
	}
	if o.MinWindowPages == 0 {
		o.MinWindowPages = d.MinWindowPages
	}
	if o.MaxWindowPages == 0 {
		o.MaxWindowPages = d.MaxWindowPages
	}
	if o.MaxOpenPaths <= 0 {
		o.MaxOpenPaths = d.MaxOpenPaths
	}
	if o.EpsPages == 0 {
		o.EpsPages = d.EpsPages
	}
	if o.MinPts == 0 {
		o.MinPts = d.MinPts
	}
	if o.DensityFactor == 0 {
		o.DensityFactor = d.DensityFactor
	}
	if o.NeighbourhoodPages == 0 {
		o.NeighbourhoodPages = d.NeighbourhoodPages
	}
	if o.HalfLifeRounds == 0 {
		o.HalfLifeRounds = d.HalfLifeRounds
	}
	return o
}

// Plan is the page send order derived from one trajectory.
type Plan struct {
	// Order is the full priority order (see the package comment): every
	// recorded page, the regression windows and the hotspot neighbourhood
	// pages, merged by score. It has no duplicates and every pfn is below
	// npages.
	Order []uint64
	// Recorded counts the distinct recorded pages, Predicted the window
	// pages that were not recorded, Hotspot the hotspot pages that are
	// neither; they sum to len(Order).
	Recorded, Predicted, Hotspot int
	// Demoted counts recorded pages that a live path had already walked
	// past and that score lower for it (see the package comment).
	Demoted int
	// Paths are the accepted sequence sets, most recently extended first.
	Paths []Path
	// Hotspots are the clusters, highest Score first.
	Hotspots []Hotspot
	// MinPts is the effective DBSCAN core threshold after DensityFactor.
	MinPts int
	// Dropped counts accesses ignored because their pfn was not below
	// npages; a recorder should never produce them.
	Dropped int
}

// Build plans the send order for a trajectory acc, ordered by time as
// trace.Read returns it, of a guest with npages pages. Accesses at or above
// npages are ignored and counted in Plan.Dropped.
func Build(acc []trace.Access, npages uint64, opt Options) Plan {
	opt = opt.withDefaults()
	var p Plan
	if npages == 0 {
		p.Dropped = len(acc)
		return p
	}
	valid := acc
	for _, a := range acc {
		if a.PFN >= npages {
			p.Dropped++
		}
	}
	if p.Dropped > 0 {
		valid = make([]trace.Access, 0, len(acc)-p.Dropped)
		for _, a := range acc {
			if a.PFN < npages {
				valid = append(valid, a)
			}
		}
	}
	pages, index, last := pageStats(valid, opt.HalfLifeRounds)
	recorded := newPageSet(npages)
	for _, pg := range pages {
		recorded.add(pg.pfn)
	}
	cands := make([]cand, 0, len(pages))
	for i, pg := range pages {
		cands = append(cands, cand{pfn: pg.pfn, score: pg.score, seq: i, stage: stageRecorded})
	}
	seq := len(cands)
	if opt.LR {
		p.Paths = findPaths(valid, npages, opt)
		var swept []pfnRange
		for i := range p.Paths {
			path := &p.Paths[i]
			path.Live = path.live(last, opt)
			if path.Live {
				swept = append(swept, pfnRange{min(path.FirstPFN, path.LastPFN), max(path.FirstPFN, path.LastPFN)})
			}
		}
		swept = mergeSpans(swept)
		// The pages a live path walked past are behind the walker.
		for i := range cands {
			if c := &cands[i]; inSpans(swept, c.pfn) {
				if b := pages[i].behindScore(last, opt.HalfLifeRounds); b < c.score {
					c.score = b
					p.Demoted++
				}
			}
		}
		for k := range p.Paths {
			if path := &p.Paths[k]; path.Live {
				path.clipPeriodic(index, npages, opt)
			}
		}
		// The windows share MaxWindowPages, most recent path first.
		budget := opt.MaxWindowPages
		for k := range p.Paths {
			n := len(cands)
			cands = p.Paths[k].windowCandidates(cands, &seq, npages, last, budget, opt)
			budget -= uint64(len(cands) - n)
		}
	}
	if opt.DBSCAN {
		score := func(pfn uint64) float64 { return pages[index[pfn]].score }
		var hc []cand
		p.Hotspots, p.MinPts, hc = hotspots(valid, npages, opt, recorded, score, seq)
		cands = append(cands, hc...)
	}
	// Highest score first; equal scores keep their stage and creation
	// order (recorded in first-touch order, windows most recent path
	// first and nearest page first, hotspots by rank).
	slices.SortStableFunc(cands, func(x, y cand) int { return cmp.Compare(y.score, x.score) })
	set := newPageSet(npages)
	p.Order = make([]uint64, 0, len(cands))
	for _, c := range cands {
		if !set.add(c.pfn) {
			continue
		}
		p.Order = append(p.Order, c.pfn)
		switch {
		case recorded.has(c.pfn):
			p.Recorded++
		case c.stage == stagePredicted:
			p.Predicted++
		default:
			p.Hotspot++
		}
	}
	return p
}
