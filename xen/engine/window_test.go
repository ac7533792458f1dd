package engine

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// acquired reports whether acquire(n) returns within a short wait, and
// its error.
func acquired(w *window, n uint64) (bool, error) {
	done := make(chan error, 1)
	go func() { done <- w.acquire(n) }()
	select {
	case err := <-done:
		return true, err
	case <-time.After(50 * time.Millisecond):
		return false, nil
	}
}

func TestWindowBlocksUntilCredit(t *testing.T) {
	w := newWindow(100)
	require.NoError(t, w.acquire(60))
	ok, _ := acquired(w, 30)
	require.True(t, ok, "90 of 100 bytes must fit")
	require.Equal(t, uint64(90), w.inFlight())

	done := make(chan error, 1)
	go func() { done <- w.acquire(20) }() // 110 > 100: waits
	select {
	case <-done:
		t.Fatal("acquire went past the window")
	case <-time.After(50 * time.Millisecond):
	}
	w.credit(60) // 30 in flight: 20 more fit
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("credit did not release the waiting acquire")
	}
	require.Equal(t, uint64(50), w.inFlight())
}

func TestWindowFitsOneLargeRecordWhenEmpty(t *testing.T) {
	w := newWindow(10)
	ok, err := acquired(w, 1000)
	require.True(t, ok, "an empty window must take any one record")
	require.NoError(t, err)
	ok, _ = acquired(w, 1)
	require.False(t, ok, "a full window took more")
}

func TestWindowCloseReleasesWaiters(t *testing.T) {
	w := newWindow(10)
	require.NoError(t, w.acquire(10))
	done := make(chan error, 1)
	go func() { done <- w.acquire(5) }()
	cause := errors.New("link down")
	w.close(cause)
	select {
	case err := <-done:
		require.ErrorIs(t, err, cause)
	case <-time.After(5 * time.Second):
		t.Fatal("close left an acquire waiting")
	}
	require.ErrorIs(t, w.acquire(0), cause, "a closed window must refuse")
	w.close(errors.New("later"))
	require.ErrorIs(t, w.acquire(0), cause, "the first cause stays")
}

func TestWindowAdjustCountsExactSize(t *testing.T) {
	w := newWindow(100)
	require.NoError(t, w.acquire(50))
	w.adjust(uint64(10))
	require.Equal(t, uint64(60), w.inFlight())
	var minus3 int64 = -3
	w.adjust(uint64(minus3))
	require.Equal(t, uint64(57), w.inFlight())
}
