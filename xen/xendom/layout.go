package xendom

import (
	"fmt"
	"slices"

	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// Domain layout: which gfns hold RAM, the holes between them, and the
// ranges the DOMAIN_HEADER carries them in.

// Range is a run of consecutive gfns.
type Range struct {
	First uint64 `json:"first"`
	Count uint64 `json:"count"`
}

func toRanges(gfns []uint64) []Range {
	var r []Range
	for _, x := range wire.RangesOf(gfns) {
		r = append(r, Range{First: x.First, Count: x.Count})
	}
	return r
}

func fromRanges(r []Range, limit uint64) ([]uint64, error) {
	var total uint64
	for _, x := range r {
		if x.Count == 0 || x.First+x.Count < x.First {
			return nil, fmt.Errorf("bad gfn range %#x+%d", x.First, x.Count)
		}
		total += x.Count
		if total > limit {
			return nil, fmt.Errorf("gfn ranges hold more than %d pages", limit)
		}
	}
	out := make([]uint64, 0, total)
	for _, x := range r {
		for i := uint64(0); i < x.Count; i++ {
			g := x.First + i
			if n := len(out); n > 0 && out[n-1] >= g {
				return nil, fmt.Errorf("gfn ranges not ascending at %#x", g)
			}
			out = append(out, g)
		}
	}
	return out, nil
}

// withHoles returns the page space of a domain whose RAM gfns are ram
// (ascending): those, and the gfns of every hole before or between them
// of at most maxHole gfns, except those skip says are not the guest's
// (special pages, grant frames); absent says which are holes.
func withHoles(ram []uint64, maxHole uint64, skip func(uint64) bool) (space []uint64, absent []bool) {
	space = make([]uint64, 0, len(ram))
	absent = make([]bool, 0, len(ram))
	next := uint64(0) // first gfn after the previous RAM gfn
	for _, g := range ram {
		if g-next <= maxHole {
			for h := next; h < g; h++ {
				if !skip(h) {
					space = append(space, h)
					absent = append(absent, true)
				}
			}
		}
		space = append(space, g)
		absent = append(absent, false)
		next = g + 1
	}
	return space, absent
}

// dropUnmappable removes from s.gfns the RAM-typed gfns that cannot be
// mapped and returns them.
func (s *Source) dropUnmappable() (map[uint64]bool, error) {
	const batch = 256
	buf := make([]byte, batch*PageSize)
	keep := s.gfns[:0:0]
	unmappable := map[uint64]bool{}
	for i := 0; i < len(s.gfns); i += batch {
		part := s.gfns[i:min(i+batch, len(s.gfns))]
		failed, err := s.opt.HV.ReadPages(s.opt.Dom, part, buf[:len(part)*PageSize])
		if err != nil {
			return nil, fmt.Errorf("probe gfns %#x..%#x: %w", part[0], part[len(part)-1], err)
		}
		f := 0
		for j, g := range part {
			if f < len(failed) && failed[f] == j {
				f++
				s.stats.NotGuestRAM++
				unmappable[g] = true
				continue
			}
			keep = append(keep, g)
		}
	}
	if s.stats.NotGuestRAM > 0 {
		s.opt.Logf("%d gfns hold Xen's pages, not guest RAM (grant frames): not sent", s.stats.NotGuestRAM)
	}
	s.gfns = keep
	return unmappable, nil
}

// index returns the page index of gfn.
func (s *Source) index(gfn uint64) (uint64, bool) {
	i, ok := slices.BinarySearch(s.gfns, gfn)
	return uint64(i), ok
}
