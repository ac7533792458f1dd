package engine

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/engine/protocol"
	"github.com/xl-postcopy/xl-postcopy/xen/prepage"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// Options configure the source side of a migration.
type Options struct {
	Mode      wire.Mode
	Prepaging string          // prepage policy name (post-copy and hybrid)
	Policy    prepage.Options // policy options (pivots, priority list)
	// BatchPages is the pages per PAGE_BATCH record (default 64: 256 KiB,
	// ~2 ms of a 1 Gbit link, so a fault reply waits at most that long
	// behind one batch).
	BatchPages int
	// WindowBytes bounds bulk bytes sent but not yet consumed by the
	// destination (default 1 MiB).
	WindowBytes int
	// MaxRounds bounds pre-copy rounds before stop-and-copy (default 5,
	// libxc's max_iterations since Xen 4.6); StopPages ends pre-copy early
	// once a round leaves at most that many dirty pages (default 50,
	// libxc's dirty_threshold).
	MaxRounds int
	StopPages int
	// HybridRounds is the number of pre-copy rounds before a hybrid
	// migration switches to post-copy (default 1: one full pass).
	HybridRounds int
	// Progress, if set, is called about every ProgressEvery.
	Progress      func(Progress)
	ProgressEvery time.Duration
	// Record and RecordInterval configure the pre-record policies: the
	// longest recording of the trajectory before the switchover (default
	// 1 s; it ends early once the trajectory converges) and how often the
	// dirty log is sampled (default 20 ms).
	Record, RecordInterval time.Duration
	// Logf, if set, receives debug lines (switchover timings).
	Logf func(format string, args ...any)
	// ProgressTimeout is the longest silence of the destination on the
	// bulk stream before the migration gives up on it (default
	// DefaultProgressTimeout).
	ProgressTimeout time.Duration
	// OnGo, if set, is called once GO has been sent: from then on the
	// destination may run the domain, and the caller's context no longer
	// stops the migration.
	OnGo func()
	// AckTimeout bounds the wait for the destination's final ACK after the
	// last page is sent (default 30 minutes: it reads its memory back first).
	AckTimeout time.Duration
	// Reconnect, if set, turns recovery on: a link that breaks once GO may
	// have left pauses the migration (postcopy-paused) and Reconnect is
	// called, with backoff, until it gives a new pair of connections to
	// the same destination or RecoverTimeout (default
	// DefaultRecoverTimeout) has passed.
	Reconnect      func(ctx context.Context) (bulk, urgent io.ReadWriteCloser, err error)
	RecoverTimeout time.Duration
	// LinkTimeout, with recovery on, replaces ProgressTimeout once GO has
	// been sent: the silence after which the link is taken as broken and
	// the migration pauses to reconnect (default DefaultLinkTimeout).
	LinkTimeout time.Duration
}

// DefaultRecoverTimeout is how long a broken link is tried again.
const DefaultRecoverTimeout = 3 * time.Minute

func (o *Options) defaults() {
	if o.BatchPages <= 0 {
		o.BatchPages = 64
	}
	if o.BatchPages > wire.MaxBatchPages {
		o.BatchPages = wire.MaxBatchPages
	}
	if o.WindowBytes <= 0 {
		o.WindowBytes = 1 << 20
	}
	if o.MaxRounds <= 0 {
		o.MaxRounds = 5
	}
	if o.StopPages <= 0 {
		o.StopPages = 50
	}
	if o.HybridRounds <= 0 {
		o.HybridRounds = 1
	}
	if o.Prepaging == "" {
		o.Prepaging = "dual"
	}
	if o.Record <= 0 {
		o.Record = time.Second
	}
	if o.RecordInterval <= 0 {
		o.RecordInterval = 20 * time.Millisecond
	}
	if o.ProgressEvery <= 0 {
		o.ProgressEvery = 200 * time.Millisecond
	}
	if o.AckTimeout <= 0 {
		// The destination reads its memory back before it acknowledges
		// (minutes under emulation); a dead peer is the progress
		// timeout's to find.
		o.AckTimeout = 30 * time.Minute
	}
	if o.ProgressTimeout <= 0 {
		o.ProgressTimeout = DefaultProgressTimeout
	}
	if o.RecoverTimeout <= 0 {
		o.RecoverTimeout = DefaultRecoverTimeout
	}
	if o.LinkTimeout <= 0 {
		o.LinkTimeout = DefaultLinkTimeout
	}
	if o.LinkTimeout > o.ProgressTimeout {
		o.LinkTimeout = o.ProgressTimeout
	}
}

// source is one outgoing migration.
type source struct {
	opt  Options
	dom  Source
	info Info
	// switchTried: the core state may have reached the destination.
	switchTried atomic.Bool
	// takeOver: this source took over a migration whose source process
	// died after GO (TakeOverSource).
	takeOver bool

	bulk, urgent io.ReadWriteCloser
	bw, uw       *wire.Writer
	bulkMu       sync.Mutex // bw is written by the push loop and the control path

	mu     sync.Mutex // guards sent, absent, policy and unreadable
	sent   *prepage.Bitmap
	absent *prepage.Bitmap // pages that hold no memory: never sent, no checksum
	policy prepage.Policy
	spec   policySpec
	// unreadable are pages a pre-copy round could not read (the guest
	// was giving them back): the pause decides whether they are gone or
	// must be sent.
	unreadable []uint64

	win        *window
	failMu     sync.Mutex
	failed     error // first failure; failedC is closed when it is set
	failedC    chan struct{}
	faultDone  chan error // the fault server's result (post-copy)
	created    chan struct{}
	notResumed chan struct{} // the destination got GO and never ran the domain
	ready      chan struct{}
	resumed    chan struct{}
	acked      chan struct{}
	ack        wire.Ack
	destStats  DestStats

	pagesSent       atomic.Uint64
	zeroPages       atomic.Uint64
	unreadableReads atomic.Uint64
	resent          atomic.Uint64   // transmissions of a page after its first
	sentEver        *prepage.Bitmap // pages transmitted at least once (guarded by mu)
	early           *prepage.Bitmap // core pages sent before the pause (guarded by mu; nil: none)
	faultsSeen      atomic.Uint64
	phase           atomic.Value // string
	round           atomic.Int64
	downtime        atomic.Int64 // ns from the pause to RESUMED; 0 before
	start           time.Time
	zeroPage        []byte
	stopCancel      func() // detaches the caller's context (at GO)
	alive           *liveness
	opened          bool // the bulk stream's headers are out (guarded by bulkMu)
	// revDone is closed when the current link's reverse reader has ended.
	revDone chan struct{}
}

// RunSource migrates dom over two connections to a destination running
// RunDest. bulk and urgent are separate connections (a fault request
// must never queue behind push). On failure before the destination has
// been told to resume, the domain is resumed here and the error says so;
// after that point the source copy is kept paused, never resumed.
func RunSource(ctx context.Context, dom Source, bulk, urgent io.ReadWriteCloser, opt Options) (*Stats, error) {
	return runSource(ctx, dom, bulk, urgent, opt, false)
}

