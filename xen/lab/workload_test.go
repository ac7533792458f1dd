package lab

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

func writeTrace(t *testing.T, pages uint64, pfns ...uint64) string {
	t.Helper()
	tr := &trace.Trace{Pages: pages, PageSize: 4096, Interval: 10 * time.Millisecond}
	for i, p := range pfns {
		tr.Accesses = append(tr.Accesses, trace.Access{T: time.Duration(i) * time.Millisecond, Round: uint32(i / 2), PFN: p, Write: i%2 == 0})
	}
	path := filepath.Join(t.TempDir(), "t.trace")
	f, err := os.Create(path)
	require.NoError(t, err)
	require.NoError(t, trace.Write(f, tr))
	require.NoError(t, f.Close())
	return path
}

// A workload is a pure function of its state: stopping after k steps and
// continuing from the saved state (what a migration does) gives exactly the
// sequence of running straight through, and every page is in range.
func TestWorkloadsResumeExactlyAndStayInRange(t *testing.T) {
	tracePath := writeTrace(t, 3000, 5, 6, 7, 100, 2999)
	for _, name := range WorkloadNames {
		t.Run(name, func(t *testing.T) {
			spec := WorkloadSpec{Name: name, Pages: 3000, WSPages: 1000, Seed: 3, TraceFile: tracePath}
			wl, err := NewWorkload(spec)
			require.NoError(t, err)
			type op struct {
				pfn   uint64
				line  uint32
				write bool
			}
			straight := InitState(0, 3)
			var want []op
			for i := 0; i < 5000; i++ {
				p, l, w := wl.Next(&straight)
				require.Less(t, p, uint64(3000))
				require.Less(t, l, uint32(LinesPerPage))
				want = append(want, op{p, l, w})
			}
			st := InitState(0, 3)
			for i := 0; i < 1234; i++ {
				wl.Next(&st)
			}
			// "Migrate": a new workload built from the same spec, state carried.
			wl2, err := NewWorkload(spec)
			require.NoError(t, err)
			for i := 1234; i < 5000; i++ {
				p, l, w := wl2.Next(&st)
				require.Equal(t, want[i], op{p, l, w}, "op %d", i)
			}
		})
	}
}

func TestTraceWorkloadRefusesPagesBeyondTheDomain(t *testing.T) {
	path := writeTrace(t, 10000, 1, 9000)
	_, err := NewWorkload(WorkloadSpec{Name: "trace", Pages: 4096, TraceFile: path})
	require.ErrorContains(t, err, "use a larger --mem")
	_, err = NewWorkload(WorkloadSpec{Name: "trace", Pages: 4096})
	require.ErrorContains(t, err, "--trace FILE")
	_, err = NewWorkload(WorkloadSpec{Name: "nope", Pages: 4096})
	require.ErrorContains(t, err, "unknown workload")
}

func TestScanTouchesEveryWorkingSetPageInOrder(t *testing.T) {
	wl, err := NewWorkload(WorkloadSpec{Name: "scan", Pages: 1000, WSPages: 100})
	require.NoError(t, err)
	st := InitState(0, 1)
	prev := uint64(0)
	for i := 0; i < 100*LinesPerPage; i++ {
		p, _, _ := wl.Next(&st)
		if i > 0 && i%LinesPerPage == 0 {
			require.Equal(t, prev+1, p)
		}
		prev = p
	}
	require.Equal(t, uint64(450+99), prev, "working set sits in the middle of memory")
}
