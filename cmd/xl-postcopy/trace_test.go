//go:build cgo

package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

func TestTraceOutsideDom0(t *testing.T) {
	if _, err := os.Stat(xenctrl.PrivcmdPath); err == nil {
		t.Skip("precondition absent: " + xenctrl.PrivcmdPath + " exists, this is a Xen dom0")
	}
	var code int
	out := captureStderr(t, func() { code = runMain([]string{"trace", "1"}) })
	assert.Equal(t, 1, code, "stderr: %s", out)
	assert.Contains(t, out, "xl-postcopy trace: not running in a Xen dom0 (/dev/xen/privcmd missing)")

	// A name is not resolved before the dom0 check: the same clear error.
	out = captureStderr(t, func() { code = runMain([]string{"trace", "--interval", "10ms", "--duration", "1s", "guest1"}) })
	assert.Equal(t, 1, code)
	assert.Contains(t, out, "not running in a Xen dom0")
}

func TestTraceUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{"trace"},
		{"trace", "1", "2"},
		{"trace", "--interval", "0s", "1"},
		{"trace", "--interval", "1s", "--duration", "10ms", "1"},
		{"trace", "99999"},
	} {
		var code int
		out := captureStderr(t, func() { code = runMain(args) })
		assert.Equal(t, 2, code, "%v: %s", args, out)
		assert.Contains(t, out, "--help", "%v", args)
	}
}

func TestParseDomainArg(t *testing.T) {
	d, ok, err := parseDomainArg("12")
	require.NoError(t, err)
	assert.True(t, ok)
	assert.EqualValues(t, 12, d)
	_, ok, err = parseDomainArg("guest-pvh")
	require.NoError(t, err)
	assert.False(t, ok)
	_, _, err = parseDomainArg("32752")
	assert.Error(t, err, "DOMID_FIRST_RESERVED and up are not domains")
	_, _, err = parseDomainArg("1x")
	assert.Error(t, err)
}

// tableSource is a test double for dirtySource: round i's Clean returns
// rounds[i] (the first Clean, which discards pre-existing dirt, returns
// dirty pfns that must not appear in the trace).
type tableSource struct {
	mu       sync.Mutex
	pages    uint64
	rounds   [][]uint64
	cleans   int
	enabled  bool
	disables int
	failAt   int // Clean number that fails (0: never)
	cancel   context.CancelFunc
	cancelAt int
}

func (s *tableSource) Enable() error { s.enabled = true; return nil }
func (s *tableSource) Disable() error {
	s.disables++
	s.enabled = false
	return nil
}
func (s *tableSource) Pages() uint64 { return s.pages }
func (s *tableSource) Clean(dst []uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.enabled {
		return errors.New("clean while disabled")
	}
	s.cleans++
	if s.cleans == s.failAt {
		return errors.New("injected CLEAN failure")
	}
	clear(dst)
	var pfns []uint64
	if s.cleans == 1 {
		pfns = []uint64{7, 8, 9} // dirt from before recording
	} else if r := s.cleans - 2; r < len(s.rounds) {
		pfns = s.rounds[r]
	}
	for _, p := range pfns {
		dst[p/64] |= 1 << (p % 64)
	}
	if s.cancel != nil && s.cleans == s.cancelAt {
		s.cancel()
	}
	return nil
}

func TestRecordTraceRounds(t *testing.T) {
	src := &tableSource{pages: 200, rounds: [][]uint64{
		{150, 3, 64}, // unordered in the table, ascending in the trace
		{},           // an idle round keeps its index
		{199, 0},     // the edges of the pfn range
	}}
	interval := 5 * time.Millisecond
	tr, sum, err := recordTrace(context.Background(), src, interval, 3*interval)
	require.NoError(t, err)
	assert.Equal(t, 1, src.disables)
	assert.False(t, src.enabled)
	assert.EqualValues(t, 200, tr.Pages)
	assert.Equal(t, interval, tr.Interval)

	var got [][2]uint64
	for _, a := range tr.Accesses {
		got = append(got, [2]uint64{uint64(a.Round), a.PFN})
		assert.True(t, a.Write)
	}
	assert.Equal(t, [][2]uint64{{0, 3}, {0, 64}, {0, 150}, {2, 0}, {2, 199}}, got)
	assert.Zero(t, tr.Accesses[0].T, "round 0 starts at 0")
	assert.GreaterOrEqual(t, tr.Accesses[3].T, 2*interval, "round 2 starts after two intervals")
	assert.GreaterOrEqual(t, sum.Rounds, 3)
	assert.Equal(t, 5, sum.Accesses)
	assert.Equal(t, 5, sum.Distinct)
	assert.EqualValues(t, 0, sum.MinPFN)
	assert.EqualValues(t, 199, sum.MaxPFN)

	// What we record, trace.Read accepts (times and rounds never go back).
	var buf bytes.Buffer
	require.NoError(t, trace.Write(&buf, tr))
	back, err := trace.Read(&buf)
	require.NoError(t, err)
	assert.Equal(t, tr.Accesses, back.Accesses)
}

func TestRecordTraceDisablesOnError(t *testing.T) {
	src := &tableSource{pages: 64, rounds: [][]uint64{{1}}, failAt: 3}
	_, _, err := recordTrace(context.Background(), src, time.Millisecond, time.Second)
	require.ErrorContains(t, err, "injected CLEAN failure")
	assert.Contains(t, err.Error(), "round 1")
	assert.Equal(t, 1, src.disables, "log-dirty must be turned off after a failure")
}

func TestRecordTraceInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Cancel during round 1's CLEAN; round 2 is cut short but its pages
	// are still collected by the closing CLEAN.
	src := &tableSource{pages: 64, rounds: [][]uint64{{1}, {2}, {3}, {4}}, cancel: cancel, cancelAt: 3}
	tr, sum, err := recordTrace(ctx, src, 2*time.Millisecond, time.Hour)
	require.NoError(t, err)
	assert.True(t, sum.Interrupted)
	assert.Equal(t, 3, sum.Rounds)
	assert.Equal(t, 1, src.disables)
	var pfns []uint64
	for _, a := range tr.Accesses {
		pfns = append(pfns, a.PFN)
	}
	assert.Equal(t, []uint64{1, 2, 3}, pfns)
}

func TestWriteOutputFile(t *testing.T) {
	path := t.TempDir() + "/t.trace"
	require.NoError(t, writeOutput(path, []byte("hello\n")))
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "hello\n", string(b))
	_, err = os.Stat(path + ".tmp")
	assert.True(t, os.IsNotExist(err))
	err = writeOutput(t.TempDir()+"/missing-dir/x", []byte("x"))
	assert.Error(t, err)
}

func TestSummaryString(t *testing.T) {
	s := traceSummary{Rounds: 3, Accesses: 5, Distinct: 4, MinPFN: 0x10, MaxPFN: 0x20, Elapsed: 150 * time.Millisecond}
	assert.True(t, strings.Contains(s.String(), "5 accesses, 4 distinct pfns, pfn range 0x10..0x20"), s.String())
	assert.Contains(t, traceSummary{Rounds: 2}.String(), "no page was written")
}