// TakeOverSource goes on with a migration whose source process died after
// GO: dom is the paused source copy (every page), and the destination,
// which waits for a new link as after any break, is reached through
// opt.Reconnect (required). It starts paused (postcopy-paused), learns on
// the new link where the destination stands and which pages it holds,
// sends it GO if it never had it and the pages it lacks, and ends as
// RunSource does. The figures cover this process's part: the downtime,
// the setup and the pre-copy were measured by the process that died.
// Pre-record policies fall back to their bubble policy (the recorded
// trajectory died with that process).
func TakeOverSource(ctx context.Context, dom Source, opt Options) (*Stats, error) {
	if opt.Reconnect == nil {
		return nil, errors.New("taking over a migration needs Options.Reconnect (a new link to the destination)")
	}
	if opt.Mode == wire.ModePrecopy {
		return nil, errors.New("a pre-copy migration has nothing to take over after GO")
	}
	// Placeholders until the first new link: closed, so that retiring
	// them does nothing.
	b1, b2 := net.Pipe()
	b1.Close()
	b2.Close()
	return runSource(ctx, dom, b1, b2, opt, true)
}

func runSource(ctx context.Context, dom Source, bulk, urgent io.ReadWriteCloser, opt Options, takeOver bool) (*Stats, error) {
	opt.defaults()
	info := dom.Info()
	if info.NumPages == 0 || info.PageSize == 0 {
		return nil, fmt.Errorf("source domain %q reports %d pages of %d bytes", info.Name, info.NumPages, info.PageSize)
	}
	s := &source{
		opt: opt, dom: dom, info: info, bulk: bulk, urgent: urgent,
		bw: wire.NewWriter(bulk), uw: wire.NewWriter(urgent),
		sent:       prepage.NewBitmap(info.NumPages),
		absent:     prepage.NewBitmap(info.NumPages),
		sentEver:   prepage.NewBitmap(info.NumPages),
		created:    make(chan struct{}),
		notResumed: make(chan struct{}),
		ready:      make(chan struct{}),
		resumed:    make(chan struct{}),
		acked:      make(chan struct{}),
		failedC:    make(chan struct{}),
		start:      time.Now(),
		zeroPage:   make([]byte, info.PageSize),
	}
	s.win = newWindow(uint64(opt.WindowBytes))
	s.takeOver = takeOver
	s.phase.Store("setup")
	if takeOver {
		s.phase.Store("postcopy")
	}
	for _, p := range info.Absent {
		if p >= info.NumPages {
			return nil, fmt.Errorf("source domain %q reports absent page %d of %d", info.Name, p, info.NumPages)
		}
		s.absent.Set(p)
		s.markSent(p)
	}
	if opt.Mode != wire.ModePrecopy {
		spec, err := parsePolicy(opt.Prepaging)
		if err != nil {
			return nil, err
		}
		if takeOver {
			spec.record = false
		}
		s.spec = spec
		if !spec.record {
			if err := s.newPolicy(opt.Policy); err != nil {
				return nil, err
			}
		}
	}
	// Closing both connections is how every blocked goroutine is released,
	// on success and on failure alike.
	stop := context.AfterFunc(ctx, func() { s.fail(ctx.Err()) })
	s.stopCancel = func() { stop() }
	defer stop()
	period := opt.ProgressTimeout / 4
	if opt.Reconnect != nil {
		period = opt.LinkTimeout / 4
	}
	s.alive = startLiveness(opt.ProgressTimeout, period, func() error {
		s.bulkMu.Lock()
		defer s.bulkMu.Unlock()
		if !s.opened {
			return nil // the stream's header and DOMAIN_HEADER come first
		}
		return writeKeepalive(s.bw)
	}, func(err error) { s.fail(fmt.Errorf("destination: %w", err)) })
	defer s.alive.close()
	defer func() {
		b, u := s.conns()
		b.Close()
		u.Close()
	}()
	done := make(chan struct{})
	timeline := make(chan []Sample, 1)
	go func() { timeline <- s.sample(done) }()
	st, err := s.run(ctx)
	close(done)
	tl := <-timeline
	if st != nil {
		st.Timeline = append(tl, s.snapshot())
	}
	return st, err
}

func (s *source) fail(err error) {
	s.failMu.Lock()
	if s.failed == nil {
		if err == nil {
			err = errors.New("migration stopped")
		}
		s.failed = err
		close(s.failedC)
	}
	err = s.failed
	win, b, u := s.win, s.bulk, s.urgent
	s.failMu.Unlock()
	win.close(err)
	b.Close()
	u.Close()
}

// conns are the current link's connections.
func (s *source) conns() (bulk, urgent io.ReadWriteCloser) {
	s.failMu.Lock()
	defer s.failMu.Unlock()
	return s.bulk, s.urgent
}

func (s *source) failure() error {
	s.failMu.Lock()
	defer s.failMu.Unlock()
	return s.failed
}

// markSent records that p has gone (or never needs to) and tells the
// policy; false if it had gone already. Called with mu held.
func (s *source) markSent(p uint64) bool {
	if !s.sent.Set(p) {
		return false
	}
	if s.policy != nil {
		s.policy.Sent(p)
	}
	return true
}

// markUnsent records that p must go again and tells the policy. Called
// with mu held (or before any other goroutine runs).
func (s *source) markUnsent(p uint64) {
	s.sent.Clear(p)
	if s.policy != nil {
		s.policy.Unsent(p)
	}
}

// newPolicy makes the pre-paging policy and tells it what has gone so
// far. Called with mu held (or before any other goroutine runs).
func (s *source) newPolicy(opt prepage.Options) error {
	pol, err := prepage.New(s.spec.bubble, s.info.NumPages, opt)
	if err != nil {
		return err
	}
	for p := uint64(0); p < s.info.NumPages; p++ {
		if s.sent.Test(p) {
			pol.Sent(p)
		}
	}
	s.policy = pol
	return nil
}

// progress is the live snapshot Options.Progress receives.
func (s *source) progress() Progress {
	s.mu.Lock()
	have := s.info.NumPages - s.absent.Count()
	moved := s.sentEver.Count()
	s.mu.Unlock()
	p := Progress{
		Phase: s.phase.Load().(string), Round: int(s.round.Load()),
		PagesSent: s.pagesSent.Load(), Pages: s.info.NumPages,
		Bytes: s.bw.Written() + s.uw.Written(), Faults: s.faultsSeen.Load(),
		Elapsed: time.Since(s.start), Downtime: time.Duration(s.downtime.Load()),
	}
	if moved < have {
		p.Remaining = have - moved
	}
	return p
}

// snapshot is one timeline sample, now.
func (s *source) snapshot() Sample {
	return Sample{AtMs: ms(time.Since(s.start)), Phase: s.phase.Load().(string), Bytes: s.bw.Written() + s.uw.Written(),
		PagesSent: s.pagesSent.Load(), Faults: s.faultsSeen.Load()}
}

