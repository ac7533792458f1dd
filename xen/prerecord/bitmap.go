package prerecord

import (
	"sort"

	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

// segment is a run of one round's accesses, positions [s, e), whose pfns
// rise in steps of at most MaxStepPages and span [lo, hi].
type segment struct {
	s, e   int
	lo, hi uint64
}

// roundSegments splits the round acc[s:e] into segments when the round is
// listed in strictly ascending pfn order, the signature of a recorder that
// read a dirty bitmap and so could not know the order of touches inside the
// round. A round in any other order is taken as genuinely ordered: nil.
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

// justBelow reports whether some segment of other starts at most maxStep
// pages above x's end. other is ascending and disjoint.
func justBelow(x segment, other []segment, maxStep uint64) bool {
	k := sort.Search(len(other), func(i int) bool { return other[i].lo > x.hi })
	return k < len(other) && other[k].lo-x.hi <= maxStep
}

// justAbove reports whether some segment of other ends at most maxStep
// pages below x's start.
func justAbove(x segment, other []segment, maxStep uint64) bool {
	k := sort.Search(len(other), func(i int) bool { return other[i].hi >= x.lo }) - 1
	return k >= 0 && x.lo-other[k].hi <= maxStep
}

// unbitmapOrder returns the trajectory's pfns in the order the path tracker
// should see them. In a bitmap-ordered round (see roundSegments) a segment
// is read backwards when the neighbouring rounds say the memory is being
// walked downwards: the previous round has a segment just above it, or the
// next round a segment just below it, and neither has one continuing it
// upwards. Then a backward scan of k pages per round, listed ascending in
// each round, becomes the descending sequence it really was. Everything
// else keeps the recorded order.
func unbitmapOrder(acc []trace.Access, npages, maxStep uint64) []uint64 {
	pfns := make([]uint64, len(acc))
	for i, a := range acc {
		pfns[i] = a.PFN
	}
	type run struct{ s, e int }
	var rounds []run
	for i := 0; i < len(acc); {
		j := i + 1
		for j < len(acc) && acc[j].Round == acc[i].Round {
			j++
		}
		rounds = append(rounds, run{i, j})
		i = j
	}
	var prev, cur, next []segment
	for r := range rounds {
		if r == 0 {
			cur = roundSegments(acc, rounds[0].s, rounds[0].e, npages, maxStep)
		} else {
			prev, cur = cur, next
		}
		next = nil
		if r+1 < len(rounds) {
			next = roundSegments(acc, rounds[r+1].s, rounds[r+1].e, npages, maxStep)
		}
		for _, x := range cur {
			if x.e-x.s < 2 {
				continue
			}
			down := justBelow(x, prev, maxStep) || justAbove(x, next, maxStep)
			up := justAbove(x, prev, maxStep) || justBelow(x, next, maxStep)
			if down && !up {
				for i, j := x.s, x.e-1; i < j; i, j = i+1, j-1 {
					pfns[i], pfns[j] = pfns[j], pfns[i]
				}
			}
		}
	}
	return pfns
}
