package ptwalk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// mem is synthetic guest memory: gfn -> page. Pages are created on first
// write, so a table that is only pointed to (never written) is absent and
// reading it fails, which the tests use to prove L1 tables are not read.
type mem map[uint64][]byte

var errNoPage = errors.New("no such page")

func (m mem) page(gfn uint64) []byte {
	if m[gfn] == nil {
		m[gfn] = make([]byte, PageSize)
	}
	return m[gfn]
}

func (m mem) set64(gfn uint64, idx int, v uint64) {
	binary.LittleEndian.PutUint64(m.page(gfn)[idx*8:], v)
}

func (m mem) set32(gfn uint64, idx int, v uint32) {
	binary.LittleEndian.PutUint32(m.page(gfn)[idx*4:], v)
}

// reader returns a read func over m and the list of gfns it was asked for.
func (m mem) reader() (func(uint64) ([]byte, error), *[]uint64) {
	var reads []uint64
	return func(gfn uint64) ([]byte, error) {
		reads = append(reads, gfn)
		p, ok := m[gfn]
		if !ok {
			return nil, errNoPage
		}
		return p, nil
	}, &reads
}

const (
	p   = ptePresent | 1<<1 | 1<<2 // present, writable, user
	ps  = ptePS
	nx  = 1 << 63
	pk  = 0xF << 59 // protection-key bits
	avl = 0x7F << 52
)

func pte(gfn uint64, flags uint64) uint64 { return gfn<<12 | flags }

// longMode: root 0x10 with an L3 (NX entry), two L2s sharing an L1, a 1 GiB
// and a 2 MiB page, a non-present entry with an address, and high
// attribute bits that must be masked.
func longMode() mem {
	m := mem{}
	m.set64(0x10, 0, pte(0x11, p|nx))
	m.set64(0x10, 1, pte(0x99, 0)) // not present: ignored
	m.set64(0x11, 0, pte(0x12, p))
	m.set64(0x11, 1, pte(0x40000, p|ps)) // 1 GiB page at 1 GiB
	m.set64(0x11, 2, pte(0x13, p|avl))
	m.set64(0x12, 0, pte(0x14, p|pk))
	m.set64(0x12, 1, pte(0x200, p|ps|nx)) // 2 MiB page
	m.set64(0x12, 2, pte(0x15, p))
	m.set64(0x13, 5, pte(0x14, p)) // shared L1
	return m
}