// thinTimeline keeps every other sample (the later of each pair, so the
// newest survives).
func thinTimeline(tl []Sample) []Sample {
	for i := range len(tl) / 2 {
		tl[i] = tl[2*i+1]
	}
	return tl[:len(tl)/2]
}

// sample records the timeline and feeds Options.Progress until done,
// every ProgressEvery; past MaxTimeline samples it keeps every other one
// and samples half as often.
func (s *source) sample(done chan struct{}) []Sample {
	every := s.opt.ProgressEvery
	t := time.NewTicker(every)
	defer t.Stop()
	var tl []Sample
	for {
		select {
		case <-done:
			return tl
		case <-t.C:
			tl = append(tl, s.snapshot())
			if len(tl) >= MaxTimeline {
				tl = thinTimeline(tl)
				every *= 2
				t.Reset(every)
			}
			if s.opt.Progress != nil {
				s.opt.Progress(s.progress())
			}
		}
	}
}

// srcRun is one run of the source's machine: the driver's state between
// actions.
type srcRun struct {
	ctx     context.Context
	st      *Stats
	rec     *recorder
	dirtyFn func([]uint64) ([]uint64, error)
	dirty   []uint64
	logOn   bool // the dirty log is on (stopped on the way out if so)
	// stopLog switches the dirty log off once the destination runs (set in
	// the pause; a no-op otherwise).
	stopLog      func()
	pausedAt     time.Time
	precopyBytes uint64
	stopBytes    uint64
	// crcs delivers the checksums of the paused domain, once; crc keeps
	// them for a recovery's second round.
	crcs chan crcResult
	crc  *crcResult
}

type crcResult struct {
	table []uint32
	err   error
}

// run drives the source's machine (protocol.Source): each action it
// returns is carried out here and its result fed back, until it reports
// how the migration ended.
func (s *source) run(ctx context.Context) (*Stats, error) {
	st := &Stats{Mode: s.opt.Mode.String(), Domain: s.info.Name, Pages: s.info.NumPages, PageSize: s.info.PageSize}
	if s.opt.Mode != wire.ModePrecopy {
		st.Prepaging = s.opt.Prepaging
	}
	r := &srcRun{ctx: ctx, st: st, dirtyFn: s.dom.DirtyPages, stopLog: func() {}}
	defer func() {
		if r.rec != nil {
			r.rec.finish() // error paths: stop sampling
		}
	}()
	m := protocol.NewSource()
	if s.opt.Reconnect != nil {
		m.EnableRecovery()
	}
	if s.takeOver {
		m.TakeOver()
		// GO was sent by the process that died: from here on no cancel
		// may strand the guest at the destination.
		s.stopCancel()
		r.ctx = context.WithoutCancel(r.ctx)
		st.TakenOver = true
	}
	acts := m.Start()
	for len(acts) > 0 {
		a := acts[0]
		acts = acts[1:]
		if a == protocol.ActReport {
			break
		}
		ev, ok := s.do(r, a)
		if !ok {
			continue
		}
		if s.opt.Logf != nil && ev.Kind.IsFailure() {
			s.opt.Logf("%v failed in state %v: %v", a, m.State(), ev.Err)
		}
		acts = append(acts, m.Step(ev)...)
	}
	o := m.Outcome()
	st.Recoveries = o.Recoveries
	if !o.OK && o.Where == RunsAtSource && s.opt.Reconnect != nil && s.switchTried.Load() {
		s.tellGaveUp(ctx, o.Err)
	}
	return st, s.outcome(r, o)
}

// outcome turns the machine's verdict into the error the caller gets.
func (s *source) outcome(r *srcRun, o protocol.Outcome) error {
	if o.OK {
		return nil
	}
	if o.Where == RunsAtSource || o.Where == PausedAtSource {
		// The domain is back (or stays) here: its dirty log is of no use.
		r.stopLog()
		if r.logOn {
			_ = s.dom.StopDirtyLog()
		}
	}
	err := o.Err
	switch {
	case o.Where == PausedAtSource:
		err = fmt.Errorf("%w (resume: %v)", err, o.ResumeErr)
	case o.Where == RunsAtSource && o.Resumed:
		err = fmt.Errorf("resumed at the source after: %w", err)
	}
	return &Error{Domain: s.info.Name, Where: o.Where, Err: err}
}

// backendError is a failure of the source domain's backend (a page that
// does not read), not of the link: a new link would meet it again, so it
// ends the migration instead of pausing it (with recovery, calling it a
// broken link made recoveries that never ended).
type backendError struct{ err error }

func (e *backendError) Error() string { return e.err.Error() }
func (e *backendError) Unwrap() error { return e.err }

func isBackend(err error) bool {
	var be *backendError
	return errors.As(err, &be)
}

// event is the machine's input for an action's result.
func (s *source) event(ok protocol.EventKind, err error, backend bool) protocol.Event {
	if err == nil {
		return protocol.Event{Kind: ok}
	}
	err = s.rootCause(err)
	kind := protocol.EvConnClosed
	switch {
	case backend:
		kind = protocol.EvBackendError
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		kind = protocol.EvCancel
	}
	select {
	case <-s.notResumed:
		// The destination got GO and never ran the domain: that, not the
		// connection it then closed, is what happened.
		return protocol.Event{Kind: protocol.EvNotResumed, Err: err}
	default:
	}
	return protocol.Event{Kind: kind, Err: err}
}

