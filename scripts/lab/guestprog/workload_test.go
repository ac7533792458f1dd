package main

import (
	"bufio"
	"bytes"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestDirtyDetectsCorruption(t *testing.T) {
	w := newWorkload(8)
	require.Equal(t, 0, w.verify(), "fresh buffer must verify")
	// Zero page 3 the way a page lost in migration would look.
	clear(w.page(3))
	require.Equal(t, 1, w.verify())
	for p := range 3 {
		require.True(t, w.dirty(), "page %d intact", p)
	}
	require.False(t, w.dirty(), "page 3 was zeroed")
	// dirty rewrote page 3, so the buffer is whole again.
	require.Equal(t, 0, w.verify())
}

func TestDigestTracksContent(t *testing.T) {
	a, b := newWorkload(4), newWorkload(4)
	require.Equal(t, a.digest, b.digest)
	a.dirty()
	require.NotEqual(t, a.digest, b.digest, "a rewrite changes the checksum")
	// Four more rewrites wrap around to page 0 again; b catches up with the same five.
	for range 4 {
		a.dirty()
	}
	for range 5 {
		b.dirty()
	}
	require.Equal(t, a.digest, b.digest)
	// A stale page (old generation content) is caught, not only zeroed ones.
	copy(a.page(1), b.page(2))
	require.Equal(t, 1, a.verify())
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestRunPrintsGrowingProgress(t *testing.T) {
	w := newWorkload(64)
	var out syncBuf
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		run(w, 2000, 2, 50*time.Millisecond, &out, stop)
		close(done)
	}()
	time.Sleep(400 * time.Millisecond)
	close(stop)
	<-done

	var seqs, dirtied []int
	sc := bufio.NewScanner(strings.NewReader(out.String()))
	verified := false
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		require.Equal(t, "progress", f[0], sc.Text())
		seq, err := strconv.Atoi(f[1])
		require.NoError(t, err)
		seqs = append(seqs, seq)
		d, err := strconv.Atoi(strings.TrimPrefix(f[3], "dirtied="))
		require.NoError(t, err)
		dirtied = append(dirtied, d)
		require.Equal(t, "errors=0", f[4])
		if strings.Contains(sc.Text(), "verified=64 bad=0") {
			verified = true
		}
	}
	require.GreaterOrEqual(t, len(seqs), 3, "output: %s", out.String())
	for i := 1; i < len(seqs); i++ {
		require.Equal(t, seqs[i-1]+1, seqs[i])
		require.Greater(t, dirtied[i], dirtied[i-1])
	}
	require.True(t, verified, "every second line carries a full verification")
}