func TestWalk(t *testing.T) {
	pae := mem{}
	// PDPT at offset 0x60 of page 0x20; the rest of that page is other
	// data that happens to look like present entries.
	pae.set64(0x20, 0, pte(0x77, p))
	pae.set64(0x20, 11, pte(0x78, p))
	pae.set64(0x20, 12, pte(0x21, ptePresent))
	pae.set64(0x20, 13, pte(0x79, 0))
	pae.set64(0x20, 14, pte(0x22, ptePresent))
	pae.set64(0x20, 15, pte(0x123456, ptePresent)) // PAE reaches above 4 GiB
	pae.set64(0x20, 16, pte(0x7a, p))
	pae.set64(0x21, 0, pte(0x24, p))
	pae.set64(0x21, 3, pte(0x400, p|ps)) // 2 MiB
	pae.set64(0x22, 511, pte(0x25, p|nx))
	pae.page(0x123456)

	legacy := mem{}
	legacy.set32(0x30, 0, uint32(pte(0x31, p)))
	legacy.set32(0x30, 1, uint32(pte(0x400, p|ps))) // 4 MiB page if PSE
	legacy.set32(0x30, 2, uint32(pte(0x32, p)))
	legacy.set32(0x30, 3, uint32(pte(0x33, 0)))
	legacy.set32(0x30, 1023, uint32(pte(0xfffff, p)))

	cycle := mem{}
	cycle.set64(0x40, 0, pte(0x41, p))
	cycle.set64(0x40, 511, pte(0x40, p)) // self-map, as Windows does
	cycle.set64(0x41, 0, pte(0x42, p))
	cycle.set64(0x41, 1, pte(0x41, p))
	cycle.set64(0x42, 0, pte(0x40, p)) // back to the root from L2

	outside := mem{}
	outside.set64(0x50, 0, pte(0x51, p))
	outside.set64(0x50, 1, pte(0x1000000, p))
	outside.set64(0x51, 0, pte(0x101, p))
	outside.set64(0x51, 1, pte(0x52, p))
	outside.set64(0x52, 0, pte(0x53, p))
	outside.set64(0x52, 1, pte(0xFF_FFFF_FFFF, p)) // all 40 address bits
	outside.set64(0x52, 2, pte(0x100, p))          // exactly maxGFN: kept

	tests := []struct {
		name    string
		m       mem
		mode    Mode
		cr3     uint64
		maxGFN  uint64
		limit   int
		want    []uint64
		skipped int
		reads   []uint64 // in order; nil: not checked
	}{
		{
			name: "4-level with 1G and 2M pages", m: longMode(), mode: LongMode4,
			cr3:  0x10<<12 | 0x5 | 1<<63, // PCID 5, no-flush bit
			want: []uint64{0x10, 0x11, 0x12, 0x13, 0x14, 0x15},
			// L1 tables 0x14, 0x15 are reported but never read.
			reads: []uint64{0x10, 0x11, 0x12, 0x13},
		},
		{
			name: "PAE", m: pae, mode: PAE3, cr3: 0x20<<12 | 0x60 | 0x18,
			want:  []uint64{0x20, 0x21, 0x22, 0x24, 0x25, 0x123456},
			reads: []uint64{0x20, 0x21, 0x22, 0x123456},
		},
		{
			name: "legacy with PSE", m: legacy, mode: Legacy2PSE, cr3: 0x30<<12 | 0x18,
			want: []uint64{0x30, 0x31, 0x32, 0xfffff}, reads: []uint64{0x30},
		},
		{
			name: "legacy without PSE follows bit 7", m: legacy, mode: Legacy2, cr3: 0x30 << 12,
			want: []uint64{0x30, 0x31, 0x32, 0x400, 0xfffff},
		},
		{
			name: "legacy ignores high CR3 bits", m: legacy, mode: Legacy2PSE, cr3: 1<<32 | 0x30<<12,
			want: []uint64{0x30, 0x31, 0x32, 0xfffff},
		},
		{
			name: "cycle", m: cycle, mode: LongMode4, cr3: 0x40 << 12,
			want: []uint64{0x40, 0x41, 0x42}, reads: []uint64{0x40, 0x41, 0x42},
		},
		{
			name: "out of range", m: outside, mode: LongMode4, cr3: 0x50 << 12, maxGFN: 0x100,
			want: []uint64{0x50, 0x51, 0x52, 0x53, 0x100}, skipped: 3,
		},
		{
			name: "maxGFN 0 is unbounded", m: longMode(), mode: LongMode4, cr3: 0x10 << 12,
			want: []uint64{0x10, 0x11, 0x12, 0x13, 0x14, 0x15},
		},
		{
			name: "limit exactly reached", m: longMode(), mode: LongMode4, cr3: 0x10 << 12, limit: 6,
			want: []uint64{0x10, 0x11, 0x12, 0x13, 0x14, 0x15},
		},
		{
			name: "empty root", m: mem{0x60: make([]byte, PageSize)}, mode: LongMode4, cr3: 0x60 << 12,
			want: []uint64{0x60},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			read, reads := tc.m.reader()
			res, err := Walk(tc.mode, tc.cr3, tc.maxGFN, read, tc.limit)
			require.NoError(t, err)
			assert.Equal(t, tc.want, res.Tables)
			assert.Equal(t, tc.skipped, res.Skipped)
			if tc.reads != nil {
				assert.Equal(t, tc.reads, *reads)
			}
		})
	}
}

func TestWalkReadErrorHasContext(t *testing.T) {
	m := longMode()
	delete(m, 0x13)
	read, _ := m.reader()
	res, err := Walk(LongMode4, 0x10<<12, 0, read, 0)
	require.ErrorIs(t, err, errNoPage)
	assert.EqualError(t, err, "ptwalk: 4-level: reading level-2 table at gfn 0x13: no such page")
	// Partial result: everything reachable before the failed read.
	assert.Equal(t, []uint64{0x10, 0x11, 0x12, 0x13, 0x14, 0x15}, res.Tables)
	assert.True(t, slices.IsSorted(res.Tables))
}

