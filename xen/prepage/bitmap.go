package prepage

import "math/bits"

// Bitmap is a fixed-size set of pfns. It is not safe for concurrent use.
type Bitmap struct {
	w []uint64
	n uint64
}

// NewBitmap returns an empty bitmap over [0, n).
func NewBitmap(n uint64) *Bitmap { return &Bitmap{w: make([]uint64, (n+63)/64), n: n} }

// Len is the size of the pfn range.
func (b *Bitmap) Len() uint64 { return b.n }

// Test reports whether pfn is set.
func (b *Bitmap) Test(pfn uint64) bool { return b.w[pfn>>6]&(1<<(pfn&63)) != 0 }

// Set sets pfn and reports whether it was newly set.
func (b *Bitmap) Set(pfn uint64) bool {
	m := uint64(1) << (pfn & 63)
	old := b.w[pfn>>6]
	b.w[pfn>>6] = old | m
	return old&m == 0
}

// Clear clears pfn.
func (b *Bitmap) Clear(pfn uint64) { b.w[pfn>>6] &^= 1 << (pfn & 63) }

// Count is the number of set pfns.
func (b *Bitmap) Count() uint64 {
	c := 0
	for _, w := range b.w {
		c += bits.OnesCount64(w)
	}
	return uint64(c)
}

// NextClear returns the first clear pfn >= from, or (0, false).
func (b *Bitmap) NextClear(from uint64) (uint64, bool) {
	if from >= b.n {
		return 0, false
	}
	i := from >> 6
	w := ^b.w[i] & (^uint64(0) << (from & 63))
	for {
		if w != 0 {
			p := i<<6 + uint64(bits.TrailingZeros64(w))
			if p >= b.n {
				return 0, false
			}
			return p, true
		}
		i++
		if i >= uint64(len(b.w)) {
			return 0, false
		}
		w = ^b.w[i]
	}
}

// PrevClear returns the last clear pfn <= from, or (0, false).
func (b *Bitmap) PrevClear(from uint64) (uint64, bool) {
	if from >= b.n {
		if b.n == 0 {
			return 0, false
		}
		from = b.n - 1
	}
	i := int(from >> 6)
	w := ^b.w[i] & (^uint64(0) >> (63 - from&63))
	for {
		if w != 0 {
			return uint64(i)<<6 + uint64(63-bits.LeadingZeros64(w)), true
		}
		i--
		if i < 0 {
			return 0, false
		}
		w = ^b.w[i]
	}
}
