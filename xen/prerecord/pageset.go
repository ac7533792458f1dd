package prerecord

// flatLimit is the largest guest (in pages) that gets a flat bitmap: 2^24
// pages (64 GiB of guest) cost a 2 MiB bitmap. Larger guests get a sparse
// one, because a trajectory touches a small part of memory and a flat
// bitmap of a 2^36-page guest would be 8 GiB.
const flatLimit = 1 << 24

// chunkBits is the pages covered by one sparse chunk (512 bytes).
const chunkBits = 4096

// pageSet remembers which pfns are already in the plan.
type pageSet struct {
	flat    []uint64
	chunks  map[uint64]*[chunkBits / 64]uint64
	lastKey uint64
	last    *[chunkBits / 64]uint64
}

func newPageSet(npages uint64) *pageSet {
	if npages <= flatLimit {
		return &pageSet{flat: make([]uint64, (npages+63)/64)}
	}
	return &pageSet{chunks: make(map[uint64]*[chunkBits / 64]uint64)}
}

// word returns the bitmap word holding p, allocating it when create is set;
// nil when absent.
func (s *pageSet) word(p uint64, create bool) *uint64 {
	if s.flat != nil {
		return &s.flat[p/64]
	}
	key := p / chunkBits
	c := s.last
	if c == nil || key != s.lastKey {
		c = s.chunks[key]
		if c == nil {
			if !create {
				return nil
			}
			c = new([chunkBits / 64]uint64)
			s.chunks[key] = c
		}
		s.lastKey, s.last = key, c
	}
	return &c[(p%chunkBits)/64]
}

// has reports whether p is in the set.
func (s *pageSet) has(p uint64) bool {
	w := s.word(p, false)
	return w != nil && *w&(1<<(p%64)) != 0
}

// add puts p in the set and reports whether it was new.
func (s *pageSet) add(p uint64) bool {
	w := s.word(p, true)
	bit := uint64(1) << (p % 64)
	if *w&bit != 0 {
		return false
	}
	*w |= bit
	return true
}