func TestWalkShortPage(t *testing.T) {
	m := longMode()
	m[0x11] = m[0x11][:100]
	read, _ := m.reader()
	_, err := Walk(LongMode4, 0x10<<12, 0, read, 0)
	assert.EqualError(t, err, "ptwalk: 4-level: level-3 table at gfn 0x11: read 100 bytes, want 4096")
}

func TestWalkLimit(t *testing.T) {
	read, _ := longMode().reader()
	res, err := Walk(LongMode4, 0x10<<12, 0, read, 5)
	require.ErrorIs(t, err, ErrLimit)
	assert.Contains(t, err.Error(), "more than 5 tables")
	assert.Len(t, res.Tables, 5)
	assert.True(t, slices.IsSorted(res.Tables))
}

func TestWalkRootBeyondMax(t *testing.T) {
	read, reads := longMode().reader()
	_, err := Walk(LongMode4, 0x10<<12, 0xf, read, 0)
	assert.EqualError(t, err, "ptwalk: 4-level: cr3 0x10000: root gfn 0x10 beyond max gfn 0xf")
	assert.Empty(t, *reads)
}

func TestWalkUnsupportedMode(t *testing.T) {
	read, _ := longMode().reader()
	for _, m := range []Mode{PagingOff, Unsupported, Mode(42)} {
		_, err := Walk(m, 0x10<<12, 0, read, 0)
		assert.ErrorIs(t, err, ErrUnsupportedMode, m.String())
	}
}

// TestWalkRandomGarbage walks pages of pseudo-random bytes: whatever the
// content, the walk must end, stay within maxGFN and report unique tables.
func TestWalkRandomGarbage(t *testing.T) {
	const maxGFN = 0x3ff
	var x uint64 = 0x9e3779b97f4a7c15
	m := mem{}
	for g := uint64(0); g <= maxGFN; g++ {
		pg := m.page(g)
		for i := 0; i < PageSize; i += 8 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			// Keep addresses mostly in range so the walk goes deep.
			binary.LittleEndian.PutUint64(pg[i:], x&^(0xFFFF_FFFF_FFFF_F000)|(x>>20)%(maxGFN+40)<<12)
		}
	}
	for _, mode := range []Mode{Legacy2, Legacy2PSE, PAE3, LongMode4} {
		t.Run(mode.String(), func(t *testing.T) {
			read, _ := m.reader()
			res, err := Walk(mode, 7<<12, maxGFN, read, 0)
			require.NoError(t, err)
			assert.True(t, slices.IsSorted(res.Tables))
			assert.Equal(t, len(res.Tables), len(slices.Compact(slices.Clone(res.Tables))), "unique")
			assert.LessOrEqual(t, res.Tables[len(res.Tables)-1], uint64(maxGFN))
			assert.Greater(t, len(res.Tables), 1)
			assert.Positive(t, res.Skipped, "some of the garbage points past maxGFN")
		})
	}
}

func TestModeOf(t *testing.T) {
	const pg, pae, pse, la57, lma, lme = cr0PG, cr4PAE, cr4PSE, cr4LA57, eferLMA, 1 << 8
	tests := []struct {
		cr0, cr4, efer uint64
		mode           Mode
		ok             bool
	}{
		{0x11, pae | pse, lma | lme, PagingOff, false}, // PG clear wins
		{pg | 1, 0, 0, Legacy2, true},
		{pg | 1, pse, 0, Legacy2PSE, true},
		{pg | 1, pae, 0, PAE3, true},
		{pg | 1, pae | pse, lme, PAE3, true}, // LME without LMA: not yet active
		{pg | 1, pae, lma | lme, LongMode4, true},
		{pg | 1, pae | pse, lma | lme, LongMode4, true},
		{pg | 1, pae | la57, lma | lme, Unsupported, false},
		{pg | 1, pse, lma | lme, Unsupported, false}, // long mode without PAE
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("cr0=%#x,cr4=%#x,efer=%#x", tc.cr0, tc.cr4, tc.efer), func(t *testing.T) {
			mode, ok := ModeOf(tc.cr0, tc.cr4, tc.efer)
			assert.Equal(t, tc.mode, mode)
			assert.Equal(t, tc.ok, ok)
		})
	}
}
