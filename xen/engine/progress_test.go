package engine

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// The live figures and the timeline say what happened: pages remaining
// fall to what the guest's faults and the push have not moved yet,
// downtime is unknown (0) before the switchover and the figure of the
// stats after it, and the timeline's last point is the stats' totals.
func TestProgressAndTimeline(t *testing.T) {
	src := newMemSource(8192, 0)
	dst := newMemDest([]uint64{10, 4000, 8000})
	var mu sync.Mutex
	var seen []Progress
	opt := Options{Mode: wire.ModePostcopy, BatchPages: 8, WindowBytes: 32 << 10, ProgressEvery: time.Millisecond,
		Progress: func(p Progress) { mu.Lock(); seen = append(seen, p); mu.Unlock() }}
	st, err, _, derr := runPair(t, context.Background(), src, func(*wire.DomainHeader) (Dest, error) { return dst, nil }, DestOptions{}, opt)
	require.NoError(t, err)
	require.NoError(t, derr)
	mu.Lock()
	defer mu.Unlock()
	require.NotEmpty(t, seen)
	var sawPostcopy bool
	for _, p := range seen {
		require.LessOrEqual(t, p.Remaining, p.Pages)
		switch p.Phase {
		case "setup", "precopy":
			require.Zero(t, p.Downtime, "downtime before the pause")
			require.Equal(t, uint64(8192), p.Remaining+p.PagesSent, "before the pause nothing is sent twice")
		case "postcopy":
			sawPostcopy = true
			require.Equal(t, st.DowntimeMs, ms(p.Downtime), "progress and stats give the same downtime")
		}
	}
	require.True(t, sawPostcopy, "a progress report during post-copy")
	require.NotEmpty(t, st.Timeline)
	last := st.Timeline[len(st.Timeline)-1]
	require.Equal(t, st.TotalBytes, last.Bytes, "the timeline ends at the total")
	require.Equal(t, "done", last.Phase)
	for i := 1; i < len(st.Timeline); i++ {
		require.GreaterOrEqual(t, st.Timeline[i].AtMs, st.Timeline[i-1].AtMs)
		require.GreaterOrEqual(t, st.Timeline[i].Bytes, st.Timeline[i-1].Bytes)
	}
}

func TestThinTimelineKeepsTheNewest(t *testing.T) {
	var tl []Sample
	for i := range 8 { // sample thins at MaxTimeline, an even count
		tl = append(tl, Sample{AtMs: float64(i)})
	}
	got := thinTimeline(tl)
	require.Len(t, got, 4)
	require.Equal(t, []float64{1, 3, 5, 7}, []float64{got[0].AtMs, got[1].AtMs, got[2].AtMs, got[3].AtMs})
}
