package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/link"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// resetter resets the source's link to the destination at chosen points
// after GO — a TCP reset of both connections, what `ss -K` does to a
// migration's sockets — and makes the new links a recovery asks for.
type resetter struct {
	l    *link.Link
	addr string
	// at are the bulk bytes written after GO at which the link is reset,
	// ascending; one reset each.
	at     []uint64
	armed  atomic.Bool
	sent   atomic.Uint64 // bulk bytes written since GO
	mu     sync.Mutex
	cur    []net.Conn // the current link's connections
	resets atomic.Int32
	// points are the protocol points still to reset the link at (one
	// reset each, the first time the point is passed).
	points map[FaultPoint]bool
}

// dial makes one link: bulk and urgent connections, the bulk one counted.
func (r *resetter) dial() (io.ReadWriteCloser, io.ReadWriteCloser, error) {
	bulk, err := r.l.DialSrc(r.addr)
	if err != nil {
		return nil, nil, err
	}
	urgent, err := r.l.DialSrc(r.addr)
	if err != nil {
		bulk.Close()
		return nil, nil, err
	}
	if err := link.SetUrgent(urgent); err != nil {
		bulk.Close()
		urgent.Close()
		return nil, nil, err
	}
	r.mu.Lock()
	r.cur = []net.Conn{bulk, urgent}
	r.mu.Unlock()
	// The destination's direction has no stream header.
	return &countConn{Conn: bulk, r: r, out: newRecTap(), in: &recTap{}},
		&tapConn{Conn: urgent, r: r, out: newRecTap()}, nil
}

func (r *resetter) reconnect(ctx context.Context) (io.ReadWriteCloser, io.ReadWriteCloser, error) {
	return r.dial()
}

// goSent arms the resets (engine.Options.OnGo).
func (r *resetter) goSent() { r.armed.Store(true) }

// wrote counts bulk bytes and resets the link when a point is passed.
func (r *resetter) wrote(n int) {
	if !r.armed.Load() {
		return
	}
	sent := r.sent.Add(uint64(n))
	r.mu.Lock()
	if len(r.at) == 0 || sent < r.at[0] {
		r.mu.Unlock()
		return
	}
	r.at = r.at[1:]
	r.mu.Unlock()
	r.reset()
}

// record is called for each record the source writes (out) or reads (in) on
// a stream; it resets the link at a point still pending.
func (r *resetter) record(urgent, out bool, t wire.Type) {
	p, ok := pointOf(urgent, out, t, r.armed.Load())
	if !ok {
		return
	}
	r.mu.Lock()
	if !r.points[p] {
		r.mu.Unlock()
		return
	}
	delete(r.points, p)
	r.mu.Unlock()
	r.reset()
}

// reset resets the current link: both connections, with a TCP RST.
func (r *resetter) reset() {
	r.mu.Lock()
	cur := r.cur
	r.cur = nil
	r.mu.Unlock()
	if cur == nil {
		return
	}
	for _, c := range cur {
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // close sends RST, as a reset link does
		}
		c.Close()
	}
	r.resets.Add(1)
}

// countConn counts what the engine writes on a bulk connection and
// follows the records both ways.
type countConn struct {
	net.Conn
	r       *resetter
	out, in *recTap
}

func (c *countConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.out.feed(b[:n], func(t wire.Type) { c.r.record(false, true, t) })
	c.r.wrote(n)
	return n, err
}

func (c *countConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.in.feed(b[:n], func(t wire.Type) { c.r.record(false, false, t) })
	return n, err
}

// tapConn follows the records the source writes on an urgent connection.
type tapConn struct {
	net.Conn
	r   *resetter
	out *recTap
}

func (c *tapConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.out.feed(b[:n], func(t wire.Type) { c.r.record(true, true, t) })
	return n, err
}

// reattacher accepts the connections of the source's new links on the
// destination's listener.
func reattacher(ln net.Listener) func(ctx context.Context) (io.ReadWriteCloser, io.ReadWriteCloser, error) {
	return func(ctx context.Context) (io.ReadWriteCloser, io.ReadWriteCloser, error) {
		dl, ok := ln.(interface{ SetDeadline(time.Time) error })
		if !ok {
			return nil, nil, fmt.Errorf("listener %T cannot time out", ln)
		}
		if d, ok := ctx.Deadline(); ok {
			_ = dl.SetDeadline(d)
		}
		defer dl.SetDeadline(time.Time{})
		c1, c2, err := accept2(ln)
		if err != nil {
			if ctx.Err() != nil {
				return nil, nil, errors.Join(ctx.Err(), err)
			}
			return nil, nil, err
		}
		return c1, c2, nil
	}
}
