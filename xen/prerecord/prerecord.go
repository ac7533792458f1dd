// Package prerecord turns a recorded memory-access trajectory into the order
// in which a post-copy migration pushes guest pages (Shan, "Research on
// pre-record virtual machine live migration", 2020).
//
// The plan has three stages, each appended to Plan.Order without repeating
// a page:
//
//  1. Recorded: every distinct pfn of the trajectory, in first-touch order.
//     These are the pages the guest touched while it was being recorded and
//     so the pages it is most likely to touch right after it resumes.
//  2. Predicted (linear regression, Options.LR): the trajectory is split
//     into incremental paths (runs that move steadily through memory in one
//     direction). A path that has enough points and fits pfn = A + B·t well
//     is a "sequence set"; its prediction window continues past its last pfn
//     in the direction and at the rate of B, because a scan that was under
//     way when recording stopped keeps going after resume.
//  3. Hotspot (ISS-DBSCAN, Options.DBSCAN): the trajectory's pfns, sorted,
//     are clustered by density. Busy and recent clusters come first; inside
//     one, pages near its most accessed pfns come first. The untouched pages
//     inside and at the edges of a hotspot are what clustering predicts. This
//     stage is what helps when many small processes each touch a little
//     memory, where regression finds no long paths.
//
// Time is measured in log-dirty rounds (see Path): a rate B is pages per
// round, and WindowRounds says how many rounds ahead a window reaches.
//
// A path is followed access by access, so the order inside a round
// matters. A recorder that reads a dirty bitmap lists each round's pages in
// ascending pfn order whatever order they were touched in; such rounds are
// recognised (strictly ascending) and a run in them is read backwards when
// the neighbouring rounds show memory being walked downwards, so a backward
// scan of many pages per round is still predicted downward.
//
// Pages not in Plan.Order are left to the migration's ordinary background
// push (pre-paging or a linear scan); the plan only says what goes first.
//
// The package does no I/O: it is a pure function of the trajectory and the
// options, so it can be tested from tables and fuzzed.
package prerecord

import (
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

	// MinPathPoints is the fewest accesses an incremental path needs before
	// it is fitted. Default 16: a chain of 16 strictly monotone accesses each
	// within MaxStepPages of the last is vanishingly unlikely from random
	// accesses, while a real scan covers 16 pages (64 KiB) in a moment.
	MinPathPoints int
	// MaxStepPages is the largest pfn gap between consecutive accesses of one
	// path. Default 16 (64 KiB): it admits strided loops and scans whose
	// read-only pages log-dirty did not see, and keeps the chance that an
	// unrelated access joins a path at 16/npages per open path.
	MaxStepPages uint64
	// MinR2 is the coefficient of determination a path's fit needs to be a
	// sequence set. Default 0.9: a steady scan fits to >0.99 even when round
	// lengths jitter; a path whose rate changed several times does not.
	MinR2 float64
	// WindowRounds is how many rounds of the path's own progress the window
	// covers: the window is |B|·WindowRounds pages. Default 4: at the usual
	// 50 ms log-dirty interval that is 200 ms of the path's progress, about
	// what a 25 MB recorded set takes to cross a 1 Gbit/s link, i.e. roughly
	// how far the scan gets while the recorded pages are still being sent.
	WindowRounds float64
	// MinWindowPages is the least a window covers, for paths so slow that
	// |B|·WindowRounds rounds to nothing. Default 32 (128 KiB, ~1 ms at
	// 1 Gbit/s): the next pages of a steady path are near-certain to be
	// touched, and sending them costs almost nothing.
	MinWindowPages uint64
	// MaxWindowPages caps one path's window. Default 4096 (16 MiB): a fast
	// scan must not crowd out the other paths' windows and the hotspots.
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
	// HalfLifeRounds is the recency half-life in hotspot scores: a record
	// this many rounds older than the trajectory's last round counts half.
	// Default 16 (0.8 s at 50 ms rounds): recency breaks ties between similar
	// hotspots but a much busier old hotspot still ranks first.
	HalfLifeRounds float64
}

// DefaultOptions returns the options with both predictors on and every
// threshold at its documented default.
func DefaultOptions() Options {
	return Options{
		LR:                 true,
		DBSCAN:             true,
		MinPathPoints:      16,
		MaxStepPages:       16,
		MinR2:              0.9,
		WindowRounds:       4,
		MinWindowPages:     32,
		MaxWindowPages:     4096,
		MaxOpenPaths:       32,
		EpsPages:           8,
		MinPts:             8,
		DensityFactor:      2,
		NeighbourhoodPages: 32,
		HalfLifeRounds:     16,
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
	// Order is the full priority order: recorded pages (first-touch order),
	// then the regression windows, then hotspot neighbourhood pages. It has
	// no duplicates and every pfn is below npages.
	Order []uint64
	// Recorded, Predicted and Hotspot count the pages of Order that came
	// from each stage; they sum to len(Order).
	Recorded, Predicted, Hotspot int
	// Paths are the accepted sequence sets, most recently extended first
	// (the order their windows were emitted in).
	Paths []Path
	// Hotspots are the clusters, highest Score first (the order their pages
	// were emitted in).
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
	set := newPageSet(npages)
	p.Order = make([]uint64, 0, min(uint64(len(acc)), npages))
	for _, a := range acc {
		if a.PFN >= npages {
			p.Dropped++
			continue
		}
		if set.add(a.PFN) {
			p.Order = append(p.Order, a.PFN)
		}
	}
	p.Recorded = len(p.Order)
	if opt.LR {
		p.Paths = findPaths(acc, npages, opt)
		for i := range p.Paths {
			p.Order = p.Paths[i].appendWindow(p.Order, set, npages)
		}
		p.Predicted = len(p.Order) - p.Recorded
	}
	if opt.DBSCAN {
		n := len(p.Order)
		p.Hotspots, p.MinPts, p.Order = hotspots(acc, npages, opt, set, p.Order)
		p.Hotspot = len(p.Order) - n
	}
	return p
}
