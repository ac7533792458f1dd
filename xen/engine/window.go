package engine

import "sync"

// window is the bulk stream's flow control: bytes written but not yet
// reported consumed by the destination (its CREDIT records) stay within
// size, so that a fault reply on the urgent stream never waits behind
// more than a window of push. It knows nothing of connections: the source
// feeds it credits and closes it on failure.
type window struct {
	mu       sync.Mutex
	cond     sync.Cond // signalled when consumed changes or on close
	size     uint64
	queued   uint64 // bulk bytes written
	consumed uint64 // bulk bytes the destination reported consumed
	err      error  // set by close: acquire fails with it
}

func newWindow(size uint64) *window {
	w := &window{size: size}
	w.cond.L = &w.mu
	return w
}

// acquire waits until n more bytes fit (one record always fits in an empty
// window, however large), then counts them as written; it fails once the
// window is closed.
func (w *window) acquire(n uint64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.err == nil && w.queued > w.consumed && w.queued-w.consumed+n > w.size {
		w.cond.Wait()
	}
	if w.err != nil {
		return w.err
	}
	w.queued += n
	return nil
}

// adjust corrects the bytes counted by acquire to the record's exact size
// (extra may be negative in two's complement: it is added modulo 2^64).
func (w *window) adjust(extra uint64) {
	w.mu.Lock()
	w.queued += extra
	w.mu.Unlock()
}

// credit records that the destination has consumed this many bytes in all.
func (w *window) credit(consumed uint64) {
	w.mu.Lock()
	w.consumed = consumed
	w.mu.Unlock()
	w.cond.Broadcast()
}

// inFlight is the bytes written and not yet consumed.
func (w *window) inFlight() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.queued < w.consumed {
		return 0
	}
	return w.queued - w.consumed
}

// close fails every acquire, now and later, with err (the first one kept).
func (w *window) close(err error) {
	w.mu.Lock()
	if w.err == nil {
		w.err = err
	}
	w.mu.Unlock()
	w.cond.Broadcast()
}