// do carries out one action; ok is false for actions with no result.
func (s *source) do(r *srcRun, a protocol.ActionKind) (protocol.Event, bool) {
	switch a {
	case protocol.ActOpen:
		err := s.openStreams()
		if err == nil {
			s.revDone = make(chan struct{})
			go s.readReverse(wire.NewReader(s.bulk), s.win, s.revDone)
			err = s.startRecording(r)
		}
		return s.event(protocol.EvOpened, err, false), true
	case protocol.ActAwaitCreated:
		// The destination creates its domain first: that is setup, not
		// downtime.
		return s.event(protocol.EvCreated, s.wait(r.ctx, s.created, "CREATED"), false), true
	case protocol.ActLive:
		return s.event(protocol.EvLiveDone, s.live(r), false), true
	case protocol.ActPause:
		r.precopyBytes = s.bw.Written()
		s.phase.Store("stop")
		// Downtime starts when pausing starts: the vCPUs stop during Pause.
		r.pausedAt = time.Now()
		err := s.dom.Pause()
		if err != nil {
			err = fmt.Errorf("pause the domain: %w", err)
		}
		return s.event(protocol.EvPaused, err, true), true
	case protocol.ActSendStop:
		return s.event(protocol.EvStopSent, s.sendStop(r), false), true
	case protocol.ActAwaitReady:
		err := s.wait(r.ctx, s.ready, "READY")
		if err == nil {
			s.dbg(r, "ready received")
		}
		return s.event(protocol.EvReady, err, false), true
	case protocol.ActRelinquish:
		if rq, ok := s.dom.(Relinquisher); ok {
			if err := rq.Relinquish(); err != nil {
				return s.event(0, fmt.Errorf("mark the source copy as migrated away: %w", err), true), true
			}
			s.dbg(r, "relinquished")
		}
		// A cancel that came while waiting for READY is honoured here,
		// the last moment it can be.
		if err := r.ctx.Err(); err != nil {
			return s.event(0, fmt.Errorf("cancelled before the switchover: %w", err), false), true
		}
		return protocol.Event{Kind: protocol.EvRelinquished}, true
	case protocol.ActDetachCancel:
		// From GO on the domain may run at the destination with its
		// memory still here: a cancel (a signal to the tool) must not end
		// the migration any more, or the guest is stranded there.
		s.stopCancel()
		r.ctx = context.WithoutCancel(r.ctx)
		return protocol.Event{}, false
	case protocol.ActSendGo:
		s.bulkMu.Lock()
		err := s.bw.WriteRecord(wire.TypeGo)
		if err == nil {
			err = s.bw.Flush()
		}
		s.bulkMu.Unlock()
		if err != nil {
			// GO may or may not have left: the destination can resume only
			// on a GO it received whole, so the guest runs in at most one
			// place; which one is not known here.
			return s.event(0, fmt.Errorf("send GO: %w", err), false), true
		}
		if s.opt.Reconnect != nil {
			s.alive.setLimit(s.opt.LinkTimeout)
		}
		if s.opt.OnGo != nil {
			s.opt.OnGo()
		}
		return protocol.Event{Kind: protocol.EvGoSent}, true
	case protocol.ActAwaitResumed:
		if err := s.wait(r.ctx, s.resumed, "RESUMED"); err != nil {
			return s.event(0, err, false), true
		}
		// One reading for both, so that progress and stats agree. (A
		// take-over did not see the pause: no downtime of its own.)
		if !r.pausedAt.IsZero() {
			dt := time.Since(r.pausedAt)
			r.st.DowntimeMs = ms(dt)
			s.downtime.Store(int64(dt))
		}
		s.dbg(r, "resumed received")
		r.stopLog()
		return protocol.Event{Kind: protocol.EvResumed}, true
	case protocol.ActPostcopy:
		err := s.afterResume(r)
		return s.event(protocol.EvPagesDone, err, isBackend(err)), true
	case protocol.ActAwaitAck:
		if err := s.awaitAck(r); err != nil {
			return s.event(0, err, isBackend(err)), true
		}
		ev := protocol.Event{Kind: protocol.EvAcked, Verified: r.st.Verified}
		if !r.st.Verified {
			ev.Err = fmt.Errorf("destination reports %d of %d pages differing from the source (first pfn %#x), %d received",
				s.ack.Mismatched, s.info.NumPages, s.ack.FirstMismatch, s.ack.PagesReceived)
		}
		return ev, true
	case protocol.ActDestroySource:
		s.phase.Store("done")
		err := s.dom.Destroy()
		if err != nil {
			err = fmt.Errorf("destroying the source copy failed: %w", err)
		}
		return s.event(protocol.EvDestroyed, err, true), true
	case protocol.ActReconnect:
		return s.reconnect(r), true
	case protocol.ActResumeSource:
		if err := s.dom.Resume(); err != nil {
			return protocol.Event{Kind: protocol.EvBackendError, Err: err}, true
		}
		return protocol.Event{Kind: protocol.EvResumedHere}, true
	}
	panic(fmt.Sprintf("engine: source action %v has no driver", a))
}

func (s *source) dbg(r *srcRun, what string) {
	if s.opt.Logf != nil {
		s.opt.Logf("%s at +%v since pause", what, time.Since(r.pausedAt))
	}
}

// startRecording starts the pre-record policies' sampling of the dirty
// log while the domain runs (while the destination creates its domain,
// and during hybrid's pre-copy round).
func (s *source) startRecording(r *srcRun) error {
	if !s.spec.record {
		return nil
	}
	if err := s.dom.StartDirtyLog(); err != nil {
		return fmt.Errorf("start dirty log for recording: %w", err)
	}
	r.logOn = true
	s.phase.Store("record")
	r.rec = startRecorder(s.dom, s.opt.RecordInterval)
	r.dirtyFn = r.rec.DirtyPages
	return nil
}

// live is everything before the pause: pre-copy rounds (pre-copy and
// hybrid), the early core pages (post-copy), the end of the recording.
func (s *source) live(r *srcRun) error {
	st := r.st
	if s.opt.Mode != wire.ModePostcopy {
		if r.rec == nil {
			if err := s.dom.StartDirtyLog(); err != nil {
				return fmt.Errorf("start dirty log: %w", err)
			}
			r.logOn = true
		}
		st.SetupTimeMs = ms(time.Since(s.start))
		s.phase.Store("precopy")
		all := make([]uint64, 0, s.info.NumPages)
		for p := uint64(0); p < s.info.NumPages; p++ {
			if !s.absent.Test(p) {
				all = append(all, p)
			}
		}
		if err := s.sendPages(wire.PhasePrecopy, all); err != nil {
			return fmt.Errorf("pre-copy round 0: %w", err)
		}
		st.PrecopyRounds = 1
		for {
			var err error
			r.dirty, err = r.dirtyFn(r.dirty)
			if err != nil {
				return fmt.Errorf("read dirty log: %w", err)
			}
			if s.opt.Mode == wire.ModeHybrid && st.PrecopyRounds >= s.opt.HybridRounds {
				break
			}
			if s.opt.Mode == wire.ModePrecopy && (len(r.dirty) <= s.opt.StopPages || st.PrecopyRounds >= s.opt.MaxRounds) {
				break
			}
			s.round.Store(int64(st.PrecopyRounds))
			// Pages absent since the setup that the guest took and wrote
			// again are settled in the pause, not here.
			r.dirty = s.presentOnly(r.dirty)
			if err := s.sendPages(wire.PhasePrecopy, r.dirty); err != nil {
				return fmt.Errorf("pre-copy round %d: %w", st.PrecopyRounds, err)
			}
			st.PrecopyRounds++
		}
	} else {
		st.SetupTimeMs = ms(time.Since(s.start))
		if r.rec == nil {
			// (With a recording the dirty log serves the recorder, which
			// consumes it: the core pages then all go in the pause.)
			if err := s.sendEarlyCore(r, st); err != nil {
				return err
			}
		}
	}
	if r.rec != nil {
		if err := s.finishRecording(r.ctx, r.rec, st); err != nil {
			return err
		}
		more, err := r.rec.DirtyPages(nil)
		if err != nil {
			return err
		}
		if s.opt.Mode == wire.ModePostcopy {
			// Tracking served the recording only: switch it off while the
			// domain still runs, outside the downtime.
			r.logOn = false
			if err := s.dom.StopDirtyLog(); err != nil {
				return fmt.Errorf("stop dirty log: %w", err)
			}
		} else {
			r.dirty = append(r.dirty, more...)
		}
	}
	return nil
}

