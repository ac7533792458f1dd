package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/engine/protocol"
	"github.com/xl-postcopy/xl-postcopy/xen/prepage"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// Recovery after a broken link (the source's side): once GO may have
// left, the domain's memory is here and the only copy that may run is
// there, so a broken link pauses the migration instead of ending it
// (QEMU's postcopy-paused). The source copy stays paused with every page;
// the driver brings a new pair of connections up through Options.Reconnect,
// the destination says where it stands (protocol.Stage) and which pages
// it holds, and the machine goes on from there: only the pages it lacks
// are sent again.

// reconnect is ActReconnect: it retires the broken link and tries new
// ones, with backoff, until one is up or the recovery time is over.
func (s *source) reconnect(r *srcRun) protocol.Event {
	brokeAt := time.Now()
	phase := s.phase.Load().(string)
	s.phase.Store("postcopy-paused")
	defer s.phase.Store(phase)
	cause := s.failure()
	// The old link: down for good, its readers ended, before its writers
	// and window are reused.
	s.fail(errors.New("link broken"))
	if s.revDone != nil {
		<-s.revDone
	}
	if s.faultDone != nil {
		<-s.faultDone
		s.faultDone = nil
	}
	if s.opt.Logf != nil {
		s.opt.Logf("link to the destination broken after GO (%v): reconnecting for up to %v", cause, s.opt.RecoverTimeout)
	}
	ctx, cancel := context.WithTimeout(r.ctx, s.opt.RecoverTimeout)
	defer cancel()
	wait := 100 * time.Millisecond
	var last error
	for attempt := 1; ; attempt++ {
		stage, held, err := s.tryLink(ctx)
		if err == nil {
			lost := s.learnHeld(held)
			paused := time.Since(brokeAt)
			r.st.PostcopyPausedMs = addMs(r.st.PostcopyPausedMs, paused)
			r.st.LostPages += lost
			if s.opt.Logf != nil {
				s.opt.Logf("link back after %v (attempt %d): destination %v, %d pages sent before the break to send again",
					paused.Round(time.Millisecond), attempt, stage, lost)
			}
			return protocol.Event{Kind: protocol.EvRecovered, Stage: stage}
		}
		last = err
		if s.opt.Logf != nil {
			s.opt.Logf("reconnect attempt %d: %v", attempt, err)
		}
		select {
		case <-ctx.Done():
			return protocol.Event{Kind: protocol.EvTimeout,
				Err: fmt.Errorf("no new link to the destination within %v (%d attempts; last: %v)", s.opt.RecoverTimeout, attempt, last)}
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
}

// tryLink makes one new link: connect, say RESUME, read the destination's
// RESUME_ACK records; on success the link is the migration's from now on.
func (s *source) tryLink(ctx context.Context) (protocol.Stage, *prepage.Bitmap, error) {
	bulk, urgent, err := s.opt.Reconnect(ctx)
	if err != nil {
		return 0, nil, fmt.Errorf("connect: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			bulk.Close()
			urgent.Close()
		}
	}()
	// A peer that accepts and then says nothing must not hold the
	// recovery: the handshake has the progress timeout.
	hctx, hcancel := context.WithTimeout(ctx, s.opt.ProgressTimeout)
	stop := context.AfterFunc(hctx, func() {
		bulk.Close()
		urgent.Close()
	})
	defer func() {
		stop()
		hcancel()
	}()
	if err := wire.WriteHeader(bulk, wire.ChannelBulk); err != nil {
		return 0, nil, fmt.Errorf("bulk connection: %w", err)
	}
	if err := wire.WriteHeader(urgent, wire.ChannelUrgent); err != nil {
		return 0, nil, fmt.Errorf("urgent connection: %w", err)
	}
	s.bulkMu.Lock()
	s.bw.Reset(bulk)
	err = s.bw.WriteResume(wire.Resume{Name: s.info.Name, NumPages: s.info.NumPages})
	if err == nil {
		err = s.bw.Flush()
	}
	// The stream's headers are out (a take-over's first link): keepalives
	// may go.
	s.opened = true
	s.bulkMu.Unlock()
	if err != nil {
		return 0, nil, fmt.Errorf("send RESUME: %w", err)
	}
	rd := wire.NewReader(bulk)
	n := s.info.NumPages
	held := prepage.NewBitmap(n)
	var stage protocol.Stage
	var after uint64
	for {
		rec, err := rd.Next()
		if err != nil {
			return 0, nil, fmt.Errorf("read RESUME_ACK: %w", err)
		}
		switch rec.Type {
		case wire.TypeKeepalive:
			continue
		case wire.TypeError, wire.TypeNotResumed:
			msg, _ := wire.DecodeBlob(rec.Body)
			return 0, nil, fmt.Errorf("destination refused the new link: %s", msg)
		case wire.TypeResumeAck:
		default:
			return 0, nil, fmt.Errorf("unexpected %v record in answer to RESUME", rec.Type)
		}
		a, err := wire.DecodeResumeAck(rec.Body)
		if err != nil {
			return 0, nil, err
		}
		if after, err = wire.CheckHeld(a.Held, after, n); err != nil {
			return 0, nil, err
		}
		for _, x := range a.Held {
			for p := x.First; p < x.First+x.Count; p++ {
				held.Set(p)
			}
		}
		stage = protocol.Stage(a.Stage)
		if a.Final {
			break
		}
	}
	switch stage {
	case protocol.StageNotResumed, protocol.StageRunning, protocol.StageAcking:
	default:
		return 0, nil, fmt.Errorf("destination reports unknown stage %d", stage)
	}
	// The new link is the migration's: its window, its readers.
	s.failMu.Lock()
	s.bulk, s.urgent = bulk, urgent
	s.failed = nil
	s.failedC = make(chan struct{})
	s.win = newWindow(uint64(s.opt.WindowBytes))
	win := s.win
	s.failMu.Unlock()
	s.uw.Reset(urgent)
	s.alive.heard()
	s.revDone = make(chan struct{})
	go s.readReverse(rd, win, s.revDone)
	ok = true
	return stage, held, nil
}

// learnHeld makes what the destination holds the record of what was
// sent: a page it lacks goes again (it was lost with the link), one it
// holds never does. It returns how many pages sent before were lost.
func (s *source) learnHeld(held *prepage.Bitmap) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var lost uint64
	for p := uint64(0); p < s.info.NumPages; p++ {
		switch {
		case s.absent.Test(p):
		case held.Test(p):
			s.markSent(p)
		case s.sent.Test(p):
			s.markUnsent(p)
			lost++
		}
	}
	return lost
}

// tellGaveUp tells a destination that may be waiting for this source on a
// new link — it had the core state, perhaps not GO — that the migration
// failed before GO and the domain runs on here, so that it removes its
// copy now rather than when its recovery time is over: an ERROR record as
// the first record of a new link. Best effort, bounded: a destination that
// is not waiting is not reached, and that is fine.
func (s *source) tellGaveUp(ctx context.Context, why error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	bulk, urgent, err := s.opt.Reconnect(ctx)
	if err != nil {
		if s.opt.Logf != nil {
			s.opt.Logf("could not tell the destination that the domain runs on here: %v", err)
		}
		return
	}
	stop := context.AfterFunc(ctx, func() {
		bulk.Close()
		urgent.Close()
	})
	defer func() {
		stop()
		bulk.Close()
		urgent.Close()
	}()
	err = wire.WriteHeader(bulk, wire.ChannelBulk)
	if err == nil {
		err = wire.WriteHeader(urgent, wire.ChannelUrgent)
	}
	if err == nil {
		w := wire.NewWriter(bulk)
		if err = w.WriteBlob(wire.TypeError, []byte(fmt.Sprintf("%s: %v", errSourceGaveUp, why))); err == nil {
			err = w.Flush()
		}
	}
	if err == nil {
		// Until the destination has read it and closed the link.
		_, err = io.Copy(io.Discard, bulk)
	}
	if s.opt.Logf != nil {
		s.opt.Logf("told the destination that the domain runs on here (%v)", err)
	}
}

// errSourceGaveUp opens the ERROR a source sends on a new link once the
// domain runs on at the source (tellGaveUp).
var errSourceGaveUp = errors.New("the migration failed before GO and the source resumed its copy")

// The destination's side: with DestOptions.Reattach, a link that breaks
// after SWITCHOVER leaves the domain as it is (a vCPU waiting on a page
// keeps waiting) while this side waits for the source on a new link; it
// then says where it stands and which pages it holds.

// awaitReattach is DactAwaitReattach.
func (d *dest) awaitReattach(x *destRun, m *protocol.Dest) protocol.DestEvent {
	brokeAt := time.Now()
	old := d.curLink()
	d.failLink(old, errors.New("link broken"))
	old.readers.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), d.opt.RecoverTimeout)
	defer cancel()
	if d.opt.Logf != nil {
		d.opt.Logf("postcopy-paused: waiting up to %v for the source on a new link", d.opt.RecoverTimeout)
	}
	for {
		c1, c2, err := d.opt.Reattach(ctx)
		if err != nil {
			return d.failure(protocol.DevTimeout, fmt.Errorf("the source did not come back within %v: %w", d.opt.RecoverTimeout, err))
		}
		rd, l, err := d.handshake(c1, c2, m.Stage())
		if errors.Is(err, errSourceGaveUp) {
			return d.failure(protocol.DevPeerError, err)
		}
		if err != nil {
			if d.opt.Logf != nil {
				d.opt.Logf("a new link was refused: %v", err)
			}
			continue
		}
		x.r = rd
		d.mu.Lock()
		d.stats.Recoveries++
		d.stats.PostcopyPausedMs = addMs(d.stats.PostcopyPausedMs, time.Since(brokeAt))
		d.mu.Unlock()
		if m.Stage() == protocol.StageAcking {
			go d.drainKeepalives(rd, l)
		}
		if d.opt.Logf != nil {
			d.opt.Logf("the source is back after %v", time.Since(brokeAt).Round(time.Millisecond))
		}
		return protocol.DestEvent{Kind: protocol.DevReattached}
	}
}

