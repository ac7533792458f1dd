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

// hotspots clusters the trajectory, ranks the hotspots and appends their
// pages not yet in set to order. It returns the ranked hotspots, the
// effective MinPts and the extended order.
//
// Inside a hotspot the distinct recorded pfns are ranked by count ·
// decay(age) (ties: more recent, then lower pfn). Each ranked pfn c not yet
// covered by an earlier neighbourhood of the same hotspot opens the
// neighbourhood [c−h, c+h], h = NeighbourhoodPages/2, clipped to the guest,
// emitted nearest first (c+1, c−1, c+2, …) like a pre-paging bubble. A
// neighbourhood may reach up to h pages past the hotspot's ends, because the
// recorded extremes are only where the records stopped. Pages of [Start,
// End] that no neighbourhood covered come last, ascending.
func hotspots(acc []trace.Access, npages uint64, opt Options, set *pageSet, order []uint64) ([]Hotspot, int, []uint64) {
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
		return nil, minPts, order
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
	type cand struct {
		pfn   uint64
		round uint32
		prio  float64
	}
	var cands []cand
	var covered []uint64
	for k, i := range rank {
		out[k] = hs[i]
		c := clusters[i]
		cands = cands[:0]
		for j := c.Lo; j < c.Hi; {
			e := j
			var last uint32
			for e < c.Hi && recs[e].pfn == recs[j].pfn {
				last = max(last, recs[e].round)
				e++
			}
			cands = append(cands, cand{recs[j].pfn, last, float64(e-j) * decay(maxRound-last, opt.HalfLifeRounds)})
			j = e
		}
		slices.SortStableFunc(cands, func(x, y cand) int {
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
		for _, cd := range cands {
			if isCovered(cd.pfn) {
				continue
			}
			mark(cd.pfn)
			if set.add(cd.pfn) {
				order = append(order, cd.pfn) // only if the caller's set lacked it
			}
			for d := uint64(1); d <= h; d++ {
				if d <= top-cd.pfn {
					if q := cd.pfn + d; !isCovered(q) {
						mark(q)
						if set.add(q) {
							order = append(order, q)
						}
					}
				}
				if d <= cd.pfn-base {
					if q := cd.pfn - d; !isCovered(q) {
						mark(q)
						if set.add(q) {
							order = append(order, q)
						}
					}
				}
			}
		}
		for q := c.Start; ; q++ {
			if !isCovered(q) && set.add(q) {
				order = append(order, q)
			}
			if q == c.End {
				break
			}
		}
	}
	return out, minPts, order
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
