package engine

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// DefaultProgressTimeout is how long either side waits without a record
// from its peer before it gives up on it. Each side sends a KEEPALIVE
// record a few times per period whatever else it is doing (creating the
// domain, suspending the guest), so only a dead link, a stopped peer or a
// link too slow to carry one record in that time trips it.
const DefaultProgressTimeout = 60 * time.Second

// liveness sends keepalives on a stream and watches that records come
// back from the peer.
type liveness struct {
	last atomic.Int64 // unix nanoseconds of the latest record from the peer
	// idle > 0 while this side is not reading the peer's stream (busy
	// with local work: creating the domain, reading its memory back):
	// records wait in the socket then, and silence means nothing.
	idle    atomic.Int32
	timeout time.Duration
	stop    chan struct{}
	once    sync.Once
}

// startLiveness sends a KEEPALIVE every timeout/4 through send and calls
// dead once nothing was heard (heard) for timeout.
func startLiveness(timeout time.Duration, send func() error, dead func(error)) *liveness {
	l := &liveness{timeout: timeout, stop: make(chan struct{})}
	l.heard()
	go func() {
		t := time.NewTicker(timeout / 4)
		defer t.Stop()
		for {
			select {
			case <-l.stop:
				return
			case <-t.C:
			}
			// After a death it goes on watching: with recovery a new
			// link replaces the dead one (heard starts it afresh), and
			// without, the migration ends and closes it.
			if err := send(); err != nil {
				dead(fmt.Errorf("send keepalive: %w", err))
				l.heard()
				continue
			}
			if l.idle.Load() > 0 {
				l.heard()
				continue
			}
			if since := time.Since(time.Unix(0, l.last.Load())); since > timeout {
				dead(fmt.Errorf("no record from the peer for %v (limit %v): the link is down, or the peer is stopped or too slow", since.Round(time.Second), timeout))
				l.heard()
			}
		}
	}()
	return l
}

func (l *liveness) heard() { l.last.Store(time.Now().UnixNano()) }

// busy marks local work during which the peer's stream is not read;
// the returned function ends it.
func (l *liveness) busy() func() {
	l.idle.Add(1)
	return func() { l.heard(); l.idle.Add(-1) }
}

func (l *liveness) close() { l.once.Do(func() { close(l.stop) }) }

func writeKeepalive(w *wire.Writer) error {
	if err := w.WriteRecord(wire.TypeKeepalive); err != nil {
		return err
	}
	return w.Flush()
}