// handshake checks that a new pair of connections continues this
// migration (RESUME), makes it the link and answers RESUME_ACK.
func (d *dest) handshake(c1, c2 io.ReadWriteCloser, stage protocol.Stage) (*wire.Reader, *destLink, error) {
	ok := false
	defer func() {
		if !ok {
			c1.Close()
			c2.Close()
		}
	}()
	hctx, hcancel := context.WithTimeout(context.Background(), d.opt.ProgressTimeout)
	stop := context.AfterFunc(hctx, func() {
		c1.Close()
		c2.Close()
	})
	defer func() {
		stop()
		hcancel()
	}()
	bulk, urg, err := sortConns(c1, c2)
	if err != nil {
		return nil, nil, err
	}
	rd := wire.NewReader(bulk)
	rec, err := rd.Next()
	if err != nil {
		return nil, nil, fmt.Errorf("read RESUME: %w", err)
	}
	if rec.Type == wire.TypeError {
		msg, _ := wire.DecodeBlob(rec.Body)
		if strings.HasPrefix(string(msg), errSourceGaveUp.Error()) {
			return nil, nil, fmt.Errorf("%w (%s)", errSourceGaveUp, strings.TrimPrefix(string(msg), errSourceGaveUp.Error()+": "))
		}
	}
	if rec.Type != wire.TypeResume {
		return nil, nil, fmt.Errorf("a new link opened with %v, not RESUME", rec.Type)
	}
	r, err := wire.DecodeResume(rec.Body)
	if err != nil {
		return nil, nil, err
	}
	if r.Name != d.hdr.Name || r.NumPages != d.hdr.NumPages {
		msg := fmt.Sprintf("this receiver migrates %q (%d pages), not %q (%d pages)", d.hdr.Name, d.hdr.NumPages, r.Name, r.NumPages)
		w := wire.NewWriter(bulk)
		if w.WriteBlob(wire.TypeError, []byte(msg)) == nil {
			_ = w.Flush()
		}
		return nil, nil, errors.New(msg)
	}
	l := &destLink{bulk: bulk, urg: urg, down: make(chan struct{})}
	d.linkMu.Lock()
	d.link = l
	d.linkMu.Unlock()
	d.uwMu.Lock()
	d.uw.Reset(urg)
	d.uwMu.Unlock()
	d.credited = 0 // the source's window is new too
	held := d.heldRanges()
	err = d.writeBulk(func(w *wire.Writer) error {
		w.Reset(bulk)
		for at := 0; at < len(held) || at == 0; at += wire.MaxResumeRanges {
			end := min(len(held), at+wire.MaxResumeRanges)
			if err := w.WriteResumeAck(wire.ResumeAck{Stage: uint8(stage), Final: end == len(held), Held: held[at:end]}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("send RESUME_ACK: %w", err)
	}
	d.alive.heard()
	ok = true
	return rd, l, nil
}

// heldRanges are the pages this side holds (placed or being placed), as
// ranges.
func (d *dest) heldRanges() []wire.Range {
	d.mu.Lock()
	defer d.mu.Unlock()
	var held []uint64
	for p := uint64(0); p < d.hdr.NumPages; p++ {
		if d.present.Test(p) && !d.absent.Test(p) {
			held = append(held, p)
		}
	}
	return wire.RangesOf(held)
}

// restart is DactRestart: the checksums come again after the pages, the
// new urgent connection gets its reader, and the pages faulted on and
// not in yet are asked for again (their requests may have been lost).
func (d *dest) restart(x *destRun) error {
	x.table, x.final = nil, false
	l := d.curLink()
	d.startUrgentReader(l)
	d.mu.Lock()
	var again []uint64
	for p := uint64(0); p < d.hdr.NumPages; p++ {
		if d.requested.Test(p) && !d.present.Test(p) {
			again = append(again, p)
		}
	}
	d.mu.Unlock()
	for at := 0; at < len(again); at += wire.MaxPFNs {
		if err := d.request(again[at:min(len(again), at+wire.MaxPFNs)]); err != nil {
			return fmt.Errorf("ask again for %d pages: %w", len(again), err)
		}
	}
	return nil
}
