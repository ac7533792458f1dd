package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/link"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// RunConfig is one lab migration: a domain, how to migrate it, and over
// what link.
type RunConfig struct {
	Domain Config
	Engine engine.Options
	Link   *link.Link // nil: loopback
	// Warmup is how long the workload runs before the migration starts
	// (default 1 s); After is how long the destination runs once every
	// page has arrived, to show the guest keeps going (default 300 ms).
	Warmup, After time.Duration
	// Recover turns recovery after a broken link on at both sides, for
	// this long at the source (the destination waits 5 s more);
	// ResetAfterGo resets the link (a TCP reset of both connections) once
	// the source has written each of these bulk byte counts after GO.
	Recover      time.Duration
	ResetAfterGo []uint64
	// ResetAt resets the link the first time the source passes each of
	// these protocol points (see FaultPoint).
	ResetAt []FaultPoint
	// Outage, if set, makes the faults of ResetAfterGo and ResetAt
	// outages instead of resets: the link is down for this long, silent,
	// with no FIN or RST (a pulled cable).
	Outage time.Duration
}

// Result is a lab migration's outcome.
type Result struct {
	Stats *engine.Stats
	// OpsAtStart is the progress counter when the migration started;
	// OpsAtEnd after the destination ran for After; Continued says the
	// counter grew at the destination after the migration.
	OpsAtStart, OpsAtEnd uint64
	Continued            bool
	// Resets is how many times the link was reset or went down
	// (ResetAfterGo, ResetAt).
	Resets int
	// DetectedAfter is, for an outage, how long after the link went down
	// the source gave it up (closed it); 0 if it did not while it was
	// down.
	DetectedAfter time.Duration
	// SourceRuns and DestRuns say which copies of the guest were running
	// when the migration had ended (before Run ended them): exactly one
	// must be.
	SourceRuns, DestRuns bool
	// Where is where the engine said the domain was after a failed
	// migration (zero after a successful one).
	Where engine.Where
}

