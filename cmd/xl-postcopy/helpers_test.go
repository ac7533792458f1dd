package main

import (
	"bytes"
	"io"
	"os"
	"testing"

	"github.com/stretchr/testify/require"
)

// captureStderr runs f with os.Stderr redirected and returns what it wrote.
func captureStderr(t *testing.T, f func()) string { return capture(t, &os.Stderr, f) }

// captureStdout runs f with os.Stdout redirected and returns what it wrote.
func captureStdout(t *testing.T, f func()) string { return capture(t, &os.Stdout, f) }

// capture runs f with *file redirected to a pipe and returns what it wrote.
func capture(t *testing.T, file **os.File, f func()) string {
	t.Helper()
	r, w, err := os.Pipe()
	require.NoError(t, err)
	old := *file
	*file = w
	var buf bytes.Buffer
	done := make(chan struct{})
	go func() { io.Copy(&buf, r); close(done) }()
	defer func() {
		*file = old
		w.Close()
		<-done
		r.Close()
	}()
	f()
	w.Close()
	<-done
	*file = old
	return buf.String()
}
