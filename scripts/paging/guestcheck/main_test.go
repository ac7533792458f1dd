package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRangesMergeSortedRuns(t *testing.T) {
	assert.Equal(t, []string{"5", "10-12", "20-21"}, ranges([]uint64{0x11, 0x20, 0x5, 0x10, 0x21, 0x12}))
	assert.Empty(t, ranges(nil))
}

func TestFillVerifyDetectsChangedPages(t *testing.T) {
	buf := make([]byte, 4*pageSize)
	fill(buf, 4)
	assert.Zero(t, verify(buf, 4))
	copy(buf[pageSize:2*pageSize], buf[2*pageSize:3*pageSize]) // page 1 holds page 2's content
	buf[3*pageSize+100] ^= 1
	assert.Equal(t, 2, verify(buf, 4))
	clear(buf[:pageSize]) // a page lost to a scrub reads as zeros
	assert.Equal(t, 3, verify(buf, 4))
}

func TestPrintRangesLinesParseBack(t *testing.T) {
	var gfns []uint64
	for g := uint64(0x1000); g < 0x1000+300; g += 2 { // 150 single gfns: several lines
		gfns = append(gfns, g)
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "out"))
	require.NoError(t, err)
	printRanges(f, gfns)
	require.NoError(t, f.Close())
	b, err := os.ReadFile(f.Name())
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n") // TrimSpace drops the leading blank line
	require.Greater(t, len(lines), 2)
	assert.Equal(t, "gfns-end 150 150", lines[len(lines)-1])
	n := 0
	for _, l := range lines[:len(lines)-1] {
		fs := strings.Fields(l)
		require.Len(t, fs, 3, l)
		assert.Equal(t, "gfns", fs[0])
		assert.Less(t, len(l), 200, "console-friendly line length")
		n += len(strings.Split(fs[2], ","))
	}
	assert.Equal(t, 150, n)
}

func TestBadPagesDescribesWrongContent(t *testing.T) {
	buf := make([]byte, 3*pageSize)
	fill(buf, 3)
	clear(buf[2*pageSize : 2*pageSize+64]) // 8 words of page 2 zeroed
	bad := badPages(buf, 3, 4)
	require.Len(t, bad, 1)
	assert.Equal(t, 2, bad[0].index)
	assert.Equal(t, 0, bad[0].firstWrong)
	assert.Equal(t, 8, bad[0].wrongWords)
	assert.Equal(t, 8, bad[0].zeroWords)
	assert.Equal(t, word(2, 0), bad[0].want)
}