// sendStop is the switchover's sending while the domain is paused: the
// last dirty pages or discards, the core pages, the page set's changes,
// the core state and SWITCHOVER.
func (s *source) sendStop(r *srcRun) error {
	st := r.st
	s.dbg(r, "paused")
	// Switching tracking off can take a while (it touches every page-table
	// entry); the paused domain writes nothing, so it waits until the
	// destination runs (or, on failure, until the outcome).
	stopLater := func() {
		r.logOn = false
		r.stopLog = func() {
			r.stopLog = func() {}
			if err := s.dom.StopDirtyLog(); err != nil && s.opt.Logf != nil {
				s.opt.Logf("stop dirty log: %v", err)
			}
		}
	}
	if s.opt.Mode != wire.ModePostcopy {
		// The loop left the last round's dirty pages unsent; add the
		// writes between that round and the pause.
		last, err := s.dom.DirtyPages(nil)
		if err != nil {
			return fmt.Errorf("final dirty log: %w", err)
		}
		stopLater()
		r.dirty = prepage.SortedUnique(append(r.dirty, last...))
		s.dbg(r, fmt.Sprintf("final dirty log: %d pages", len(r.dirty)))
	} else if s.early != nil {
		// The early core pages written since they were sent go again
		// with the core pages; the others are there already.
		last, err := s.dom.DirtyPages(nil)
		if err != nil {
			return fmt.Errorf("dirty log of the early core pages: %w", err)
		}
		stopLater()
		s.mu.Lock()
		for _, p := range last {
			if p < s.info.NumPages && s.early.Test(p) {
				s.markUnsent(p)
				st.EarlyCoreRedirtied++
			}
		}
		s.mu.Unlock()
		s.dbg(r, fmt.Sprintf("early core pages: %d of %d written since they were sent", st.EarlyCoreRedirtied, st.EarlyCorePages))
	}

	// The page set as it is in the pause: pages the guest gave back since
	// the setup are not sent (the destination drops them), pages it took
	// back are sent now.
	// The scan of the paused domain's page set runs beside the core
	// state and core pages (under emulation it takes a while); post-copy
	// needs its answer only before the switchover, the other modes before
	// the stop-phase pages.
	scan := s.scanPageSet()
	var added []uint64
	dirty := r.dirty
	if s.opt.Mode != wire.ModePostcopy {
		var err error
		if added, err = s.changePageSet(st, scan); err != nil {
			return err
		}
		dirty = s.presentOnly(dirty)
		s.dbg(r, fmt.Sprintf("page set: %d dropped, %d added", st.DroppedPages, len(added)))
	}

	switch s.opt.Mode {
	case wire.ModePrecopy:
		dirty = prepage.SortedUnique(append(dirty, added...))
		added = nil
		if err := s.sendPages(wire.PhaseStop, dirty); err != nil {
			return fmt.Errorf("stop-and-copy: %w", err)
		}
	case wire.ModeHybrid:
		// Pages re-dirtied since they were sent: the destination forgets
		// them and they go again, once, in post-copy.
		for i := 0; i < len(dirty); i += wire.MaxPFNs {
			chunk := dirty[i:min(len(dirty), i+wire.MaxPFNs)]
			s.bulkMu.Lock()
			err := s.bw.WritePFNs(wire.TypeDiscard, chunk)
			s.bulkMu.Unlock()
			if err != nil {
				return fmt.Errorf("discard list: %w", err)
			}
		}
		s.mu.Lock()
		for p := uint64(0); p < s.info.NumPages; p++ {
			s.markSent(p) // round 0 sent every page (absent ones: never)
		}
		for _, p := range dirty {
			s.markUnsent(p)
		}
		for _, p := range added {
			s.markUnsent(p) // joined in the pause: goes with the core pages
		}
		s.mu.Unlock()
		st.DiscardedPages = uint64(len(dirty))
	}
	s.dbg(r, "stop-phase pages/discards queued")
	core, err := s.dom.CoreState()
	if err != nil {
		return fmt.Errorf("read core state: %w", err)
	}
	s.dbg(r, "core state read")
	corePFNs, err := s.dom.CorePFNs()
	if err != nil {
		return fmt.Errorf("list core pages: %w", err)
	}
	s.dbg(r, fmt.Sprintf("%d core pages listed", len(corePFNs)))
	if s.opt.Mode != wire.ModePrecopy && len(corePFNs)+len(added) > 0 {
		var need []uint64
		s.mu.Lock()
		for _, p := range prepage.SortedUnique(append(corePFNs, added...)) {
			if p < s.info.NumPages && !s.absent.Test(p) && s.markSent(p) {
				need = append(need, p)
			}
		}
		s.mu.Unlock()
		if err := s.sendPages(wire.PhaseStop, need); err != nil {
			return fmt.Errorf("core pages: %w", err)
		}
		st.CorePages = uint64(len(need))
		s.dbg(r, "core pages sent")
	}
	if s.opt.Mode == wire.ModePostcopy {
		added, err := s.changePageSet(st, scan)
		if err != nil {
			return err
		}
		var need []uint64
		s.mu.Lock()
		for _, p := range added {
			if s.markSent(p) {
				need = append(need, p)
			}
		}
		s.mu.Unlock()
		if err := s.sendPages(wire.PhaseStop, need); err != nil {
			return fmt.Errorf("pages the guest took again: %w", err)
		}
		s.dbg(r, fmt.Sprintf("page set: %d dropped, %d added", st.DroppedPages, len(added)))
	}
	// From here the destination may hold the core state and, with
	// recovery, wait for this side after a break (tellGaveUp).
	s.switchTried.Store(true)
	s.bulkMu.Lock()
	err = s.bw.WriteBlob(wire.TypeCoreState, core)
	if err == nil {
		err = s.bw.WriteSwitchover(wire.Switchover{PausedUnixNano: r.pausedAt.UnixNano(), PagesSent: s.pagesSent.Load()})
	}
	if err == nil {
		err = s.bw.Flush()
	}
	s.bulkMu.Unlock()
	if err != nil {
		return fmt.Errorf("send core state: %w", err)
	}
	s.dbg(r, "switchover sent")
	return nil
}

// afterResume runs once the destination has resumed: the checksums of the
// frozen memory (beside the rest), post-copy's push and fault service until
// every page has been sent once, then the checksums.
func (s *source) afterResume(r *srcRun) error {
	// Memory is frozen since the pause: checksum it while the rest goes
	// on (not before resume, where it would compete with the downtime).
	// After a recovery this runs again; the checksums are computed once.
	if r.crcs == nil {
		r.crcs = make(chan crcResult, 1)
		go func() {
			c, err := s.checksums()
			r.crcs <- crcResult{c, err}
		}()
		r.stopBytes = s.bw.Written()
	}
	if s.opt.Mode != wire.ModePrecopy {
		s.phase.Store("postcopy")
		if err := s.postcopy(); err != nil {
			return err
		}
	}
	s.phase.Store("verify")
	if r.crc == nil {
		res := <-r.crcs
		r.crc = &res
	}
	if r.crc.err != nil {
		return &backendError{fmt.Errorf("checksum source memory: %w", r.crc.err)}
	}
	table := r.crc.table
	s.bulkMu.Lock()
	defer s.bulkMu.Unlock()
	var err error
	for i := 0; i < len(table) || i == 0; i += wire.MaxChecksums {
		end := min(len(table), i+wire.MaxChecksums)
		if err = s.bw.WriteDone(wire.Checksums{FirstPFN: uint64(i), CRCs: table[i:end]}, end == len(table)); err != nil {
			break
		}
	}
	if err == nil {
		err = s.bw.Flush()
	}
	if err != nil {
		return fmt.Errorf("send checksums: %w", err)
	}
	return nil
}

