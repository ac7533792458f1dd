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

// DefaultLinkTimeout is the longest silence after GO, with recovery on,
// before either side takes the link as broken and pauses the migration to
// reconnect. It is shorter than the progress timeout because after GO the
// guest runs at the destination and waits there for pages: a link that
// went silent (cable pulled, a router's state lost, the peer stopped)
// must be noticed in seconds, not after TCP's retransmissions give up
// (some 15 minutes). A wrong guess costs one recovery, not the domain.
const DefaultLinkTimeout = 10 * time.Second

// liveness sends keepalives on a stream and watches that records come
// back from the peer.
type liveness struct {
	last atomic.Int64 // unix nanoseconds of the latest record from the peer
	// idle > 0 while this side is not reading the peer's stream (busy
	// with local work: creating the domain, reading its memory back):
	// records wait in the socket then, and silence means nothing.
	idle atomic.Int32
	// limit is the silence, in nanoseconds, after which the peer is
	// taken as gone: the progress timeout, then the link timeout once GO
	// passed with recovery on.
	limit atomic.Int64
	// sending is set while a keepalive is being written: on a dead link
	// the write blocks once the socket's buffer is full, and the watch
	// must go on meanwhile (it used to wait in that write, so a silent
	// link was never noticed by the side that was sending).
	sending atomic.Bool
	stop    chan struct{}
	once    sync.Once
}

// startLiveness calls dead once nothing was heard (heard) for timeout,
// and sends a KEEPALIVE through send every period (at most timeout/4).
func startLiveness(timeout, period time.Duration, send func() error, dead func(error)) *liveness {
	l := &liveness{stop: make(chan struct{})}
	l.limit.Store(int64(timeout))
	if period <= 0 || period > timeout/4 {
		period = timeout / 4
	}
	l.heard()
	go func() {
		t := time.NewTicker(period)
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
			if l.sending.CompareAndSwap(false, true) {
				go func() {
					defer l.sending.Store(false)
					if err := send(); err != nil {
						dead(fmt.Errorf("send keepalive: %w", err))
						l.heard()
					}
				}()
			}
			if l.idle.Load() > 0 {
				l.heard()
				continue
			}
			limit := time.Duration(l.limit.Load())
			if since := time.Since(time.Unix(0, l.last.Load())); since > limit {
				dead(fmt.Errorf("no record from the peer for %v (limit %v): the link is down, or the peer is stopped or too slow", since.Round(100*time.Millisecond), limit))
				l.heard()
			}
		}
	}()
	return l
}

func (l *liveness) heard() { l.last.Store(time.Now().UnixNano()) }

// setLimit changes the silence that counts as a dead peer (at GO: the link
// timeout); the silence so far starts afresh.
func (l *liveness) setLimit(d time.Duration) {
	l.heard()
	l.limit.Store(int64(d))
}

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
