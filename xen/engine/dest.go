package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/engine/protocol"
	"github.com/xl-postcopy/xl-postcopy/xen/prepage"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// DestOptions configure the destination side.
type DestOptions struct {
	// Logf, if set, receives debug lines (placements tried again).
	Logf func(format string, args ...any)
	// ProgressTimeout is the longest silence of the source on the bulk
	// stream before the destination gives up on it (default
	// DefaultProgressTimeout).
	ProgressTimeout time.Duration
	// OnResume, if set, is called right after the domain resumes.
	OnResume func()
	// Progress, if set, receives the destination's live counters.
	Progress func(DestProgress)
	// Reattach, if set, turns recovery on: a link that breaks after
	// SWITCHOVER pauses this side (postcopy-paused; the domain stays as
	// it is) and Reattach is called for the source's next pair of
	// connections, until RecoverTimeout (default DefaultRecoverTimeout
	// plus a minute, so that the source gives up first) has passed.
	Reattach       func(ctx context.Context) (c1, c2 io.ReadWriteCloser, err error)
	RecoverTimeout time.Duration
	// LinkTimeout, with recovery on, replaces ProgressTimeout once GO has
	// come: the silence of the source after which the link is taken as
	// broken and this side pauses for a new one (default
	// DefaultLinkTimeout).
	LinkTimeout time.Duration
}

// destLink is one pair of connections to the source; a recovery replaces
// it.
type destLink struct {
	bulk, urg io.ReadWriteCloser
	down      chan struct{} // closed when the link failed
	closed    bool          // guarded by dest.linkMu
	// readers counts the link's urgent readers: a recovery waits for them
	// to end, so that no page read from the old link is placed after the
	// new one has been told what is held.
	readers sync.WaitGroup
}

// DestProgress is the destination's live view.
type DestProgress struct {
	Present       uint64
	Pages         uint64
	NetworkFaults uint64
}

type dest struct {
	opt     DestOptions
	factory Factory
	allOnce sync.Once
	hdr     *wire.DomainHeader
	dom     Dest
	// recover: link failures after SWITCHOVER pause instead of ending.
	recover bool
	linkMu  sync.Mutex
	link    *destLink
	byeOnce sync.Once
	bye     chan struct{} // closed when BYE came

	bwMu sync.Mutex
	bw   *wire.Writer // replies on the bulk connection
	uwMu sync.Mutex
	uw   *wire.Writer // fault requests

	mu        sync.Mutex
	present   *prepage.Bitmap // placed, being placed, or absent
	absent    *prepage.Bitmap // no memory there: nothing to place or verify
	nPresent  uint64
	requested *prepage.Bitmap // a fault request went to the source
	faulted   *prepage.Bitmap // distinct pfns the guest faulted on
	faultAt   map[uint64]time.Time
	lat       []time.Duration
	crc       []uint32
	resumed   bool
	allIn     chan struct{} // closed when every page is present after resume
	stats     DestStats
	zeroCRC   uint32
	received  atomic.Uint64
	credited  uint64
	retries   uint64 // placements tried again after the backend failed them
	// placing counts the pages counted present whose Place has not
	// returned yet (in flight, or waiting to be placed again): while it is
	// not 0 the migration is not complete, even with nPresent at its end.
	// (nPresent counts a page when a record claims it, before the backend
	// holds it; without this, another stream's last page could end the
	// migration while a batch was still being placed, and the read-back
	// found those pages missing.)
	placing    int
	stopCancel func()
	alive      *liveness
	failOnce   sync.Once
	failErr    error
	failC      chan struct{}
	faultWait  time.Duration // sum of the demand faults\' waits
	resumedAt  time.Time
	timeline   []uint32 // network faults per TimelineBucket since resume
}

// Bounds on what a stream may claim, checked before anything is sized
// by it.
const (
	MaxPages = 1 << 28 // 1 TiB of 4 KiB pages
	MaxVCPUs = 4096
)

// TimelineBucket is the width of one DestStats.FaultTimeline bucket.
const TimelineBucket = 10 * time.Millisecond