// awaitAck waits for the destination's ACK and the end of the fault
// service, and fills in the figures.
func (s *source) awaitAck(r *srcRun) error {
	actx, cancel := context.WithTimeout(r.ctx, s.opt.AckTimeout)
	err := s.wait(actx, s.acked, "ACK")
	cancel()
	if err != nil {
		return err
	}
	// BYE tells a destination that recovers broken links that the ACK
	// arrived (else it would wait for this source to come back for it).
	// A destination that does not wait for it has closed already.
	// With recovery, a BYE that cannot be written is a broken link like
	// any other: the destination would wait for it in vain, so the link
	// is made again (the destination says it is acking) and BYE is sent
	// on the new one.
	s.bulkMu.Lock()
	berr := s.bw.WriteRecord(wire.TypeBye)
	if berr == nil {
		berr = s.bw.Flush()
	}
	s.bulkMu.Unlock()
	if berr != nil && s.opt.Reconnect != nil {
		return fmt.Errorf("send BYE: %w", berr)
	}
	if s.faultDone != nil {
		// The destination closes the urgent connection once it holds
		// every page, which ends the fault server.
		select {
		case err := <-s.faultDone:
			if err != nil {
				return fmt.Errorf("fault service: %w", err)
			}
		case <-time.After(5 * time.Second):
			return errors.New("destination acknowledged but kept the urgent connection open")
		}
	}
	st := r.st
	st.TotalTimeMs = ms(time.Since(s.start))
	st.PrecopyBytes = r.precopyBytes
	st.DowntimeBytes = r.stopBytes - r.precopyBytes
	st.PostcopyBytes = s.bw.Written() - r.stopBytes + s.uw.Written()
	st.TotalBytes = s.bw.Written() + s.uw.Written()
	st.PagesSent = s.pagesSent.Load()
	st.ZeroPages = s.zeroPages.Load()
	st.UnreadableReads = s.unreadableReads.Load()
	st.merge(&s.destStats)
	st.MismatchedPages = s.ack.Mismatched
	st.ResentPages = s.resent.Load()
	st.Verified = s.ack.Mismatched == 0 && s.ack.PagesReceived == s.info.NumPages-s.absentCount()
	return nil
}

// sendEarlyCore sends the core pages the source knows before the pause
// (EarlyCorer), with the dirty log on so that the pause sends again only
// those written since. They travel as pre-copy pages: the destination may
// overwrite them until it resumes.
func (s *source) sendEarlyCore(r *srcRun, st *Stats) error {
	ec, ok := s.dom.(EarlyCorer)
	if !ok {
		return nil
	}
	var early []uint64
	for _, p := range prepage.SortedUnique(ec.EarlyCorePFNs()) {
		if p < s.info.NumPages && !s.absent.Test(p) {
			early = append(early, p)
		}
	}
	if len(early) == 0 {
		return nil
	}
	if err := s.dom.StartDirtyLog(); err != nil {
		return fmt.Errorf("start dirty log for the early core pages: %w", err)
	}
	r.logOn = true // (switched off by the outcome if this fails)
	if err := s.sendPages(wire.PhasePrecopy, early); err != nil {
		return fmt.Errorf("early core pages: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// A page that could not be read was not sent: the pause settles it.
	unread := map[uint64]bool{}
	for _, p := range s.unreadable {
		unread[p] = true
	}
	s.early = prepage.NewBitmap(s.info.NumPages)
	for _, p := range early {
		if !unread[p] {
			s.early.Set(p)
			s.markSent(p)
			st.EarlyCorePages++
		}
	}
	return nil
}

// rootCause prefers the first recorded failure (often the destination's
// own ERROR record) over the error it caused here, such as a write on the
// connection that failure closed.
func (s *source) rootCause(err error) error {
	f := s.failure()
	if f == nil || errors.Is(err, f) {
		return err
	}
	return fmt.Errorf("%w (then: %v)", f, err)
}

// finishRecording waits out the recording window (Options.Record), or
// less once the trajectory has converged (see converged in record.go),
// stops the recorder and builds the pre-record plan and the policy that
// serves it.
//
// Planning takes tens of milliseconds while the domain keeps running, and a
// guest streaming through memory moves hundreds of pages in that time. So
// one more dirty-log round is read after the plan is built and the plan is
// advanced along it (prerecord.Plan.Advance): window pages the guest has
// already walked past go to the end. That round also joins the pending
// dirty pages, so hybrid mode loses none.
func (s *source) finishRecording(ctx context.Context, rec *recorder, st *Stats) error {
	tick := time.NewTicker(s.opt.RecordInterval)
	defer tick.Stop()
	for time.Since(rec.start) < s.opt.Record && !rec.converged() {
		select {
		case <-tick.C:
		case <-ctx.Done():
			rec.finish()
			return ctx.Err()
		case <-s.failedC:
			rec.finish()
			return s.failure()
		}
	}
	// One last sample so that the newest accesses are in.
	if err := rec.sample(); err != nil {
		rec.finish()
		return err
	}
	traj, err := rec.finish()
	if err != nil {
		return err
	}
	t0 := time.Now()
	plan := planFromTrajectory(s.spec, traj, s.info.NumPages)
	late, err := rec.sampleRound()
	if err != nil {
		return err
	}
	plan.Advance(late, planOptions(s.spec))
	po := s.opt.Policy
	po.Priority = plan.Order
	s.mu.Lock()
	err = s.newPolicy(po)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	st.RecordTimeMs = ms(time.Since(rec.start))
	st.PlanTimeMs = ms(time.Since(t0))
	st.RecordRounds = int(rec.round)
	st.TrajectoryLen = uint64(len(traj))
	st.RecordedPages = uint64(plan.Recorded)
	st.PredictedPages = uint64(plan.Predicted)
	st.HotspotPages = uint64(plan.Hotspot)
	st.Hotspots = len(plan.Hotspots)
	st.Paths = len(plan.Paths)
	return nil
}

func (s *source) openStreams() error {
	if err := wire.WriteHeader(s.bulk, wire.ChannelBulk); err != nil {
		return fmt.Errorf("bulk connection: %w", err)
	}
	if err := wire.WriteHeader(s.urgent, wire.ChannelUrgent); err != nil {
		return fmt.Errorf("urgent connection: %w", err)
	}
	s.bulkMu.Lock()
	defer s.bulkMu.Unlock()
	s.opened = true
	err := s.bw.WriteDomainHeader(&wire.DomainHeader{
		Mode: s.opt.Mode, PageSize: s.info.PageSize, NumPages: s.info.NumPages,
		VCPUs: s.info.VCPUs, Name: s.info.Name, Backend: s.info.Backend, Config: s.info.Config,
		Absent: wire.RangesOf(prepage.SortedUnique(s.info.Absent)),
	})
	if err == nil {
		err = s.bw.Flush()
	}
	return err
}

func (s *source) wait(ctx context.Context, ch chan struct{}, what string) error {
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		s.fail(ctx.Err())
		return fmt.Errorf("waiting for %s from the destination: %w", what, ctx.Err())
	case <-s.failedC:
		return fmt.Errorf("waiting for %s from the destination: %w", what, s.failure())
	}
}

// readReverse reads what the destination sends back on the bulk
// connection: credits, READY, RESUMED, STATS, ACK, ERROR.
func (s *source) readReverse(r *wire.Reader, win *window, done chan struct{}) {
	defer close(done)
	for {
		rec, err := r.Next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("destination closed the connection")
			}
			s.fail(fmt.Errorf("bulk connection: %w", err))
			return
		}
		s.alive.heard()
		switch rec.Type {
		case wire.TypeKeepalive:
		case wire.TypeCredit:
			v, err := wire.DecodeU64(rec.Body)
			if err != nil {
				s.fail(err)
				return
			}
			win.credit(v)
		case wire.TypeCreated:
			close(s.created)
		case wire.TypeReady:
			close(s.ready)
		case wire.TypeResumed:
			close(s.resumed)
		case wire.TypeStats:
			blob, err := wire.DecodeBlob(rec.Body)
			if err == nil {
				err = json.Unmarshal(blob, &s.destStats)
			}
			if err != nil {
				s.fail(fmt.Errorf("destination stats: %w", err))
				return
			}
		case wire.TypeAck:
			a, err := wire.DecodeAck(rec.Body)
			if err != nil {
				s.fail(err)
				return
			}
			select {
			case <-s.acked:
				// The ACK again, on a link made after the first one's
				// BYE could not be sent: the first one stands.
			default:
				s.ack = a
				close(s.acked)
			}
			return
		case wire.TypeError, wire.TypeNotResumed:
			msg, _ := wire.DecodeBlob(rec.Body)
			if rec.Type == wire.TypeNotResumed {
				close(s.notResumed)
			}
			s.fail(fmt.Errorf("destination: %s", msg))
			return
		default:
			s.fail(fmt.Errorf("unexpected %v record from the destination", rec.Type))
			return
		}
	}
}

