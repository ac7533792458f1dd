package record

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

// tableLog is an in-memory DirtyLog: its i-th read returns rounds[i] (as
// given: unordered, with repeats), later reads nothing; the read numbered
// failAt (1-based) fails with errInjected, and every read is counted.
type tableLog struct {
	mu     sync.Mutex
	rounds [][]uint64
	reads  int
	failAt int
	// slowAt (1-based) is a read that takes slow, like a CLEAN of a huge
	// bitmap on a busy host.
	slowAt int
	slow   time.Duration
	// onRead, if set, is called with the read's number after each
	// successful read.
	onRead func(n int)
}

var errInjected = errors.New("injected dirty-log failure")

func (l *tableLog) DirtyPages(dst []uint64) ([]uint64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.reads++
	if l.reads == l.failAt {
		return dst[:0], errInjected
	}
	if l.reads == l.slowAt {
		time.Sleep(l.slow)
	}
	dst = dst[:0]
	if i := l.reads - 1; i < len(l.rounds) {
		dst = append(dst, l.rounds[i]...)
	}
	if l.onRead != nil {
		l.onRead(l.reads)
	}
	return dst, nil
}

func (l *tableLog) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.reads
}

type rp struct {
	round uint32
	pfn   uint64
}

func roundsAndPFNs(acc []trace.Access) []rp {
	var out []rp
	for _, a := range acc {
		out = append(out, rp{a.Round, a.PFN})
	}
	return out
}

func TestRecorderRounds(t *testing.T) {
	log := &tableLog{rounds: [][]uint64{
		{150, 3, 64, 3}, // unordered, a page twice (a scan in two passes)
		{},              // an idle round keeps its index
		{199, 0, 64},    // 64 again: recorded again, not new
		{5},
	}}
	interval := 5 * time.Millisecond
	rec := New(log, interval)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	log.onRead = func(n int) {
		if n == 4 {
			cancel()
		}
	}
	require.ErrorIs(t, rec.Run(ctx, time.Hour), context.Canceled)
	acc := rec.Accesses()

	// Rounds in read order; within a round each page once, ascending.
	assert.Equal(t, []rp{{0, 3}, {0, 64}, {0, 150}, {2, 0}, {2, 64}, {2, 199}, {3, 5}}, roundsAndPFNs(acc))
	assert.EqualValues(t, 4, rec.Rounds())
	assert.Equal(t, 4, log.count(), "one read per round, none once interrupted")
	assert.Equal(t, []int{3, 0, 2, 1}, rec.fresh, "pages recorded for the first time, per round")
	assert.Equal(t, 6, rec.Distinct())

	// Each access is stamped with its round's start: round 0 starts at
	// the start of recording, round r one read (>= interval) after round
	// r-1; times never go back.
	for i, a := range acc {
		assert.True(t, a.Write)
		assert.Equal(t, a.T, a.T.Truncate(time.Microsecond), "the trace format's resolution")
		if i > 0 {
			assert.GreaterOrEqual(t, a.T, acc[i-1].T, "T monotonic")
			if a.Round == acc[i-1].Round {
				assert.Equal(t, acc[i-1].T, a.T, "one time per round")
			}
		}
	}
	assert.Zero(t, acc[0].T, "round 0 starts at 0")
	assert.GreaterOrEqual(t, acc[3].T, 2*interval, "round 2 starts after two rounds")
	assert.GreaterOrEqual(t, acc[6].T, 3*interval, "round 3 starts after three rounds")
	assert.Less(t, acc[6].T, time.Since(rec.Start()))

	// What is recorded, trace.Read accepts unchanged.
	var buf bytes.Buffer
	require.NoError(t, trace.Write(&buf, &trace.Trace{Pages: 200, PageSize: 4096, Interval: interval, Accesses: acc}))
	back, err := trace.Read(&buf)
	require.NoError(t, err)
	assert.Equal(t, acc, back.Accesses)
}

func TestRecorderErrorEndsRecording(t *testing.T) {
	log := &tableLog{rounds: [][]uint64{{1}, {2}}, failAt: 3}
	rec := New(log, time.Millisecond)
	err := rec.Run(context.Background(), time.Hour)
	require.ErrorIs(t, err, errInjected)
	assert.ErrorContains(t, err, "record trajectory: round 2: ")
	assert.Equal(t, 3, log.count(), "no read after the failed one")
	assert.Equal(t, []rp{{0, 1}, {1, 2}}, roundsAndPFNs(rec.Accesses()), "the rounds before the failure are kept")
	assert.EqualValues(t, 2, rec.Rounds())
	assert.ErrorIs(t, rec.Err(), errInjected)
	pages, err := rec.DirtyPages(nil)
	assert.ErrorIs(t, err, errInjected, "a consumer of the pages learns of the failure")
	assert.Equal(t, []uint64{1, 2}, pages)
}

func TestRecorderInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Interrupted during round 1's read.
	log := &tableLog{rounds: [][]uint64{{1}, {2}, {3}}, onRead: func(n int) {
		if n == 2 {
			cancel()
		}
	}}
	rec := New(log, time.Millisecond)
	err := rec.Run(ctx, time.Hour)
	require.ErrorIs(t, err, context.Canceled)
	assert.Equal(t, 2, log.count(), "no read after the interruption")
	assert.EqualValues(t, 2, rec.Rounds())
	// The caller closes the cut-short round.
	pages, err := rec.Sample()
	require.NoError(t, err)
	assert.Equal(t, []uint64{3}, pages)
	assert.Equal(t, []rp{{0, 1}, {1, 2}, {2, 3}}, roundsAndPFNs(rec.Accesses()))
}