// RunDest receives one migration on two accepted connections (in either
// order: each stream's header says which it is), creating the domain with
// factory. It returns when the domain holds every page and the source
// has been acknowledged, or on failure; on failure before resume the new
// domain is destroyed, after resume it is left as it is (paused on its
// faults) and the error says so.
func RunDest(ctx context.Context, c1, c2 io.ReadWriteCloser, factory Factory, opt DestOptions) (*DestStats, error) {
	bulk, urg, err := sortConns(c1, c2)
	if err != nil {
		c1.Close()
		c2.Close()
		return nil, err
	}
	d := &dest{opt: opt, factory: factory, link: &destLink{bulk: bulk, urg: urg, down: make(chan struct{})},
		bw: wire.NewWriter(bulk), uw: wire.NewWriter(urg), failC: make(chan struct{}), allIn: make(chan struct{}),
		recover: opt.Reattach != nil, bye: make(chan struct{})}
	if d.opt.RecoverTimeout <= 0 {
		d.opt.RecoverTimeout = DefaultRecoverTimeout + time.Minute
	}
	defer func() {
		l := d.curLink()
		l.bulk.Close()
		l.urg.Close()
	}()
	// The caller's context stops the migration until the domain resumes
	// here; from then on this is the only copy that runs.
	stop := context.AfterFunc(ctx, func() { d.fail(ctx.Err()) })
	d.stopCancel = func() { stop() }
	defer stop()
	if opt.ProgressTimeout <= 0 {
		opt.ProgressTimeout = DefaultProgressTimeout
	}
	if opt.LinkTimeout <= 0 {
		opt.LinkTimeout = DefaultLinkTimeout
	}
	if opt.LinkTimeout > opt.ProgressTimeout {
		opt.LinkTimeout = opt.ProgressTimeout
	}
	d.opt.LinkTimeout = opt.LinkTimeout
	period := opt.ProgressTimeout / 4
	if d.recover {
		period = opt.LinkTimeout / 4
	}
	d.alive = startLiveness(opt.ProgressTimeout, period, func() error {
		return d.writeBulk(writeKeepalive)
	}, func(err error) { d.failLink(d.curLink(), fmt.Errorf("source: %w", err)) })
	defer d.alive.close()
	st, err := d.run()
	if err != nil {
		d.fail(err)
	}
	return st, err
}

func sortConns(c1, c2 io.ReadWriteCloser) (bulk, urg io.ReadWriteCloser, err error) {
	ch1, err := wire.ReadHeader(c1)
	if err != nil {
		return nil, nil, fmt.Errorf("first connection: %w", err)
	}
	ch2, err := wire.ReadHeader(c2)
	if err != nil {
		return nil, nil, fmt.Errorf("second connection: %w", err)
	}
	switch {
	case ch1 == wire.ChannelBulk && ch2 == wire.ChannelUrgent:
		return c1, c2, nil
	case ch2 == wire.ChannelBulk && ch1 == wire.ChannelUrgent:
		return c2, c1, nil
	}
	return nil, nil, fmt.Errorf("connections are %v and %v, want one bulk and one urgent: %w", ch1, ch2, wire.ErrBadChannel)
}

func (d *dest) fail(err error) { d.failWith(wire.TypeError, err) }

// failWith ends the migration here and tells the source why in a record
// of type t (TypeError, or TypeNotResumed when the domain never ran).
func (d *dest) failWith(t wire.Type, err error) {
	d.failOnce.Do(func() {
		if err == nil {
			err = errors.New("migration stopped")
		}
		d.failErr = err
		close(d.failC)
		// Tell the source why, if the bulk writer is free (it never
		// blocks for long: the destination only writes small records).
		if d.bwMu.TryLock() {
			if d.bw.WriteBlob(t, []byte(err.Error())) == nil {
				_ = d.bw.Flush()
			}
			d.bwMu.Unlock()
		}
		l := d.curLink()
		l.bulk.Close()
		l.urg.Close()
		d.mu.Lock()
		dom := d.dom
		d.mu.Unlock()
		if dom != nil {
			dom.Close()
		}
	})
}

// curLink is the current link.
func (d *dest) curLink() *destLink {
	d.linkMu.Lock()
	defer d.linkMu.Unlock()
	return d.link
}

// failLink ends link l (if it is still the current one): without
// recovery that ends the migration here; with it, the driver sees its
// reads fail and the machine decides (postcopy-paused after SWITCHOVER).
func (d *dest) failLink(l *destLink, err error) {
	if !d.recover {
		d.fail(err)
		return
	}
	d.linkMu.Lock()
	if l != d.link || l.closed {
		d.linkMu.Unlock()
		return
	}
	l.closed = true
	close(l.down)
	d.linkMu.Unlock()
	if d.opt.Logf != nil {
		d.opt.Logf("link to the source broken: %v", err)
	}
	l.bulk.Close()
	l.urg.Close()
}

// rootCause prefers the first failure (say, a bad checksum on the urgent
// stream) over what it caused here (a read on the bulk stream it closed).
func (d *dest) rootCause(err error) error {
	select {
	case <-d.failC:
	default:
		return err
	}
	if f := d.failErr; f != nil && !errors.Is(err, f) {
		return fmt.Errorf("%w (then: %v)", f, err)
	}
	return err
}

func (d *dest) writeBulk(f func(w *wire.Writer) error) error {
	d.bwMu.Lock()
	defer d.bwMu.Unlock()
	if err := f(d.bw); err != nil {
		return err
	}
	return d.bw.Flush()
}

// destRun is the driver's state between the destination machine's actions.
type destRun struct {
	r        *wire.Reader
	rec      wire.Record
	before   uint64 // bytes read before rec
	done     wire.Checksums
	final    bool
	core     []byte
	table    []uint32
	pb       wire.PageBatch
	pfns     []uint64
	back     []uint32        // the destination's memory read back (nil: no ReadBacker)
	written  *prepage.Bitmap // pages the guest wrote before the read-back
	verifyMs float64
	dropped  uint64
	st       *DestStats
	ack      wire.Ack
}