// readBatch reads pages and builds a batch: entries with ZeroFlag for
// zero pages, data for the others.
//
// Only a pre-copy round may meet pages it cannot read (the running guest
// changes its page set); they are left out and remembered. In the pause
// and after it the page set is settled, so an unreadable page there is an
// error: it is never sent as anything.
func (s *source) readBatch(phase wire.Phase, pfns []uint64, buf []byte, entries []uint64, data []byte) ([]uint64, []byte, error) {
	ps := int(s.info.PageSize)
	buf = buf[:len(pfns)*ps]
	var skip []uint64
	err := s.dom.ReadPages(pfns, buf)
	// After GO the paused source cannot change: a page that does not read
	// is a mapping that failed for a moment, or one that never will. A few
	// more tries, then the migration stops (the page is never sent as
	// anything).
	for try := 0; err != nil && try < 5 && (phase == wire.PhasePush || phase == wire.PhaseFault); try++ {
		time.Sleep(50 * time.Millisecond << try)
		err = s.dom.ReadPages(pfns, buf)
	}
	if err != nil {
		var ue *UnreadableError
		if !errors.As(err, &ue) || phase != wire.PhasePrecopy {
			return nil, nil, &backendError{fmt.Errorf("read %d pages from pfn %#x: %w", len(pfns), pfns[0], err)}
		}
		// The running guest gave these back (or is about to): what they
		// hold is not known, so nothing is sent; the pause decides.
		skip = ue.PFNs
		s.unreadableReads.Add(uint64(len(skip)))
		s.mu.Lock()
		s.unreadable = append(s.unreadable, skip...)
		s.mu.Unlock()
	}
	entries, data = entries[:0], data[:0]
	sent := 0
	s.mu.Lock()
	for _, p := range pfns {
		if (len(skip) == 0 || !slices.Contains(skip, p)) && !s.sentEver.Set(p) {
			s.resent.Add(1)
		}
	}
	s.mu.Unlock()
	for i, p := range pfns {
		if len(skip) > 0 && slices.Contains(skip, p) {
			continue
		}
		sent++
		pg := buf[i*ps : (i+1)*ps]
		if bytes.Equal(pg, s.zeroPage) {
			entries = append(entries, p|wire.ZeroFlag)
			s.zeroPages.Add(1)
			continue
		}
		entries = append(entries, p)
		data = append(data, pg...)
	}
	s.pagesSent.Add(uint64(sent))
	return entries, data, nil
}

// writeBulk sends one batch on the bulk connection within the window.
func (s *source) writeBulk(phase wire.Phase, entries []uint64, data []byte) error {
	s.failMu.Lock()
	win := s.win
	s.failMu.Unlock()
	if err := win.acquire(uint64(len(data) + 8*len(entries) + 48)); err != nil {
		return err
	}
	s.bulkMu.Lock()
	defer s.bulkMu.Unlock()
	before := s.bw.Written()
	if err := s.bw.WritePageBatch(phase, s.info.PageSize, entries, data); err != nil {
		return err
	}
	// Account the exact record size, which is what the destination
	// reports as consumed.
	win.adjust(s.bw.Written() - before - uint64(len(data)+8*len(entries)+48))
	return s.bw.Flush()
}

// sendPages sends pfns in order on the bulk connection.
func (s *source) sendPages(phase wire.Phase, pfns []uint64) error {
	n := s.opt.BatchPages
	buf := make([]byte, n*int(s.info.PageSize))
	var entries []uint64
	var data []byte
	for i := 0; i < len(pfns); i += n {
		chunk := pfns[i:min(len(pfns), i+n)]
		var err error
		entries, data, err = s.readBatch(phase, chunk, buf, entries, data)
		if err != nil {
			return err
		}
		if len(entries) == 0 {
			continue
		}
		if err := s.writeBulk(phase, entries, data); err != nil {
			return err
		}
	}
	return nil
}

// postcopy pushes every unsent page in policy order while serving demand
// faults on the urgent connection, until every page has been sent once.
func (s *source) postcopy() error {
	s.faultDone = make(chan error, 1)
	_, urgent := s.conns()
	go func() { s.faultDone <- s.serveFaults(urgent) }()

	n := s.opt.BatchPages
	buf := make([]byte, n*int(s.info.PageSize))
	pfns := make([]uint64, 0, n)
	var entries []uint64
	var data []byte
	for {
		pfns = pfns[:0]
		s.mu.Lock()
		for len(pfns) < n {
			p, ok := s.policy.Next()
			if !ok {
				break
			}
			if !s.sent.Set(p) {
				// The policy learns what was sent from markSent alone;
				// a page it offers twice is still sent once.
				continue
			}
			pfns = append(pfns, p)
		}
		s.mu.Unlock()
		if len(pfns) == 0 {
			break
		}
		var err error
		entries, data, err = s.readBatch(wire.PhasePush, pfns, buf, entries, data)
		if err == nil {
			err = s.writeBulk(wire.PhasePush, entries, data)
		}
		if err != nil {
			return fmt.Errorf("post-copy push: %w", err)
		}
	}
	// Every page has been sent (pushed or as a fault reply). The fault
	// server keeps running until the destination closes the urgent
	// connection, which it does once it holds every page; errors there
	// after this point are not the migration's.
	return nil
}