// Run ends once duration has passed since the start of recording, after
// the round that crossed it.
func TestRecorderDuration(t *testing.T) {
	interval := 2 * time.Millisecond
	log := &tableLog{}
	rec := New(log, interval)
	require.NoError(t, rec.Run(context.Background(), 5*interval))
	elapsed := time.Since(rec.Start())
	assert.GreaterOrEqual(t, elapsed, 5*interval)
	assert.GreaterOrEqual(t, rec.Rounds(), uint32(1))
	assert.LessOrEqual(t, rec.Rounds(), uint32(5), "rounds are at least one interval long")
	assert.EqualValues(t, log.count(), rec.Rounds())
}

// Pages the recording took from the dirty log are handed on once each.
func TestRecorderDirtyPagesHandsOnRecordedPages(t *testing.T) {
	log := &tableLog{rounds: [][]uint64{{9, 4}, {4, 7}, {1}}}
	rec := New(log, time.Millisecond)
	_, err := rec.Sample()
	require.NoError(t, err)
	_, err = rec.Sample()
	require.NoError(t, err)
	pages, err := rec.DirtyPages(nil)
	require.NoError(t, err)
	assert.Equal(t, []uint64{4, 7, 9}, pages)
	pages, err = rec.DirtyPages(pages)
	require.NoError(t, err)
	assert.Empty(t, pages, "each page once")
	late, err := rec.Sample()
	require.NoError(t, err)
	assert.Equal(t, []uint64{1}, late)
	pages, err = rec.DirtyPages(pages)
	require.NoError(t, err)
	assert.Equal(t, []uint64{1}, pages)
}

func TestRecorderLateRounds(t *testing.T) {
	interval := 5 * time.Millisecond
	log := &tableLog{slowAt: 2, slow: 4 * interval}
	rec := New(log, interval)
	require.NoError(t, rec.Run(context.Background(), 3*interval))
	assert.GreaterOrEqual(t, rec.Late(), 1, "the slow read's round ended late")
}

func TestRecorderRejectsBadInterval(t *testing.T) {
	err := New(&tableLog{}, 0).Run(context.Background(), time.Second)
	assert.ErrorContains(t, err, "interval 0s is not positive")
}

// Run, Sample and DirtyPages from different goroutines, as the engine
// uses them (run with -race).
func TestRecorderConcurrentUse(t *testing.T) {
	var rounds [][]uint64
	for i := range 200 {
		rounds = append(rounds, []uint64{uint64(i % 50), uint64(i%50 + 50)})
	}
	log := &tableLog{rounds: rounds}
	rec := New(log, 200*time.Microsecond)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- rec.Run(ctx, 0) }()
	seen := map[uint64]bool{}
	var pages []uint64
	for range 20 {
		_, err := rec.Sample()
		require.NoError(t, err)
		pages, err = rec.DirtyPages(pages)
		require.NoError(t, err)
		for _, p := range pages {
			seen[p] = true
		}
		_ = rec.Converged()
		time.Sleep(200 * time.Microsecond)
	}
	cancel()
	require.ErrorIs(t, <-done, context.Canceled)
	pages, err := rec.DirtyPages(pages)
	require.NoError(t, err)
	for _, p := range pages {
		seen[p] = true
	}
	assert.Len(t, seen, rec.Distinct(), "every recorded page handed on")
	acc := rec.Accesses()
	for i := 1; i < len(acc); i++ {
		require.True(t, acc[i].Round > acc[i-1].Round || acc[i].Round == acc[i-1].Round && acc[i].PFN > acc[i-1].PFN, "access %d out of order", i)
		require.GreaterOrEqual(t, acc[i].T, acc[i-1].T)
	}
}

func TestRecorderConverges(t *testing.T) {
	// 20 rounds: the first writes 1000 pages, the rest write them again.
	var rounds [][]uint64
	var all []uint64
	for p := range uint64(1000) {
		all = append(all, p)
	}
	for range 20 {
		rounds = append(rounds, all)
	}
	rec := New(&tableLog{rounds: rounds}, time.Millisecond)
	for range convergeMinRounds - 1 {
		_, err := rec.Sample()
		require.NoError(t, err)
		assert.False(t, rec.Converged(), "too few rounds")
	}
	_, err := rec.Sample()
	require.NoError(t, err)
	assert.True(t, rec.Converged())
}

func TestConverged(t *testing.T) {
	cases := []struct {
		name  string
		fresh []int
		want  bool
	}{
		{"too few rounds", []int{1000, 10, 0, 0, 0, 0, 0, 0, 0}, false},
		{"quiet for five rounds", []int{1000, 500, 200, 50, 20, 2, 2, 2, 2, 2}, true},
		// 5 rounds found 50 of 1820 pages: 2.7 %, still learning.
		{"still finding pages", []int{1000, 500, 200, 50, 20, 10, 10, 10, 10, 10}, false},
		{"a stream finds new pages every round", []int{500, 500, 500, 500, 500, 500, 500, 500, 500, 500, 500}, false},
		{"nothing written at all", make([]int, 12), false},
		// A burst of new pages in the last rounds (a new job) restarts it.
		{"a new job", []int{1000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 300}, false},
	}
	for _, c := range cases {
		assert.Equal(t, c.want, Converged(c.fresh), c.name)
	}
}