// recordOf names a bulk record for the machine; DONE is decoded here, to
// know whether it is the last.
func (d *dest) recordOf(x *destRun) (protocol.Record, error) {
	switch x.rec.Type {
	case wire.TypeDomainHeader:
		return protocol.RecDomainHeader, nil
	case wire.TypePageBatch:
		return protocol.RecPageBatch, nil
	case wire.TypePageSet:
		return protocol.RecPageSet, nil
	case wire.TypeDiscard:
		return protocol.RecDiscard, nil
	case wire.TypeCoreState:
		return protocol.RecCoreState, nil
	case wire.TypeSwitchover:
		return protocol.RecSwitchover, nil
	case wire.TypeGo:
		return protocol.RecGo, nil
	case wire.TypeKeepalive:
		return protocol.RecKeepalive, nil
	case wire.TypeBye:
		return protocol.RecBye, nil
	case wire.TypeDone:
		c, final, err := wire.DecodeDone(x.rec.Body)
		if err != nil {
			return 0, err
		}
		x.done, x.final = c, final
		if final {
			return protocol.RecDoneFinal, nil
		}
		return protocol.RecDone, nil
	case wire.TypeError:
		msg, _ := wire.DecodeBlob(x.rec.Body)
		return 0, fmt.Errorf("source: %s", msg)
	}
	return 0, fmt.Errorf("unexpected %v record", x.rec.Type)
}

// run drives the destination's machine (protocol.Dest): it reads the bulk
// stream, lets the machine judge each record, and carries out what it
// says, until it reports how this side ended.
func (d *dest) run() (*DestStats, error) {
	x := &destRun{r: wire.NewReader(d.curLink().bulk)}
	m := protocol.NewDest()
	if d.recover {
		m.EnableRecovery()
	}
	var acts []protocol.DestAction
	for {
		if len(acts) == 0 {
			if m.Ended() {
				break
			}
			if d.recover && m.State() == protocol.DstAcking {
				// drainKeepalives reads the bulk stream now; it reports BYE.
				acts = m.Step(d.awaitBye())
				continue
			}
			x.before = x.r.BytesRead()
			rec, err := x.r.Next()
			if err != nil {
				if m.State() == protocol.DstHeader {
					err = fmt.Errorf("read domain header: %w", err)
				} else {
					err = fmt.Errorf("bulk connection: %w", err)
				}
				acts = m.Step(d.failure(protocol.DevConnClosed, err))
				continue
			}
			x.rec = rec
			if d.hdr != nil {
				d.alive.heard()
			}
			r, err := d.recordOf(x)
			if err != nil {
				kind := protocol.DevProtocol
				if rec.Type == wire.TypeError {
					kind = protocol.DevPeerError
				}
				acts = m.Step(d.failure(kind, err))
				continue
			}
			if r == protocol.RecGo && d.recover {
				// From GO on the guest may run here and wait for pages:
				// a silent link must be noticed in seconds.
				d.alive.setLimit(d.opt.LinkTimeout)
			}
			acts = m.Step(protocol.DestEvent{Kind: protocol.DevRecord, Record: r})
			continue
		}
		a := acts[0]
		acts = acts[1:]
		if ev, ok := d.do(x, m, a); ok {
			acts = append(acts, m.Step(ev)...)
		}
		if a == protocol.DactDestroy {
			var derr error
			if d.dom != nil {
				derr = d.dom.Destroy()
			}
			acts = append(acts, m.Destroyed(derr)...)
		}
	}
	return d.outcome(x, m.Outcome())
}

// failure is the machine's input for a failure here, with the first
// recorded failure as its cause.
func (d *dest) failure(kind protocol.DestEventKind, err error) protocol.DestEvent {
	return protocol.DestEvent{Kind: kind, Err: d.rootCause(err)}
}

