package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestRelayCountsBytes(t *testing.T) {
	in := bytes.Repeat([]byte("stream"), 500_000) // 3 MB: several buffer fills
	var out bytes.Buffer
	count := filepath.Join(t.TempDir(), "bytes")
	require.NoError(t, relay(bytes.NewReader(in), &out, count))
	require.Equal(t, in, out.Bytes())
	got, err := os.ReadFile(count)
	require.NoError(t, err)
	require.Equal(t, "3000000\n", string(got))
}

type failWriter struct{ left int }

func (f *failWriter) Write(p []byte) (int, error) {
	if len(p) > f.left {
		n := f.left
		f.left = 0
		return n, errors.New("receiver went away")
	}
	f.left -= len(p)
	return len(p), nil
}

func TestRelayCountsUpToWriteError(t *testing.T) {
	count := filepath.Join(t.TempDir(), "bytes")
	err := relay(strings.NewReader(strings.Repeat("x", 100)), &failWriter{left: 40}, count)
	require.ErrorContains(t, err, "receiver went away")
	got, rerr := os.ReadFile(count)
	require.NoError(t, rerr)
	require.Equal(t, "40\n", string(got))
}
