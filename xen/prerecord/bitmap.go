package prerecord

import (
	"cmp"
	"slices"

	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

// A recorder that reads a dirty bitmap (Xen log-dirty, PAGEMAP_SCAN) lists
// each round's pages in ascending pfn order whatever order they were
// touched in. Inside such a round a dense random burst looks exactly like
// an ascending scan, so paths in bitmap-ordered trajectories are found
// across rounds instead, from each round's segments: a scan shows up as a
// segment that starts, in the next round, just past where it ended in this
// one; a random burst shows up as segments that overlap round after round.

// segment is a run of one round's accesses, positions [s, e), whose pfns
// rise in steps of at most MaxStepPages and span [lo, hi].
type segment struct {
	s, e   int
	lo, hi uint64
}

// roundSegments splits the round acc[s:e] into segments when the round is
// listed in strictly ascending pfn order; a round in any other order, or
// with a pfn at or above npages, gives nil.
func roundSegments(acc []trace.Access, s, e int, npages, maxStep uint64) []segment {
	var out []segment
	for i := s; i < e; i++ {
		p := acc[i].PFN
		if p >= npages || (i > s && p <= acc[i-1].PFN) {
			return nil
		}
		if k := len(out) - 1; k >= 0 && p-out[k].hi <= maxStep {
			out[k].e, out[k].hi = i+1, p
			continue
		}
		out = append(out, segment{s: i, e: i + 1, lo: p, hi: p})
	}
	return out
}

// roundRun is one round of a trajectory: accesses [s, e).
type roundRun struct{ s, e int }

// rounds splits acc into runs of equal Round.
func rounds(acc []trace.Access) []roundRun {
	var out []roundRun
	for i := 0; i < len(acc); {
		j := i + 1
		for j < len(acc) && acc[j].Round == acc[i].Round {
			j++
		}
		out = append(out, roundRun{i, j})
		i = j
	}
	return out
}

// bitmapOrdered reports whether acc looks recorded from a dirty bitmap:
// inside rounds, pfns rise, except for at most one descent per round on
// average (a recorder whose scan of the bitmap took more than one pass, each
// ascending), and some round has two or more pfns. A trajectory of one page
// per round, or in genuine time order (where about every other step inside
// a round descends), is read access by access.
func bitmapOrdered(acc []trace.Access) bool {
	rs := rounds(acc)
	multi, descents := false, 0
	for _, r := range rs {
		for i := r.s + 1; i < r.e; i++ {
			multi = true
			if acc[i].PFN <= acc[i-1].PFN {
				descents++
			}
		}
	}
	return multi && descents <= len(rs)
}

// sortRounds returns acc with every round's pfns sorted ascending and
// duplicates inside a round removed: the order a single pass over the
// round's dirty bitmap gives. acc itself is not modified.
func sortRounds(acc []trace.Access) []trace.Access {
	out := make([]trace.Access, 0, len(acc))
	for _, r := range rounds(acc) {
		k := len(out)
		out = append(out, acc[r.s:r.e]...)
		round := out[k:]
		slices.SortStableFunc(round, func(x, y trace.Access) int { return cmp.Compare(x.PFN, y.PFN) })
		round = slices.CompactFunc(round, func(x, y trace.Access) bool { return x.PFN == y.PFN })
		out = out[:k+len(round)]
	}
	return out
}