// do carries out one action; ok is false when it has no result to feed.
func (d *dest) do(x *destRun, m *protocol.Dest, a protocol.DestAction) (protocol.DestEvent, bool) {
	fail := func(kind protocol.DestEventKind, err error) (protocol.DestEvent, bool) {
		return d.failure(kind, err), true
	}
	switch a {
	case protocol.DactCreate:
		// A bad header and a factory that failed are both the create
		// action's failure: nothing is left here.
		if err := d.create(x.rec.Body); err != nil {
			return fail(protocol.DevBackendError, err)
		}
		return protocol.DestEvent{Kind: protocol.DevCreated}, true
	case protocol.DactSendCreated:
		if err := d.writeBulk(func(w *wire.Writer) error { return w.WriteRecord(wire.TypeCreated) }); err != nil {
			return fail(protocol.DevConnClosed, fmt.Errorf("domain %q created but the source is gone: %w", d.hdr.Name, err))
		}
		return protocol.DestEvent{}, false
	case protocol.DactAccept:
		if kind, err := d.accept(x); err != nil {
			return fail(kind, err)
		}
		return protocol.DestEvent{}, false
	case protocol.DactSendReady:
		if err := d.writeBulk(func(w *wire.Writer) error { return w.WriteRecord(wire.TypeReady) }); err != nil {
			return fail(protocol.DevConnClosed, err)
		}
		return protocol.DestEvent{}, false
	case protocol.DactDetachCancel:
		// resume detaches the caller's context itself, atomically with
		// its check that the caller has not cancelled already.
		return protocol.DestEvent{}, false
	case protocol.DactResume:
		// Local work during which the bulk stream is not read: it must
		// not count as the source's silence (the link timeout is short).
		done := d.alive.busy()
		err := d.resume(x.core)
		done()
		if err != nil {
			// The domain never ran here: the source may resume it, and
			// must be told so (NOT_RESUMED) to do it.
			return fail(protocol.DevBackendError, fmt.Errorf("resume the domain (it never ran here): %w", err))
		}
		return protocol.DestEvent{Kind: protocol.DevResumed}, true
	case protocol.DactSendResumed:
		if err := d.writeBulk(func(w *wire.Writer) error { return w.WriteRecord(wire.TypeResumed) }); err != nil {
			return fail(protocol.DevConnClosed, err)
		}
		return protocol.DestEvent{}, false
	case protocol.DactAwaitAllIn:
		if err := d.awaitAllIn(x); err != nil {
			return fail(protocol.DevConnClosed, err)
		}
		return protocol.DestEvent{Kind: protocol.DevAllIn}, true
	case protocol.DactAck:
		if err := d.sendAck(x); err != nil {
			return fail(protocol.DevConnClosed, fmt.Errorf("send ACK: %w", err))
		}
		return protocol.DestEvent{Kind: protocol.DevAcked}, true
	case protocol.DactSendError:
		d.fail(m.Outcome().Err)
		return protocol.DestEvent{}, false
	case protocol.DactSendNotResumed:
		d.failWith(wire.TypeNotResumed, m.Outcome().Err)
		return protocol.DestEvent{}, false
	case protocol.DactAwaitReattach:
		return d.awaitReattach(x, m), true
	case protocol.DactRestart:
		if err := d.restart(x); err != nil {
			return fail(protocol.DevConnClosed, err)
		}
		return protocol.DestEvent{}, false
	case protocol.DactDestroy, protocol.DactReport:
		return protocol.DestEvent{}, false // (DactDestroy: in run, which feeds Destroyed)
	}
	panic(fmt.Sprintf("engine: destination action %v has no driver", a))
}

// outcome is what RunDest returns for the machine's verdict.
func (d *dest) outcome(x *destRun, o protocol.DestOutcome) (*DestStats, error) {
	if o.OK {
		if x.ack.Mismatched != 0 {
			return x.st, &DestError{Domain: d.name(), Where: protocol.RunsHere, Complete: true,
				Err: fmt.Errorf("%d pages differ from the source's checksums (first pfn %#x)", x.ack.Mismatched, x.ack.FirstMismatch)}
		}
		return x.st, nil
	}
	e := &DestError{Domain: d.name(), Where: o.Where, Err: o.Err, NeverRan: o.At == protocol.DstResuming}
	if o.Where == protocol.RunsHere {
		d.mu.Lock()
		e.Missing = d.hdr.NumPages - d.nPresent
		d.mu.Unlock()
		e.Complete = o.At == protocol.DstAcking
		if e.Complete {
			return x.st, e
		}
	}
	return nil, e
}

func (d *dest) name() string {
	if d.hdr == nil {
		return ""
	}
	return d.hdr.Name
}

// create decodes and checks the DOMAIN_HEADER and creates the domain.
func (d *dest) create(body []byte) error {
	hdr, err := wire.DecodeDomainHeader(body)
	if err != nil {
		return err
	}
	n := hdr.NumPages
	if n > MaxPages {
		return fmt.Errorf("stream claims %d pages, more than this receiver hosts (%d: 1 TiB of 4 KiB pages)", n, uint64(MaxPages))
	}
	if hdr.VCPUs > MaxVCPUs {
		return fmt.Errorf("stream claims %d vCPUs, more than %d", hdr.VCPUs, MaxVCPUs)
	}
	d.hdr = hdr
	d.alive.heard()
	d.present = prepage.NewBitmap(n)
	d.absent = prepage.NewBitmap(n)
	for _, r := range d.hdr.Absent { // the decoder checked the ranges
		for p := r.First; p < r.First+r.Count; p++ {
			d.absent.Set(p)
			d.present.Set(p)
		}
		d.nPresent += r.Count
	}
	d.requested = prepage.NewBitmap(n)
	d.faulted = prepage.NewBitmap(n)
	d.faultAt = map[uint64]time.Time{}
	d.crc = make([]uint32, n)
	d.zeroCRC = crc32.Checksum(make([]byte, d.hdr.PageSize), castagnoli)
	// Creating the domain takes minutes under emulation; the source's
	// keepalives wait in the socket meanwhile.
	done := d.alive.busy()
	dom, err := d.factory(d.hdr)
	done()
	if err != nil {
		// Nothing to close: a factory that fails removes what it made
		// (and may return a typed nil, which must not be called).
		return fmt.Errorf("create domain %q: %w", d.hdr.Name, err)
	}
	d.mu.Lock()
	d.dom = dom
	d.mu.Unlock()
	return nil
}

