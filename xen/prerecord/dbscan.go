package prerecord

import (
	"cmp"
	"math"
	"slices"

	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

// Cluster is one density-connected group of an irregular sequence series:
// the records sorted[Lo:Hi], whose pfns span [Start, End].
type Cluster struct {
	Lo, Hi     int    // index range [Lo, Hi) into the sorted input
	Start, End uint64 // first and last pfn of the cluster
	Cores      int    // how many of the records are core points
}

// ISSDBSCAN clusters an irregular sequence series: pfns sorted ascending,
// with one entry per record (a pfn recorded k times appears k times).
//
// A record is a core point when at least minPts records (itself included)
// lie within ±eps pages. Because the series is sorted, the neighbour counts
// come from one two-pointer sweep, and in one dimension density-connection
// is simple: consecutive core points at most eps apart are in one cluster,
// and a gap of more than eps between consecutive cores separates clusters
// (no chain of eps-steps between cores can cross it). A non-core record
// within eps of a cluster's outermost core is a border point of it; one
// within eps of two clusters joins the nearer (the lower on a tie).
// Everything else is noise. Clusters are therefore contiguous index ranges,
// returned in ascending pfn order. Time O(n); the input is not modified.
func ISSDBSCAN(sorted []uint64, eps uint64, minPts int) []Cluster {
	n := len(sorted)
	if n == 0 {
		return nil
	}
	// Core flags by two-pointer sweep: [lo, hi) is the window of records
	// within ±eps of sorted[i].
	core := make([]bool, n)
	lo, hi := 0, 0
	for i, p := range sorted {
		for p-sorted[lo] > eps {
			lo++
		}
		if hi < i {
			hi = i
		}
		for hi < n && sorted[hi]-p <= eps {
			hi++
		}
		core[i] = hi-lo >= minPts
	}
	// Runs of core points, split where consecutive cores are > eps apart.
	type run struct{ first, last, cores int }
	var runs []run
	for i := range n {
		if !core[i] {
			continue
		}
		if k := len(runs) - 1; k >= 0 && sorted[i]-sorted[runs[k].last] <= eps {
			runs[k].last = i
			runs[k].cores++
			continue
		}
		runs = append(runs, run{first: i, last: i, cores: 1})
	}
	out := make([]Cluster, 0, len(runs))
	claimed := 0 // records below this index belong to an earlier cluster
	for k, r := range runs {
		lo := r.first
		for lo > claimed && sorted[r.first]-sorted[lo-1] <= eps {
			lo--
		}
		hi := r.last + 1
		limit := n
		if k+1 < len(runs) {
			limit = runs[k+1].first
		}
		for hi < limit && sorted[hi]-sorted[r.last] <= eps {
			if k+1 < len(runs) && sorted[runs[k+1].first]-sorted[hi] < sorted[hi]-sorted[r.last] {
				break // nearer to the next cluster's first core
			}
			hi++
		}
		claimed = hi
		out = append(out, Cluster{Lo: lo, Hi: hi, Start: sorted[lo], End: sorted[hi-1], Cores: r.cores})
	}
	return out
}

// Hotspot is a cluster of the trajectory, ranked for sending.
type Hotspot struct {
	Start, End uint64 // [Start, End]: first and last recorded pfn
	Count      int    // records (accesses) in the hotspot
	LastRound  uint32 // latest round any of its pages was recorded in
	// Score ranks hotspots (highest first): Count · 2^(−age/HalfLifeRounds)
	// with age = last round of the trajectory − LastRound, so access count
	// dominates and recency decides between hotspots of similar weight.
	Score float64
}

// record is one access, sorted by pfn for clustering.
type record struct {
	pfn   uint64
	round uint32
}

// decay is the recency weight of a record age rounds old.
func decay(age uint32, halfLife float64) float64 {
	if halfLife <= 0 {
		return 1
	}
	return math.Exp2(-float64(age) / halfLife)
}

// hotspots clusters the trajectory, ranks the hotspots and returns them,
// the effective MinPts, and the hotspot pages the trajectory did not record
// as candidates for the send order.
//
// Inside a hotspot the distinct recorded pfns are ranked by their page
// score (pageScore: recent accesses count most; ties: more recent, then
// lower pfn). Each ranked pfn c not yet covered by an earlier neighbourhood
// of the same hotspot opens the neighbourhood [c−h, c+h], h =
// NeighbourhoodPages/2, clipped to the guest, walked nearest first (c+1,
// c−1, c+2, …) like a pre-paging bubble; its unrecorded pages become
// candidates with half of c's score, because a page beside a busy page is
// likely used with it, but it was not seen written. A neighbourhood may
// reach up to h pages past the hotspot's ends, because the recorded
// extremes are only where the records stopped. Pages of [Start−h, End+h]
// that no neighbourhood covered come last, at a quarter of the hotspot's
// best score: a busy pfn near one end of a hotspot must not leave the
// other end's margin out.
func hotspots(acc []trace.Access, npages uint64, opt Options, recorded *pageSet, pageScore func(uint64) float64, seq int) ([]Hotspot, int, []cand) {
	recs := make([]record, 0, len(acc))
	var maxRound uint32
	for _, a := range acc {
		if a.PFN < npages {
			recs = append(recs, record{a.PFN, a.Round})
			maxRound = max(maxRound, a.Round)
		}
	}
	minPts := opt.MinPts
	if opt.DensityFactor > 0 {
		want := math.Ceil(opt.DensityFactor * float64(len(recs)) * (2*float64(opt.EpsPages) + 1) / float64(npages))
		if want > float64(minPts) {
			minPts = int(min(want, float64(len(recs)+1)))
		}
	}
	if len(recs) == 0 {
		return nil, minPts, nil
	}
	sortRecords(recs)
	pfns := make([]uint64, len(recs))
	for i, r := range recs {
		pfns[i] = r.pfn
	}
	clusters := ISSDBSCAN(pfns, opt.EpsPages, minPts)
	hs := make([]Hotspot, len(clusters))
	for i, c := range clusters {
		var last uint32
		for _, r := range recs[c.Lo:c.Hi] {
			last = max(last, r.round)
		}
		hs[i] = Hotspot{Start: c.Start, End: c.End, Count: c.Hi - c.Lo, LastRound: last,
			Score: float64(c.Hi-c.Lo) * decay(maxRound-last, opt.HalfLifeRounds)}
	}
	rank := make([]int, len(hs))
	for i := range rank {
		rank[i] = i
	}
	slices.SortStableFunc(rank, func(x, y int) int {
		if c := cmp.Compare(hs[y].Score, hs[x].Score); c != 0 {
			return c
		}
		return cmp.Compare(hs[y].LastRound, hs[x].LastRound)
	})
	out := make([]Hotspot, len(hs))
	h := opt.NeighbourhoodPages / 2
	type busy struct {
		pfn   uint64
		round uint32
		prio  float64
	}
	var busies []busy
	var covered []uint64
	var cands []cand
	emit := func(q uint64, score float64) {
		if !recorded.has(q) {
			cands = append(cands, cand{pfn: q, score: score, seq: seq, stage: stageHotspot})
			seq++
		}
	}
	for k, i := range rank {
		out[k] = hs[i]
		c := clusters[i]
		busies = busies[:0]
		for j := c.Lo; j < c.Hi; {
			e := j
			var last uint32
			for e < c.Hi && recs[e].pfn == recs[j].pfn {
				last = max(last, recs[e].round)
				e++
			}
			busies = append(busies, busy{recs[j].pfn, last, pageScore(recs[j].pfn)})
			j = e
		}
		slices.SortStableFunc(busies, func(x, y busy) int {
			if c := cmp.Compare(y.prio, x.prio); c != 0 {
				return c
			}
			return cmp.Compare(y.round, x.round) // then recency; pfn order is kept by stability
		})
		// covered marks pages of [base, top] inside some neighbourhood.
		base := c.Start - min(h, c.Start)
		top := min(c.End+min(h, math.MaxUint64-c.End), npages-1)
		words := (top-base)/64 + 1
		covered = slices.Grow(covered[:0], int(words))[:words]
		clear(covered)
		mark := func(q uint64) { covered[(q-base)/64] |= 1 << ((q - base) % 64) }
		isCovered := func(q uint64) bool { return covered[(q-base)/64]&(1<<((q-base)%64)) != 0 }
		for _, b := range busies {
			if isCovered(b.pfn) {
				continue
			}
			mark(b.pfn)
			for d := uint64(1); d <= h; d++ {
				if d <= top-b.pfn {
					if q := b.pfn + d; !isCovered(q) {
						mark(q)
						emit(q, b.prio/2)
					}
				}
				if d <= b.pfn-base {
					if q := b.pfn - d; !isCovered(q) {
						mark(q)
						emit(q, b.prio/2)
					}
				}
			}
		}
		for q := base; ; q++ {
			if !isCovered(q) {
				emit(q, busies[0].prio/4)
			}
			if q == top {
				break
			}
		}
	}
	return out, minPts, cands
}

// sortRecords sorts by pfn (round order within a pfn does not matter).
// When pfns and rounds fit 32 bits each, records are packed into one
// uint64 key so the sort runs on plain integers, about twice as fast as a
// comparator sort of structs.
func sortRecords(recs []record) {
	var maxPFN uint64
	for _, r := range recs {
		maxPFN = max(maxPFN, r.pfn)
	}
	if maxPFN>>32 != 0 {
		slices.SortFunc(recs, func(x, y record) int { return cmp.Compare(x.pfn, y.pfn) })
		return
	}
	keys := make([]uint64, len(recs))
	for i, r := range recs {
		keys[i] = r.pfn<<32 | uint64(r.round)
	}
	slices.Sort(keys)
	for i, k := range keys {
		recs[i] = record{pfn: k >> 32, round: uint32(k)}
	}
}
