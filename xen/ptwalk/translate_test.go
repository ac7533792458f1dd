package ptwalk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestTranslate(t *testing.T) {
	mem := map[uint64][]byte{}
	page := func(g uint64) []byte {
		if mem[g] == nil {
			mem[g] = make([]byte, PageSize)
		}
		return mem[g]
	}
	set := func(g uint64, idx int, v uint64) { binary.LittleEndian.PutUint64(page(g)[idx*8:], v) }
	// PML4 at gfn 1: entry 511 -> PDPT at 2. PDPT entry 510 -> PD at 3,
	// entry 509 is a 1 GiB page at 0x40000 gfn. PD entry 0 -> PT at 4,
	// entry 1 is a 2 MiB page at gfn 0x800. PT entry 5 -> gfn 0x1234 (NX set).
	set(1, 511, 2<<12|3)
	set(2, 510, 3<<12|3)
	set(2, 509, 0x40000<<12|0x83)
	set(3, 0, 4<<12|3)
	set(3, 1, 0x800<<12|0x83)
	set(4, 5, 1<<63|0x1234<<12|3)
	read := func(g uint64) ([]byte, error) {
		if b, ok := mem[g]; ok {
			return b, nil
		}
		return nil, fmt.Errorf("gfn %#x not readable", g)
	}
	base := uint64(0xffff_ff80_0000_0000) // PML4 index 511
	cases := []struct {
		va   uint64
		want uint64
	}{
		{base | 510<<30 | 0<<21 | 5<<12 | 0x123, 0x1234},
		{base | 510<<30 | 1<<21 | 7<<12, 0x807},
		{base | 509<<30 | 3<<21 | 2<<12, 0x40000 + 3*512 + 2},
	}
	for _, c := range cases {
		got, err := Translate(1<<12, c.va, read)
		require.NoError(t, err, "va %#x", c.va)
		require.Equal(t, c.want, got, "va %#x", c.va)
	}
	_, err := Translate(1<<12, base|510<<30|0<<21|6<<12, read)
	require.True(t, errors.Is(err, ErrNotMapped), "unmapped PTE: %v", err)
	_, err = Translate(1<<12, 0x1000, read)
	require.True(t, errors.Is(err, ErrNotMapped), "unmapped PML4E: %v", err)
	delete(mem, 4)
	_, err = Translate(1<<12, base|510<<30|0<<21|5<<12, read)
	require.ErrorContains(t, err, "level-1 table at gfn 0x4")
}

func TestWalkKernelSkipsUserHalfAndBatches(t *testing.T) {
	mem := map[uint64][]byte{}
	set := func(g uint64, idx int, v uint64) {
		if mem[g] == nil {
			mem[g] = make([]byte, PageSize)
		}
		binary.LittleEndian.PutUint64(mem[g][idx*8:], v)
	}
	set(1, 5, 2<<12|7)   // user half -> PDPT 2
	set(2, 0, 6<<12|7)   // -> PD 6 (user)
	set(1, 300, 3<<12|3) // kernel half -> PDPT 3
	set(3, 0, 4<<12|3)   // -> PD 4
	set(4, 0, 5<<12|3)   // -> PT 5
	set(6, 0, 7<<12|7)   // -> PT 7 (user)
	var calls [][]uint64
	batch := func(gfns []uint64) ([][]byte, error) {
		calls = append(calls, append([]uint64(nil), gfns...))
		out := make([][]byte, len(gfns))
		for i, g := range gfns {
			out[i] = mem[g]
			if out[i] == nil {
				return out[:i], fmt.Errorf("gfn %#x missing", g)
			}
		}
		return out, nil
	}
	res, err := WalkKernel(1<<12, 0, batch, 0)
	require.NoError(t, err)
	require.Equal(t, []uint64{1, 3, 4, 5}, res.Tables)
	require.Equal(t, [][]uint64{{1}, {3}, {4}}, calls, "one batch per level, L1 tables never read")

	read := func(g uint64) ([]byte, error) {
		if b := mem[g]; b != nil {
			return b, nil
		}
		return nil, fmt.Errorf("gfn %#x missing", g)
	}
	all, err := Walk(LongMode4, 1<<12, 0, read, 0)
	require.NoError(t, err)
	require.Equal(t, []uint64{1, 2, 3, 4, 5, 6, 7}, all.Tables, "Walk still covers both halves")
}