// accept handles a record the machine has judged in order.
func (d *dest) accept(x *destRun) (protocol.DestEventKind, error) {
	rec := x.rec
	switch rec.Type {
	case wire.TypePageBatch:
		if err := wire.DecodePageBatch(rec.Body, &x.pb); err != nil {
			return protocol.DevProtocol, err
		}
		if err := d.place(&x.pb); err != nil {
			return protocol.DevBackendError, err
		}
		// Credit the source's window with what was consumed.
		d.credited += x.r.BytesRead() - x.before
		credited := d.credited
		if err := d.writeBulk(func(w *wire.Writer) error { return w.WriteU64(wire.TypeCredit, credited) }); err != nil {
			return protocol.DevConnClosed, err
		}
	case wire.TypePageSet:
		ps, err := wire.DecodePageSet(rec.Body)
		if err != nil {
			return protocol.DevProtocol, err
		}
		if err := d.changePageSet(ps); err != nil {
			return protocol.DevBackendError, err
		}
	case wire.TypeDiscard:
		var err error
		if x.pfns, err = wire.DecodePFNs(rec.Body, x.pfns); err != nil {
			return protocol.DevProtocol, err
		}
		if err := d.discard(x.pfns); err != nil {
			return protocol.DevBackendError, err
		}
	case wire.TypeCoreState:
		b, err := wire.DecodeBlob(rec.Body)
		if err != nil {
			return protocol.DevProtocol, err
		}
		x.core = append([]byte(nil), b...)
	case wire.TypeSwitchover:
		if _, err := wire.DecodeSwitchover(rec.Body); err != nil {
			return protocol.DevProtocol, err
		}
		if d.hdr.Mode == wire.ModePrecopy {
			d.mu.Lock()
			missing := d.hdr.NumPages - d.nPresent
			d.mu.Unlock()
			if missing != 0 {
				return protocol.DevProtocol, fmt.Errorf("pre-copy switchover with %d pages never sent", missing)
			}
		}
	case wire.TypeDone:
		n := d.hdr.NumPages
		c := x.done
		if c.FirstPFN != uint64(len(x.table)) || uint64(len(x.table)+len(c.CRCs)) > n {
			return protocol.DevProtocol, fmt.Errorf("checksums for pfn %#x out of order", c.FirstPFN)
		}
		x.table = append(x.table, c.CRCs...)
		if x.final && uint64(len(x.table)) != n {
			return protocol.DevProtocol, fmt.Errorf("source sent %d checksums for %d pages", len(x.table), n)
		}
	}
	return 0, nil
}

// awaitAllIn waits, once every checksum is in, until the fault replies
// still in flight have landed, then reads the destination's memory back.
func (d *dest) awaitAllIn(x *destRun) error {
	n := d.hdr.NumPages
	// The bulk stream carries only the source's keepalives from here: go
	// on reading them, so that a source gone now is noticed.
	l := d.curLink()
	go d.drainKeepalives(x.r, l)
	select {
	case <-d.allIn:
	case <-d.failC:
		return d.failErr
	case <-l.down:
		return errors.New("the link broke while the last pages were awaited")
	}
	// Pages the guest gave back are not its memory: not read, not verified.
	var dropped []uint64
	if dr, ok := d.dom.(Dropper); ok {
		dropped = dr.Dropped()
	}
	d.mu.Lock()
	for _, p := range dropped {
		if p < n && !d.absent.Test(p) {
			d.absent.Set(p)
			x.dropped++
		}
	}
	d.mu.Unlock()
	// Read the destination's memory back while the source waits for the
	// ACK: that, not what arrived, is what `verified` is about.
	verifyStart := time.Now()
	if rb, ok := d.dom.(ReadBacker); ok {
		var err error
		x.back, x.written, err = d.readBack(rb)
		if err != nil {
			return fmt.Errorf("read the destination's memory back: %w", err)
		}
	}
	x.verifyMs = ms(time.Since(verifyStart))
	d.dom.Close()
	d.curLink().urg.Close() // tells the source's fault server that we are complete
	return nil
}

