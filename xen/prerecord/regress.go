package prerecord

import (
	"math"
	"slices"

	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

// Path is an accepted sequence set: an incremental path whose accesses fit
// pfn = A + B·t with t in rounds, so B is pages per log-dirty round. In a
// time-ordered trajectory every access is a point (t from roundTimes); in a
// bitmap-ordered one every round is a point, t = Round and pfn = the head
// of the path's segment in that round (see findSegmentPaths).
type Path struct {
	A, B   float64 // pfn = A + B·t, t in rounds
	R2     float64 // coefficient of determination of the fit, in [0,1]
	Points int     // accesses on the path
	// FirstPFN and LastPFN are the path's first and last pfn in time order.
	FirstPFN, LastPFN uint64
	// Dir is +1 for a path moving up through memory, -1 for down.
	Dir int
	// LastIndex is the index in the trajectory of the path's last access;
	// windows are ordered by it, most recent first.
	LastIndex int
	// LastRound is the round of the path's last access. A path whose last
	// round is the trajectory's last (or close to it, see MaxGapRounds) is
	// live: the guest was still walking it when recording stopped.
	LastRound uint32
	// Live is set by Build on live paths.
	Live bool
	// Stride is the step between the path's pages, and between its window
	// pages: 1 for a scan, the row length for a column walk. Paths of a
	// time-ordered trajectory use 1.
	Stride uint64
	// Window is how many pages the prediction window has: LastPFN ±
	// Stride·k for k = 1…Window (clipped at 0 and npages).
	Window uint64
}

// FitLine fits y = a + b·t by least squares over the first min(len(ts),
// len(ys)) pairs and returns the coefficient of determination r2 in [0,1].
// With fewer than two points or no spread in t there is no slope: it returns
// a = mean(y), b = 0, r2 = 0. A flat line (all y equal, t spread) fits
// exactly: b = 0, r2 = 1.
func FitLine(ts, ys []float64) (a, b, r2 float64) {
	n := min(len(ts), len(ys))
	if n == 0 {
		return 0, 0, 0
	}
	var mt, my float64
	for i := range n {
		mt += ts[i]
		my += ys[i]
	}
	mt /= float64(n)
	my /= float64(n)
	var stt, syy, sty float64
	for i := range n {
		dt, dy := ts[i]-mt, ys[i]-my
		stt += dt * dt
		syy += dy * dy
		sty += dt * dy
	}
	return lineFromMoments(mt, my, stt, syy, sty)
}

// lineFromMoments turns means and centred second moments into a fit, with
// FitLine's conventions for the degenerate cases.
func lineFromMoments(mt, my, stt, syy, sty float64) (a, b, r2 float64) {
	if !(stt > 0) {
		return my, 0, 0
	}
	b = sty / stt
	a = my - b*mt
	if !(syy > 0) {
		return a, b, 1
	}
	r2 = sty * sty / (stt * syy)
	return a, b, math.Max(0, math.Min(1, r2))
}

// openPath is an incremental path being tracked, with running (Welford)
// moments so that a path of any length costs O(1) memory and its fit is
// numerically stable with pfns in the billions.
type openPath struct {
	first, last uint64
	dir         int // 0 until the second point fixes it
	n           int
	lastIdx     int
	mt, my      float64
	stt, syy    float64
	sty         float64
}

func (p *openPath) add(t, y float64) {
	p.n++
	dt := t - p.mt
	p.mt += dt / float64(p.n)
	dy := y - p.my
	p.my += dy / float64(p.n)
	dy2 := y - p.my
	p.stt += dt * (t - p.mt)
	p.syy += dy * dy2
	p.sty += dt * dy2
}

// avgStep is the mean pfn distance between consecutive points.
func (p *openPath) avgStep() float64 {
	if p.n < 2 {
		return 0
	}
	d := p.last - p.first
	if p.first > p.last {
		d = p.first - p.last
	}
	return float64(d) / float64(p.n-1)
}

// roundTimes gives every access a time in rounds: Round plus its position
// inside its round, spread evenly over [Round, Round+1). A log-dirty round
// reports many pages at one instant, so the round number alone would stack
// them on one t; the position keeps the trajectory order and makes a scan of
// k pages per round the exact line pfn = k·t. Rounds are runs of equal
// Round in trajectory order; a trace recorded as one round is one unit of t.
func roundTimes(acc []trace.Access) []float64 {
	ts := make([]float64, len(acc))
	for i := 0; i < len(acc); {
		j := i + 1
		for j < len(acc) && acc[j].Round == acc[i].Round {
			j++
		}
		k := float64(j - i)
		base := float64(acc[i].Round)
		for x := i; x < j; x++ {
			ts[x] = base + float64(x-i)/k
		}
		i = j
	}
	return ts
}

// findPaths returns the trajectory's accepted paths, most recently
// extended first: across rounds for a bitmap-ordered trajectory
// (findSegmentPaths), access by access otherwise (findAccessPaths).
func findPaths(acc []trace.Access, npages uint64, opt Options) []Path {
	if bitmapOrdered(acc) {
		return findSegmentPaths(sortRounds(acc), npages, opt)
	}
	return findAccessPaths(acc, npages, opt)
}

// findAccessPaths splits a time-ordered trajectory into incremental paths
// and returns the accepted ones, most recently extended first.
//
// Up to MaxOpenPaths paths are open at once so that interleaved streams are
// told apart. Each access (pfn p) goes to the open path it continues best:
// candidates are the paths whose last pfn q satisfies 0 < |p-q| ≤
// MaxStepPages in the path's direction (a one-point path takes either
// direction, which the second point then fixes); among them the one whose
// predicted next pfn (q plus the path's mean step) is nearest to p wins,
// ties going to the most recently extended. A re-touch of some path's last
// pfn adds nothing. Otherwise p opens a new path, closing the least recently
// extended one when MaxOpenPaths are open. A closed path is accepted when it
// has at least MinPathPoints points and R2 ≥ MinR2.
func findAccessPaths(acc []trace.Access, npages uint64, opt Options) []Path {
	ts := roundTimes(acc)
	pfns := make([]uint64, len(acc))
	for i, a := range acc {
		pfns[i] = a.PFN
	}
	open := make([]openPath, 0, opt.MaxOpenPaths)
	var out []Path
	closePath := func(p *openPath) {
		if path, ok := p.accept(opt); ok {
			path.LastRound = acc[path.LastIndex].Round
			out = append(out, path)
		}
	}
	for i, pfn := range pfns {
		if pfn >= npages {
			continue
		}
		best, bestD := -1, math.Inf(1)
		retouch := false
		for j := range open {
			p := &open[j]
			var step uint64
			dir := 1
			switch {
			case pfn == p.last:
				retouch = true
			case pfn > p.last:
				step = pfn - p.last
			default:
				step, dir = p.last-pfn, -1
			}
			if retouch {
				break
			}
			if step > opt.MaxStepPages || (p.dir != 0 && p.dir != dir) {
				continue
			}
			d := math.Abs(float64(step) - p.avgStep())
			if d < bestD || (d == bestD && p.lastIdx > open[best].lastIdx) {
				best, bestD = j, d
			}
		}
		if retouch {
			continue
		}
		if best >= 0 {
			p := &open[best]
			if p.dir == 0 {
				p.dir = 1
				if pfn < p.last {
					p.dir = -1
				}
			}
			p.last, p.lastIdx = pfn, i
			p.add(ts[i], float64(pfn))
			continue
		}
		if len(open) == opt.MaxOpenPaths {
			old := 0
			for j := range open {
				if open[j].lastIdx < open[old].lastIdx {
					old = j
				}
			}
			closePath(&open[old])
			open[old] = open[len(open)-1]
			open = open[:len(open)-1]
		}
		np := openPath{first: pfn, last: pfn, lastIdx: i}
		np.add(ts[i], float64(pfn))
		open = append(open, np)
	}
	for j := range open {
		closePath(&open[j])
	}
	slices.SortFunc(out, func(x, y Path) int { return y.LastIndex - x.LastIndex })
	return out
}

// accept fits p and reports whether it is a sequence set, with its window.
func (p *openPath) accept(opt Options) (Path, bool) {
	if p.n < opt.MinPathPoints || p.n < 2 {
		return Path{}, false
	}
	a, b, r2 := lineFromMoments(p.mt, p.my, p.stt, p.syy, p.sty)
	if r2 < opt.MinR2 || b == 0 || math.IsNaN(b) {
		return Path{}, false
	}
	dir := 1
	if b < 0 {
		dir = -1
	}
	if dir != p.dir {
		// Time runs backwards along the path (an unordered trajectory):
		// the fit contradicts the path, so it predicts nothing.
		return Path{}, false
	}
	return Path{A: a, B: b, R2: r2, Points: p.n, FirstPFN: p.first, LastPFN: p.last,
		Dir: dir, LastIndex: p.lastIdx, Stride: 1, Window: windowPages(b, opt)}, true
}

// windowPages is the window of a path moving b of its pages per round:
// |b|·WindowRounds, at least MinWindowPages, at most MaxWindowPages.
func windowPages(b float64, opt Options) uint64 {
	// Round up, but not for the last-bit error of an exact rate: a scan
	// of 40 pages per round must give 160 pages, not 161.
	w := math.Ceil(math.Abs(b)*opt.WindowRounds - 1e-6)
	win := opt.MinWindowPages
	if w > float64(win) {
		win = opt.MaxWindowPages
		if w < float64(win) {
			win = uint64(w)
		}
	}
	return min(win, opt.MaxWindowPages)
}