// Run migrates a fresh lab domain from a source to a destination in this
// process's children, over l, and reports.
//
// When ctx is done Run stops: it starts nothing more, and whatever it
// returns, both lab guests it started have been ended and waited for, so
// that a command interrupted by a signal leaves no child behind.
func Run(ctx context.Context, rc RunConfig) (*Result, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if rc.Warmup <= 0 {
		rc.Warmup = time.Second
	}
	if rc.After <= 0 {
		rc.After = 300 * time.Millisecond
	}
	l := rc.Link
	if l == nil {
		l = link.Loopback()
	}
	src, err := StartSource(rc.Domain)
	if err != nil {
		return nil, fmt.Errorf("start source lab domain: %w", err)
	}
	srcDone := false
	defer func() {
		if !srcDone {
			src.Kill()
		}
	}()
	select {
	case <-time.After(rc.Warmup):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	r0, err := src.Report()
	if err != nil {
		return nil, err
	}

	ln, err := l.ListenDst(0)
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	type destResult struct {
		dom *Dest
		st  *engine.DestStats
		err error
	}
	dch := make(chan destResult, 1)
	dopt := engine.DestOptions{ProgressTimeout: rc.Engine.ProgressTimeout, LinkTimeout: rc.Engine.LinkTimeout}
	if rc.Recover > 0 {
		dopt.Reattach = reattacher(ln)
		// Longer than the source tries, so that it gives up first.
		dopt.RecoverTimeout = rc.Recover + 5*time.Second
	}
	go func() {
		var dom *Dest
		c1, c2, err := accept2(ln)
		if err != nil {
			dch <- destResult{err: err}
			return
		}
		st, err := engine.RunDest(ctx, c1, c2, func(h *wire.DomainHeader) (engine.Dest, error) {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			d, err := NewDest(h)
			dom = d
			if err != nil {
				return nil, err
			}
			return d, nil
		}, dopt)
		if err != nil {
			// A source still waiting on the streams sees the end.
			c1.Close()
			c2.Close()
		}
		dch <- destResult{dom: dom, st: st, err: err}
	}()
	// Whatever happens below, the destination's guest, if it started, is
	// ended before Run returns (a failed receive may leave it running: the
	// engine keeps a resumed domain, which the lab has no use for).
	var dr destResult
	destWaited := false
	waitDest := func() destResult {
		if !destWaited {
			dr, destWaited = <-dch, true
		}
		return dr
	}
	defer func() {
		ln.Close()
		if d := waitDest().dom; d != nil {
			d.Exit()
		}
	}()

	rs := &resetter{l: l, addr: ln.Addr().String(), at: rc.ResetAfterGo, points: map[FaultPoint]bool{}, outage: rc.Outage}
	for _, p := range rc.ResetAt {
		rs.points[p] = true
	}
	bulk, urgent, err := rs.dial()
	if err != nil {
		return nil, err
	}
	eo := rc.Engine
	if rc.Recover > 0 {
		eo.Reconnect = rs.reconnect
		eo.RecoverTimeout = rc.Recover
	}
	if len(rc.ResetAfterGo) > 0 || len(rc.ResetAt) > 0 {
		onGo := eo.OnGo
		eo.OnGo = func() {
			rs.goSent()
			if onGo != nil {
				onGo()
			}
		}
	}
	st, serr := engine.RunSource(ctx, src, bulk, urgent, eo)
	if serr == nil {
		srcDone = true // destroyed by the engine
	} else {
		// Unblock a destination still reading the streams.
		bulk.Close()
		urgent.Close()
	}
	dr = waitDest()
	if serr != nil || dr.err != nil {
		res := &Result{Stats: st, Resets: int(rs.resets.Load()), DetectedAfter: time.Duration(rs.detected.Load())}
		res.Where, _ = engine.WhereOf(serr)
		res.SourceRuns, res.DestRuns = runs(src, srcDone), dr.dom != nil && runs(dr.dom, false)
		return res, errors.Join(labOutcome(serr), wrapDest(dr.err))
	}
	res := &Result{Stats: st, OpsAtStart: r0.Ops, Resets: int(rs.resets.Load()), DetectedAfter: time.Duration(rs.detected.Load())}
	res.SourceRuns = runs(src, srcDone)
	r1, err := dr.dom.Report()
	if err != nil {
		return res, err
	}
	select {
	case <-time.After(rc.After):
	case <-ctx.Done():
		return res, ctx.Err()
	}
	r2, err := dr.dom.Report()
	// On a loaded machine the guest's process may not have run yet: a
	// counter that has not moved gets a few seconds more.
	for end := time.Now().Add(3 * time.Second); err == nil && r2.Running && r2.Ops <= r1.Ops && time.Now().Before(end); {
		time.Sleep(50 * time.Millisecond)
		r2, err = dr.dom.Report()
	}
	if err != nil {
		return res, err
	}
	res.OpsAtEnd = r2.Ops
	res.DestRuns = r2.Running && r2.Ops > r1.Ops
	res.Continued = r2.Running && r2.Ops > r1.Ops && r1.Ops >= r0.Ops
	st.IntegrityErrors = r2.Integrity
	st.Progress = r2.Ops
	if l.RateBps > 0 {
		st.SetLink(l.RateBps)
	}
	return res, nil
}

// runs says whether a lab guest's copy runs: it answers and says so, and
// its progress counter moves.
func runs(g interface{ Report() (Report, error) }, gone bool) bool {
	if gone {
		return false
	}
	r1, err := g.Report()
	if err != nil || !r1.Running {
		return false
	}
	// On a loaded machine the guest's process may not run for a while:
	// its counter has a few seconds to move.
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); {
		time.Sleep(50 * time.Millisecond)
		r2, err := g.Report()
		if err != nil || !r2.Running {
			return false
		}
		if r2.Ops > r1.Ops {
			return true
		}
	}
	return false
}

// labOutcome rewords the engine's outcome for lab domains: the engine
// says where a Xen domain is after a failure, but a lab domain lives in a
// process of this command, and Run ends both copies whatever happened.
func labOutcome(err error) error {
	var e *engine.Error
	if err == nil || !errors.As(err, &e) {
		return err
	}
	switch e.Where {
	case engine.RunsAtSource:
		return fmt.Errorf("lab migration failed before the switchover; the lab domain ran on at the source until this command ended it: %w", e.Err)
	case engine.PausedAtSource:
		return fmt.Errorf("lab migration failed before the switchover and the lab domain could not be resumed; this command ended it: %w", e.Err)
	case engine.RunsAtDestination:
		return fmt.Errorf("lab migration complete and verified, but ending the source copy failed; this command ended both lab copies: %w", e.Err)
	}
	return fmt.Errorf("lab migration failed after the switchover; this command ended both lab copies (a lab domain lives only as long as the command): %w", e.Err)
}

func wrapDest(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("destination: %w", err)
}

func accept2(ln net.Listener) (net.Conn, net.Conn, error) {
	c1, err := ln.Accept()
	if err != nil {
		return nil, nil, fmt.Errorf("accept: %w", err)
	}
	c2, err := ln.Accept()
	if err != nil {
		c1.Close()
		return nil, nil, fmt.Errorf("accept: %w", err)
	}
	// Which one is urgent is only known from the stream header; the
	// destination's bulk direction carries only small credits, so both
	// may be marked.
	for _, c := range []net.Conn{c1, c2} {
		if err := link.SetUrgent(c); err != nil {
			c1.Close()
			c2.Close()
			return nil, nil, err
		}
	}
	return c1, c2, nil
}