// sendAck compares the checksums with what the destination holds and
// sends STATS and ACK.
func (d *dest) sendAck(x *destRun) error {
	d.mu.Lock()
	st := d.stats
	st.GuestDropped = x.dropped
	// Pages the guest gave back were received too (the source sent them).
	ack := wire.Ack{PagesReceived: d.nPresent - d.absent.Count() + x.dropped}
	st.VerifiedFrom = "stream"
	if x.back != nil {
		st.VerifiedFrom = "memory"
		st.VerifyMs = x.verifyMs
	}
	for pfn, want := range x.table {
		if d.absent.Test(uint64(pfn)) {
			continue
		}
		got := d.crc[pfn] // what arrived
		if x.back != nil {
			if x.written.Test(uint64(pfn)) {
				st.GuestWritten++ // the guest's content now: what arrived is checked
			} else {
				got = x.back[pfn]
				st.VerifiedPages++
			}
		}
		if got != want {
			if ack.Mismatched == 0 {
				ack.FirstMismatch = uint64(pfn)
			}
			ack.Mismatched++
		}
	}
	st.NetworkFaults = d.requested.Count()
	st.DistinctFaulted = d.faulted.Count()
	st.FaultLatencyP50Us = percentile(d.lat, 0.50)
	st.FaultLatencyP99Us = percentile(d.lat, 0.99)
	st.FaultWaitMs = ms(d.faultWait)
	st.PagesReceived = d.received.Load()
	st.PlaceRetries = d.retries
	st.FaultTimeline = d.timeline
	st.MismatchedPages = ack.Mismatched
	d.mu.Unlock()
	if rep, ok := d.dom.(Reporter); ok {
		g := rep.GuestReport()
		st.Guest = &g
	}
	if bt, ok := d.dom.(Blocktimer); ok {
		all, per := bt.Blocktime()
		a := ms(all)
		st.BlocktimeMs = &a
		for _, p := range per {
			st.VCPUBlocktimeMs = append(st.VCPUBlocktimeMs, ms(p))
		}
	}
	x.st, x.ack = &st, ack
	blob, err := json.Marshal(&st)
	if err != nil {
		return err
	}
	return d.writeBulk(func(w *wire.Writer) error {
		if err := w.WriteBlob(wire.TypeStats, blob); err != nil {
			return err
		}
		return w.WriteAck(ack)
	})
}

// place installs a batch. A page the destination already holds is only
// re-placed before resume (a pre-copy round re-sending a re-dirtied page);
// after resume it is a duplicate transmission, counted and dropped.
func (d *dest) place(b *wire.PageBatch) error {
	if b.PageSize != d.hdr.PageSize {
		return fmt.Errorf("page batch of %d-byte pages in a domain of %d-byte pages", b.PageSize, d.hdr.PageSize)
	}
	ps := int(b.PageSize)
	pages := make([]Page, 0, len(b.Entries))
	crcs := make([]uint32, 0, len(b.Entries))
	off := 0
	for _, e := range b.Entries {
		pfn := e & wire.PFNMask
		var data []byte
		c := d.zeroCRC
		if e&wire.ZeroFlag == 0 {
			data = b.Data[off : off+ps]
			off += ps
			c = crc32.Checksum(data, castagnoli)
		}
		if pfn >= d.hdr.NumPages {
			return fmt.Errorf("page batch: pfn %#x beyond the domain's %d pages", pfn, d.hdr.NumPages)
		}
		pages = append(pages, Page{PFN: pfn, Data: data})
		crcs = append(crcs, c)
	}
	d.received.Add(uint64(len(pages)))
	d.mu.Lock()
	keep := pages[:0]
	keepCRC := crcs[:0]
	for i, p := range pages {
		if d.absent.Test(p.PFN) {
			d.mu.Unlock()
			return fmt.Errorf("page batch: pfn %#x is not part of the domain (absent)", p.PFN)
		}
		if d.present.Test(p.PFN) && (d.resumed || b.Phase == wire.PhasePush || b.Phase == wire.PhaseFault) {
			d.stats.RedundantPages++
			continue
		}
		if d.present.Set(p.PFN) {
			d.nPresent++
		}
		keep = append(keep, p)
		keepCRC = append(keepCRC, crcs[i])
	}
	d.placing += len(keep)
	resumed := d.resumed
	d.mu.Unlock()
	if len(keep) == 0 {
		return nil
	}
	if err := d.dom.Place(keep); err != nil {
		err = fmt.Errorf("place %d pages from pfn %#x: %w", len(keep), keep[0].PFN, err)
		if !resumed {
			d.mu.Lock()
			d.placing -= len(keep)
			d.mu.Unlock()
			return err
		}
		// After the resume this is the only copy that runs: nothing
		// about one batch may end it. The pages are kept and placed
		// again until the backend takes them (still counted in placing).
		go d.retryPlace(copyPages(keep), slices.Clone(keepCRC), err)
		return nil
	}
	d.placed(keep, keepCRC)
	return nil
}

// copyPages copies pages whose data aliases a record buffer.
// The copies share one buffer, in order, as pages of one record do
// (a backend may place adjacent pages with one copy).
func copyPages(pages []Page) []Page {
	n := 0
	for _, p := range pages {
		n += len(p.Data)
	}
	buf := make([]byte, 0, n)
	out := make([]Page, len(pages))
	for i, p := range pages {
		out[i].PFN = p.PFN
		if p.Data != nil {
			start := len(buf)
			buf = append(buf, p.Data...)
			out[i].Data = buf[start:len(buf):len(buf)]
		}
	}
	return out
}

