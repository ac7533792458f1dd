package engine

import (
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// The engine's recorder, as finishRecording and the pre-copy rounds use it:
// sampling in the background, a last sample, finish, a late round; every
// page it took from the dirty log handed on through DirtyPages. (The
// convergence rule is tested with record.Converged.)
func TestRecorderLifecycle(t *testing.T) {
	src := newMemSource(256, 0)
	require.NoError(t, src.StartDirtyLog())
	src.run(1)
	defer src.Destroy()

	rec := startRecorder(src, 2*time.Millisecond)
	assert.WithinDuration(t, time.Now(), rec.start, time.Second)
	time.Sleep(30 * time.Millisecond)
	handed := map[uint64]bool{}
	more, err := rec.DirtyPages(nil)
	require.NoError(t, err)
	for _, p := range more {
		handed[p] = true
	}
	require.NoError(t, rec.sample())
	traj, err := rec.finish()
	require.NoError(t, err)
	require.NotEmpty(t, traj)
	rounds := rec.round
	assert.GreaterOrEqual(t, rounds, uint32(2), "background rounds and the last sample")
	assert.Less(t, traj[len(traj)-1].Round, rounds)
	for i := 1; i < len(traj); i++ {
		require.False(t, traj[i].Round < traj[i-1].Round || traj[i].T < traj[i-1].T, "trajectory goes back at %d", i)
	}
	again, err := rec.finish()
	require.NoError(t, err, "finish is idempotent")
	assert.Equal(t, traj, again)

	time.Sleep(5 * time.Millisecond)
	late, err := rec.sampleRound()
	require.NoError(t, err)
	assert.Equal(t, rounds+1, rec.round, "the late round counts")
	assert.True(t, slices.IsSorted(late))
	more, err = rec.DirtyPages(more)
	require.NoError(t, err)
	for _, p := range more {
		handed[p] = true
	}
	recorded := map[uint64]bool{}
	for _, a := range traj {
		recorded[a.PFN] = true
	}
	for _, p := range late {
		recorded[p] = true
	}
	assert.Equal(t, recorded, handed, "DirtyPages hands on every recorded page")
}

// The pre-record policies end to end over the in-memory domain: hybrid
// mode's pre-copy round reads its dirty pages from the recorder, and the
// destination ends with the source's memory.
func TestRecordPoliciesMigrate(t *testing.T) {
	for _, mode := range []wire.Mode{wire.ModeHybrid, wire.ModePostcopy} {
		t.Run(mode.String(), func(t *testing.T) {
			src := newMemSource(2000, 0)
			src.run(int64(mode))
			dst := newMemDest([]uint64{1, 2, 3, 1999})
			st, _ := migrate(t, mode, "record+lr+dbscan", src, dst)
			require.True(t, st.Verified)
			assert.NotZero(t, st.RecordRounds)
			assert.NotZero(t, st.TrajectoryLen)
			assert.NotZero(t, st.RecordedPages)
			checkSame(t, src, dst)
		})
	}
}
