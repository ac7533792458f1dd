package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
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
	// outage, if set, takes the link down for this long at each point
	// instead of resetting it: nothing passes either way and no new
	// connection can be made, and no FIN or RST tells either side — what
	// a pulled cable or a lost route does. A side that gives up on the
	// link closes its connections; the peer hears of it once the link is
	// back.
	outage time.Duration
	up     chan struct{} // closed when the link is back (nil: up)
	downAt time.Time
	// detected is how long after the link went down the source closed
	// the link (it noticed the silence); 0: not while it was down.
	detected atomic.Int64
}

// fault injects the configured fault at a point: a reset, or an outage.
func (r *resetter) fault() {
	if r.outage <= 0 {
		r.reset()
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.up != nil {
		return
	}
	up := make(chan struct{})
	r.up, r.downAt = up, time.Now()
	r.resets.Add(1)
	time.AfterFunc(r.outage, func() {
		r.mu.Lock()
		r.up = nil
		r.mu.Unlock()
		close(up)
	})
}

// down returns the channel closed when the link is back, or nil if it is
// up.
func (r *resetter) down() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.up
}

// passable waits until the link is up; an error if the connection was
// closed meanwhile.
func (r *resetter) passable(closed <-chan struct{}) error {
	up := r.down()
	if up == nil {
		return nil
	}
	select {
	case <-up:
		return nil
	case <-closed:
		return net.ErrClosed
	}
}

// closing is called when the source closes a connection of its link: while
// the link is down the close is noted as the source's detection of the
// outage and carried out (FIN or RST leaving) only once the link is back.
func (r *resetter) closing(c net.Conn) {
	r.mu.Lock()
	up, at := r.up, r.downAt
	r.mu.Unlock()
	if up == nil {
		c.Close()
		return
	}
	r.detected.CompareAndSwap(0, int64(time.Since(at)))
	// A local close ends local reads and writes at once and sends
	// nothing; the FIN or RST waits for the link.
	_ = c.SetDeadline(time.Unix(1, 0))
	go func() {
		<-up
		c.Close()
	}()
}

// linkConn is the source's end of one connection, as the lab's faults see
// it.
type linkConn struct {
	net.Conn
	r      *resetter
	once   sync.Once
	closed chan struct{}
}

func newLinkConn(c net.Conn, r *resetter) linkConn {
	return linkConn{Conn: c, r: r, closed: make(chan struct{})}
}

func (c *linkConn) Close() error {
	c.once.Do(func() {
		close(c.closed)
		c.r.closing(c.Conn)
	})
	return nil
}

// write passes b once the link is up.
func (c *linkConn) write(b []byte) (int, error) {
	if err := c.r.passable(c.closed); err != nil {
		return 0, err
	}
	return c.Conn.Write(b)
}

// read passes what arrives once the link is up: what the peer sent during
// an outage is held until the link is back, as if still on the wire.
func (c *linkConn) read(b []byte) (int, error) {
	if err := c.r.passable(c.closed); err != nil {
		return 0, err
	}
	n, err := c.Conn.Read(b)
	if perr := c.r.passable(c.closed); perr != nil {
		return 0, perr
	}
	return n, err
}

// dial makes one link: bulk and urgent connections, the bulk one counted.
func (r *resetter) dial() (io.ReadWriteCloser, io.ReadWriteCloser, error) {
	if r.down() != nil {
		return nil, nil, errors.New("connect: network is unreachable (the lab's link is down)")
	}
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
	return &countConn{linkConn: newLinkConn(bulk, r), out: newRecTap(), in: &recTap{}},
		&tapConn{linkConn: newLinkConn(urgent, r), out: newRecTap()}, nil
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
	r.fault()
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
	r.fault()
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
	linkConn
	out, in *recTap
}

func (c *countConn) Write(b []byte) (int, error) {
	n, err := c.write(b)
	c.out.feed(b[:n], func(t wire.Type) { c.r.record(false, true, t) })
	c.r.wrote(n)
	return n, err
}

func (c *countConn) Read(b []byte) (int, error) {
	n, err := c.read(b)
	before := c.r.resets.Load()
	c.in.feed(b[:n], func(t wire.Type) { c.r.record(false, false, t) })
	if c.r.resets.Load() != before {
		// A fault at a record the source reads: the record is caught in
		// it. A reset loses it (else the engine would act on a record
		// the reset was meant to stop, and which way a run went would
		// be a race); an outage holds it until the link is back.
		if c.r.outage <= 0 {
			return 0, &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}
		}
		if perr := c.r.passable(c.closed); perr != nil {
			return 0, perr
		}
	}
	return n, err
}

// tapConn follows the records the source writes on an urgent connection.
type tapConn struct {
	linkConn
	out *recTap
}

func (c *tapConn) Read(b []byte) (int, error) { return c.read(b) }

func (c *tapConn) Write(b []byte) (int, error) {
	n, err := c.write(b)
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