// retryPlace places pages again, with backoff, until the backend takes
// them or the migration ends.
func (d *dest) retryPlace(pages []Page, crcs []uint32, first error) {
	wait := 50 * time.Millisecond
	err := first
	for {
		if d.opt.Logf != nil {
			d.opt.Logf("%v: trying again in %v", err, wait)
		}
		select {
		case <-d.failC:
			return
		case <-time.After(wait):
		}
		d.mu.Lock()
		d.retries++
		d.mu.Unlock()
		if err = d.dom.Place(pages); err == nil {
			d.placed(pages, crcs)
			return
		}
		wait = min(2*wait, 2*time.Second)
	}
}

// placed records pages the backend holds now and wakes completion.
func (d *dest) placed(keep []Page, keepCRC []uint32) {
	now := time.Now()
	d.mu.Lock()
	for i, p := range keep {
		d.crc[p.PFN] = keepCRC[i]
		if t, ok := d.faultAt[p.PFN]; ok {
			l := now.Sub(t)
			d.lat = append(d.lat, l)
			d.faultWait += l
			delete(d.faultAt, p.PFN)
		}
	}
	d.placing -= len(keep)
	complete := d.resumed && d.nPresent == d.hdr.NumPages && d.placing == 0
	d.mu.Unlock()
	if complete {
		d.closeAllIn()
	}
}

// drainKeepalives reads the bulk stream after the source's last DONE:
// only keepalives may come, until the ACK ends the migration.
func (d *dest) drainKeepalives(r *wire.Reader, l *destLink) {
	for {
		rec, err := r.Next()
		if err != nil {
			select {
			case <-d.failC: // ended here: nothing more to report
			default:
				// EOF or a closed connection: the source, or this side,
				// ended the stream after the ACK. With recovery, a link
				// that ends before BYE is a broken one.
				switch {
				case d.recover:
					d.failLink(l, fmt.Errorf("bulk connection: %w", err))
				case !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !errors.Is(err, os.ErrClosed):
					d.fail(fmt.Errorf("bulk connection: %w", err))
				}
			}
			return
		}
		d.alive.heard()
		switch rec.Type {
		case wire.TypeKeepalive:
		case wire.TypeBye:
			d.byeOnce.Do(func() { close(d.bye) })
			return
		default:
			d.fail(fmt.Errorf("unexpected %v record after the last checksums", rec.Type))
			return
		}
	}
}

// awaitBye waits, with recovery on, for the source's word that it has
// the ACK.
func (d *dest) awaitBye() protocol.DestEvent {
	l := d.curLink()
	select {
	case <-d.bye:
		return protocol.DestEvent{Kind: protocol.DevRecord, Record: protocol.RecBye}
	case <-d.failC:
		return d.failure(protocol.DevConnClosed, d.failErr)
	case <-l.down:
		return d.failure(protocol.DevConnClosed, errors.New("the link broke before the source confirmed the ACK"))
	}
}

// readBack reads every page the domain holds and returns their CRC-32C
// and the pages the guest wrote since the resume.
func (d *dest) readBack(rb ReadBacker) ([]uint32, *prepage.Bitmap, error) {
	const chunk = 256
	n := d.hdr.NumPages
	ps := int(d.hdr.PageSize)
	crcs := make([]uint32, n)
	written := prepage.NewBitmap(n)
	buf := make([]byte, chunk*ps)
	pfns := make([]uint64, 0, chunk)
	for base := uint64(0); base < n; base += chunk {
		pfns = pfns[:0]
		d.mu.Lock()
		for p := base; p < min(base+chunk, n); p++ {
			if !d.absent.Test(p) {
				pfns = append(pfns, p)
			}
		}
		d.mu.Unlock()
		if len(pfns) == 0 {
			continue
		}
		w, err := rb.ReadBack(pfns, buf[:len(pfns)*ps])
		if err != nil {
			return nil, nil, err
		}
		for _, p := range w {
			if p < n {
				written.Set(p)
			}
		}
		for i, p := range pfns {
			crcs[p] = crc32.Checksum(buf[i*ps:(i+1)*ps], castagnoli)
		}
	}
	return crcs, written, nil
}

