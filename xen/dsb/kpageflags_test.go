package dsb

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func bits(b ...uint) uint64 {
	var w uint64
	for _, x := range b {
		w |= 1 << x
	}
	return w
}

func TestClassifyFlags(t *testing.T) {
	cases := []struct {
		w    uint64
		want PageClass
	}{
		{0, ClassOther},
		{bits(KPFPgtable), ClassPagetable},
		{bits(KPFSlab), ClassSlab},
		{bits(KPFBuddy), ClassFree},
		{bits(KPFOffline), ClassOffline},
		{bits(KPFAnon, KPFLRU), ClassAnon},
		{bits(KPFLRU, 2, 3), ClassLRU},
		{bits(KPFNoPage), ClassNoPage},
		{bits(2, 3, 4), ClassOther},
		{bits(KPFOffline, KPFBuddy), ClassOffline},
	}
	for _, c := range cases {
		assert.Equal(t, c.want, ClassifyFlags(c.w), "flags %#x", c.w)
	}
}

func TestClassifyPages(t *testing.T) {
	words := []uint64{
		bits(KPFPgtable), bits(KPFPgtable), // 0x100-0x101
		bits(KPFBuddy), 0, 0, 0, // free head then tails with no flags
		bits(KPFSlab, KPFCompoundHead), bits(KPFCompoundTail), bits(KPFCompoundTail), // compound slab
		bits(KPFAnon, KPFLRU),
		bits(KPFOffline), bits(KPFOffline),
		bits(KPFCompoundTail), // a tail whose head is not in the compound run just before
		bits(KPFPgtable),
	}
	pc := ClassifyPages(0x100, words)
	assert.Equal(t, uint64(3), pc.Counts[ClassPagetable])
	assert.Equal(t, "0x100-0x101,0x10d", pc.Ranges[ClassPagetable].String())
	assert.Equal(t, uint64(1), pc.Counts[ClassFree], "only the buddy head is known free")
	assert.Equal(t, uint64(3), pc.Counts[ClassSlab], "compound tails take the head's class")
	assert.Equal(t, "0x106-0x108", pc.Ranges[ClassSlab].String())
	assert.Equal(t, uint64(1), pc.Counts[ClassAnon])
	assert.Equal(t, Ranges{{0x10a, 2}}, pc.Ranges[ClassOffline])
	assert.Equal(t, uint64(4), pc.Counts[ClassOther])
	var total uint64
	for c := PageClass(0); c < NumClasses; c++ {
		total += pc.Counts[c]
		assert.Equal(t, pc.Counts[c], pc.Ranges[c].Pages(), c.String())
	}
	assert.Equal(t, uint64(len(words)), total)
	assert.True(t, pc.Ranges[ClassPagetable].Contains(0x101))
	assert.True(t, pc.Ranges[ClassPagetable].Contains(0x10d))
	assert.False(t, pc.Ranges[ClassPagetable].Contains(0x102))
	assert.False(t, pc.Ranges[ClassPagetable].Contains(0xff))
	assert.Equal(t, "other=4 nopage=0 offline=2 free=1 pagetable=3 slab=3 anon=1 lru=0", pc.Summary())
}

func TestDecodeKpageflags(t *testing.T) {
	b := binary.LittleEndian.AppendUint64(nil, bits(KPFPgtable))
	b = binary.LittleEndian.AppendUint64(b, bits(KPFBuddy))
	w, err := DecodeKpageflags(b)
	require.NoError(t, err)
	assert.Equal(t, []uint64{bits(KPFPgtable), bits(KPFBuddy)}, w)
	_, err = DecodeKpageflags(b[:9])
	assert.Error(t, err)
}

func TestClassifierInChunks(t *testing.T) {
	words := []uint64{
		bits(KPFSlab, KPFCompoundHead), bits(KPFCompoundTail), // head, tail | chunk boundary
		bits(KPFCompoundTail), bits(KPFPgtable), bits(KPFPgtable), 0,
	}
	whole := ClassifyPages(10, words)
	c := NewClassifier(10, true)
	c.Add(words[:2])
	c.Add(words[2:4])
	c.Add(words[4:])
	assert.Equal(t, whole, c.Result(), "chunking changes nothing, compound runs included")
	assert.Equal(t, "0xa-0xc", whole.Ranges[ClassSlab].String())
	assert.Equal(t, "0xd-0xe", whole.Ranges[ClassPagetable].String())

	counts := NewClassifier(10, false)
	counts.Add(words)
	assert.Equal(t, whole.Counts, counts.Result().Counts)
	assert.Nil(t, counts.Result().Ranges[ClassSlab])
}