// serveFaults answers FAULT_REQUEST records: each requested page not yet
// sent goes back at once on the urgent connection, and every request moves
// the pre-paging pivot.
func (s *source) serveFaults(urgent io.Reader) error {
	r := wire.NewReader(urgent)
	buf := make([]byte, wire.MaxBatchPages*int(s.info.PageSize))
	var pfns, need, entries []uint64
	var data []byte
	for {
		rec, err := r.Next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("urgent connection: %w", err)
		}
		if rec.Type != wire.TypeFaultRequest {
			return fmt.Errorf("urgent connection: unexpected %v", rec.Type)
		}
		pfns, err = wire.DecodePFNs(rec.Body, pfns)
		if err != nil {
			return fmt.Errorf("urgent connection: %w", err)
		}
		need = need[:0]
		s.mu.Lock()
		for _, p := range pfns {
			if p >= s.info.NumPages {
				s.mu.Unlock()
				return fmt.Errorf("destination asked for pfn %#x beyond the domain's %d pages", p, s.info.NumPages)
			}
			s.policy.Fault(p)
			if s.markSent(p) {
				need = append(need, p)
			}
		}
		s.mu.Unlock()
		s.faultsSeen.Add(uint64(len(pfns)))
		for i := 0; i < len(need); i += wire.MaxBatchPages {
			chunk := need[i:min(len(need), i+wire.MaxBatchPages)]
			entries, data, err = s.readBatch(wire.PhaseFault, chunk, buf, entries, data)
			if err == nil {
				err = s.uw.WritePageBatch(wire.PhaseFault, s.info.PageSize, entries, data)
			}
			if err != nil {
				return fmt.Errorf("fault reply: %w", err)
			}
		}
		if len(need) > 0 {
			if err := s.uw.Flush(); err != nil {
				return fmt.Errorf("fault reply: %w", err)
			}
		}
	}
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checksums computes the CRC-32C of every page of the paused domain.
func (s *source) checksums() ([]uint32, error) {
	const chunk = 256
	ps := int(s.info.PageSize)
	out := make([]uint32, s.info.NumPages)
	buf := make([]byte, chunk*ps)
	pfns := make([]uint64, 0, chunk)
	for base := uint64(0); base < s.info.NumPages; base += chunk {
		pfns = pfns[:0]
		s.mu.Lock()
		for p := base; p < min(base+chunk, s.info.NumPages); p++ {
			if !s.absent.Test(p) {
				pfns = append(pfns, p)
			}
		}
		s.mu.Unlock()
		if len(pfns) == 0 {
			continue
		}
		b := buf[:len(pfns)*ps]
		if err := s.dom.ReadPages(pfns, b); err != nil {
			return nil, err
		}
		for i, p := range pfns {
			out[p] = crc32.Checksum(b[i*ps:(i+1)*ps], castagnoli)
		}
	}
	return out, nil
}

// changePageSet asks a PageSetChanger source, in the pause, how its page
// set changed since the setup, tells the destination (PAGE_SET records)
// and returns the pages that joined (absent before): they go in the
// pause like core pages. Pages a pre-copy round could not read must have
// left the set by now; one that did not is unreadable RAM, and the
// migration stops here, before GO, with the reason.
func (s *source) changePageSet(st *Stats, scan func() ([]uint64, []uint64, error)) ([]uint64, error) {
	dropped, added, err := scan()
	if err != nil {
		return nil, fmt.Errorf("page set in the pause: %w", err)
	}
	s.mu.Lock()
	var drop, add []uint64
	for _, p := range prepage.SortedUnique(dropped) {
		if p < s.info.NumPages && !s.absent.Test(p) {
			s.absent.Set(p)
			s.markSent(p)
			drop = append(drop, p)
		}
	}
	for _, p := range prepage.SortedUnique(added) {
		if p < s.info.NumPages && s.absent.Test(p) {
			s.absent.Clear(p)
			s.markUnsent(p)
			add = append(add, p)
		}
	}
	var still []uint64
	for _, p := range prepage.SortedUnique(s.unreadable) {
		if !s.absent.Test(p) {
			still = append(still, p)
		}
	}
	s.unreadable = nil
	s.mu.Unlock()
	st.DroppedPages, st.AddedPages = uint64(len(drop)), uint64(len(add))
	// Tell the destination before any page of the pause goes.
	for d, a := drop, add; len(d)+len(a) > 0; {
		ps := wire.PageSet{Dropped: d[:min(len(d), wire.MaxPFNs)]}
		ps.Added = a[:min(len(a), wire.MaxPFNs-len(ps.Dropped))]
		d, a = d[len(ps.Dropped):], a[len(ps.Added):]
		s.bulkMu.Lock()
		err := s.bw.WritePageSet(ps)
		s.bulkMu.Unlock()
		if err != nil {
			return nil, fmt.Errorf("send the page set: %w", err)
		}
	}
	if len(still) > 0 {
		// Read once more, paused: a page that reads now is simply sent
		// with the rest of the pause's pages.
		buf := make([]byte, int(s.info.PageSize))
		for _, p := range still {
			if err := s.dom.ReadPages([]uint64{p}, buf); err != nil {
				return nil, fmt.Errorf("page %d is still part of the domain but cannot be read in the pause (nothing was sent for it): %w", p, err)
			}
			add = append(add, p)
		}
		s.mu.Lock()
		for _, p := range still {
			s.markUnsent(p)
		}
		s.mu.Unlock()
	}
	return add, nil
}

// scanPageSet starts PageSetChange of a PageSetChanger source and returns
// the function that waits for its answer.
func (s *source) scanPageSet() func() (dropped, added []uint64, err error) {
	c, ok := s.dom.(PageSetChanger)
	if !ok {
		return func() ([]uint64, []uint64, error) { return nil, nil, nil }
	}
	type result struct {
		dropped, added []uint64
		err            error
	}
	ch := make(chan result, 1)
	go func() {
		d, a, err := c.PageSetChange()
		ch <- result{d, a, err}
	}()
	return func() ([]uint64, []uint64, error) {
		r := <-ch
		return r.dropped, r.added, r.err
	}
}

// presentOnly filters out pages that left the domain.
func (s *source) presentOnly(pfns []uint64) []uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := pfns[:0]
	for _, p := range pfns {
		if !s.absent.Test(p) {
			out = append(out, p)
		}
	}
	return out
}

func (s *source) absentCount() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.absent.Count()
}