// changePageSet follows the source's page set in the pause: dropped pages
// hold no memory any more, added ones will be placed before the resume.
func (d *dest) changePageSet(ps wire.PageSet) error {
	n := d.hdr.NumPages
	for _, p := range append(slices.Clone(ps.Dropped), ps.Added...) {
		if p >= n {
			return fmt.Errorf("page set: pfn %#x beyond the domain's %d pages", p, n)
		}
	}
	ch, ok := d.dom.(PageSetter)
	if !ok {
		return fmt.Errorf("the source's page set changed (%d dropped, %d added) and this destination cannot follow", len(ps.Dropped), len(ps.Added))
	}
	if err := ch.ChangePageSet(ps.Dropped, ps.Added); err != nil {
		return fmt.Errorf("page set (%d dropped, %d added): %w", len(ps.Dropped), len(ps.Added), err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, p := range ps.Dropped {
		d.absent.Set(p)
		if d.present.Set(p) {
			d.nPresent++
		}
	}
	for _, p := range ps.Added {
		if d.absent.Test(p) {
			d.absent.Clear(p)
			d.present.Clear(p)
			d.nPresent--
		}
	}
	return nil
}

func (d *dest) closeAllIn() { d.allOnce.Do(func() { close(d.allIn) }) }

func (d *dest) discard(pfns []uint64) error {
	d.mu.Lock()
	for _, p := range pfns {
		if p >= d.hdr.NumPages {
			d.mu.Unlock()
			return fmt.Errorf("discard: pfn %#x beyond the domain's %d pages", p, d.hdr.NumPages)
		}
		if d.present.Test(p) {
			d.present.Clear(p)
			d.nPresent--
		}
	}
	d.mu.Unlock()
	if err := d.dom.Discard(pfns); err != nil {
		return fmt.Errorf("discard %d re-dirtied pages: %w", len(pfns), err)
	}
	return nil
}

func (d *dest) resume(core []byte) error {
	if core == nil {
		return errors.New("GO before the core state")
	}
	if d.stopCancel != nil && !d.detachCaller() {
		return errors.New("cancelled before the resume")
	}
	d.mu.Lock()
	d.resumed = true
	d.resumedAt = time.Now()
	complete := d.nPresent == d.hdr.NumPages && d.placing == 0
	d.mu.Unlock()
	d.startUrgentReader(d.curLink())
	go d.faultLoop()
	if err := d.dom.Resume(core); err != nil {
		return fmt.Errorf("resume domain: %w", err)
	}
	if d.opt.OnResume != nil {
		d.opt.OnResume()
	}
	if complete {
		d.closeAllIn()
	}
	return nil
}

// faultLoop turns the guest's faults into requests to the source. A page
// already present or already requested is not asked for again.
func (d *dest) faultLoop() {
	var pfns, req []uint64
	for {
		var err error
		pfns, err = d.dom.ReadFaults(pfns)
		if err != nil {
			if !errors.Is(err, ErrClosed) {
				d.fail(fmt.Errorf("read faults: %w", err))
			}
			return
		}
		now := time.Now()
		req = req[:0]
		d.mu.Lock()
		for _, p := range pfns {
			if p >= d.hdr.NumPages {
				continue
			}
			d.stats.Faults++
			if d.present.Test(p) {
				continue // being placed: the placement wakes the vCPU
			}
			d.faulted.Set(p)
			if d.requested.Set(p) {
				d.faultAt[p] = now
				req = append(req, p)
				if b := int(now.Sub(d.resumedAt) / TimelineBucket); b < 1<<16 {
					for len(d.timeline) <= b {
						d.timeline = append(d.timeline, 0)
					}
					d.timeline[b]++
				}
			}
		}
		d.mu.Unlock()
		if len(req) == 0 {
			continue
		}
		if err := d.request(req); err != nil {
			if d.recover {
				// The requests stay recorded: a new link asks again.
				d.failLink(d.curLink(), fmt.Errorf("send fault request: %w", err))
				continue
			}
			d.fail(fmt.Errorf("send fault request: %w", err))
			return
		}
	}
}

// urgentReader places fault replies.
// request sends one FAULT_REQUEST.
func (d *dest) request(pfns []uint64) error {
	d.uwMu.Lock()
	defer d.uwMu.Unlock()
	if err := d.uw.WritePFNs(wire.TypeFaultRequest, pfns); err != nil {
		return err
	}
	return d.uw.Flush()
}

func (d *dest) startUrgentReader(l *destLink) {
	l.readers.Add(1)
	go func() {
		defer l.readers.Done()
		d.urgentReader(l)
	}()
}

func (d *dest) urgentReader(l *destLink) {
	r := wire.NewReader(l.urg)
	var pb wire.PageBatch
	for {
		rec, err := r.Next()
		if err != nil {
			select {
			case <-d.allIn:
				return // we closed it: complete
			default:
			}
			if errors.Is(err, io.EOF) {
				err = errors.New("source closed the urgent connection")
			}
			d.failLink(l, fmt.Errorf("urgent connection: %w", err))
			return
		}
		if rec.Type != wire.TypePageBatch {
			d.failLink(l, fmt.Errorf("urgent connection: unexpected %v", rec.Type))
			return
		}
		// err is the loop's: a decode or place failure must not be
		// shadowed (it once was, and the faulting vCPU waited for ever).
		err = wire.DecodePageBatch(rec.Body, &pb)
		if err == nil {
			err = d.place(&pb)
		}
		if err != nil {
			d.failLink(l, fmt.Errorf("urgent connection: %w", err))
			return
		}
	}
}

// detachCaller detaches the caller's context and reports whether it had
// not ended (a cancel that came first wins: the domain is not resumed).
func (d *dest) detachCaller() bool {
	d.stopCancel()
	select {
	case <-d.failC:
		return false
	default:
		return true
	}
}
