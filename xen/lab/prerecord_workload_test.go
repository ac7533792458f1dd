package lab

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// multiproc: each process touches only its own 48-page image and writes
// only the middle 16 pages (its heap), so write tracking sees a third of
// what it uses.
func TestMultiprocWritesOnlyHeaps(t *testing.T) {
	wl, err := NewWorkload(WorkloadSpec{Name: "multiproc", Pages: 1 << 14, Seed: 3})
	require.NoError(t, err)
	m := wl.(*multiproc)
	st := InitState(0, 3)
	touched := map[uint64]bool{}
	written := map[uint64]bool{}
	for range 400_000 {
		pfn, _, w := wl.Next(&st)
		off := pfn - m.bases[st.Job]
		require.Less(t, off, uint64(procImage), "pfn %d outside process %d's image", pfn, st.Job)
		touched[pfn] = true
		if w {
			require.True(t, off >= procText && off < procText+procHeap, "write outside the heap at offset %d", off)
			written[pfn] = true
		}
	}
	assert.Greater(t, len(touched), 2*len(written), "reads cover text and data too")
	// Zipf(1) popularity: process 0 runs far more often than process 63.
	counts := make([]int, len(m.bases))
	for range 2000 {
		st.JobLeft = 0
		wl.Next(&st)
		counts[st.Job]++
	}
	assert.Greater(t, counts[0], 5*max(1, counts[63]))
}

// stream: a forward walk over all usable memory, 72 operations a page,
// writing every line once, wrapping at the end.
func TestStreamWalksForward(t *testing.T) {
	wl, err := NewWorkload(WorkloadSpec{Name: "stream", Pages: 100})
	require.NoError(t, err)
	var st VCPUState
	writes := 0
	for i := range 100 * streamOpsPerPage {
		pfn, line, w := wl.Next(&st)
		require.EqualValues(t, i/streamOpsPerPage, pfn)
		if w {
			writes++
			require.EqualValues(t, i%streamOpsPerPage, line)
		}
	}
	assert.Equal(t, 100*LinesPerPage, writes)
	pfn, _, _ := wl.Next(&st)
	assert.Zero(t, pfn, "wraps to the start")
}
