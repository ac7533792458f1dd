package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/dsb"
	"github.com/xl-postcopy/xl-postcopy/xen/dsb/control"
	"github.com/xl-postcopy/xl-postcopy/xen/xenstore"
)

// options are the daemon's settings; flags.go fills them.
type options struct {
	period        time.Duration
	heartbeat     time.Duration
	settleTimeout time.Duration
	reassertDelay time.Duration // after memory/target is re-announced
	procRoot      string
	sysRoot       string
	xenstorePath  string // "" picks like xenstore.Open
	once          bool
	dryRun        bool
	kpageflags    bool
	maxKB         uint64 // 0: from xenstore max_kb, else the target at start
	reserveMinKB  uint64
	reserveFrac   float64
	floorMinKB    uint64
	floorFrac     float64
	stepMinKB     uint64
}

func (o options) meminfoPath() string    { return filepath.Join(o.procRoot, "meminfo") }
func (o options) pressurePath() string   { return filepath.Join(o.procRoot, "pressure", "memory") }
func (o options) kpageflagsPath() string { return filepath.Join(o.procRoot, "kpageflags") }
func (o options) balloonDir() string {
	return filepath.Join(o.sysRoot, "devices", "system", "xen_memory", "xen_memory0")
}
func (o options) targetPath() string  { return filepath.Join(o.balloonDir(), "target_kb") }
func (o options) currentPath() string { return filepath.Join(o.balloonDir(), "info", "current_kb") }

type daemon struct {
	opt        options
	log        *slog.Logger
	out        io.Writer // decisions in --dry-run/--once
	xs         *xenstore.Client
	pol        *dsb.Policy
	origTarget uint64
	start      time.Time
	lastNonce  string
	lastPub    time.Time
	pubTarget  uint64
	psiWarned  bool
	// ownTarget is the target this daemon last wrote (0: none yet, or an
	// administrator's memory/target change has taken over since).
	ownTarget uint64
	// domTarget is the domain's memory/target as last read from xenstore.
	domTarget     string
	domTargetSeen bool
	// hold is the balloon-hold in force, nil when none; holdStatus is
	// what data/balloon/hold says. Both live in memory only, so a hold
	// survives a migration (new domid, fresh xenstore home).
	hold       *hold
	holdStatus control.HoldStatus
}

// hold is a granted balloon-hold.
type hold struct {
	nonce string
	until time.Time
	timer *time.Timer // fires at until
}

// domainTargetKey is the toolstack's balloon target for the domain (kB),
// relative to the domain's xenstore home.
const domainTargetKey = "memory/target"

func readKB(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return v, nil
}

func newDaemon(ctx context.Context, opt options, logger *slog.Logger, out io.Writer) (*daemon, error) {
	d := &daemon{opt: opt, log: logger, out: out, start: time.Now()}
	t, err := readKB(opt.targetPath())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("no xen-balloon driver: %s is missing — is this a Xen guest, with the xen_balloon driver built in or loaded?", opt.targetPath())
	}
	if err != nil {
		return nil, fmt.Errorf("reading the balloon target: %w", err)
	}
	d.origTarget = t

	if !opt.dryRun {
		if opt.xenstorePath != "" {
			d.xs, err = xenstore.OpenPath(opt.xenstorePath)
		} else {
			d.xs, err = xenstore.Open()
		}
		if err != nil {
			return nil, fmt.Errorf("%w (run with --dry-run to try the policy without xenstore)", err)
		}
	}

	maxKB := opt.maxKB
	if maxKB == 0 && d.xs != nil {
		// A restarted daemon must not take the target it left behind
		// for the domain's size: the first run recorded the real one.
		if v, err := d.xs.Read(ctx, control.Key(control.KeyMax)); err == nil {
			maxKB, _ = strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		}
	}
	if maxKB == 0 {
		maxKB = t
	}
	cfg := dsb.DefaultConfig(maxKB)
	if opt.reserveMinKB != 0 {
		cfg.ReserveMinKB = opt.reserveMinKB
	}
	if opt.reserveFrac >= 0 {
		cfg.ReserveFraction = opt.reserveFrac
	}
	if opt.floorMinKB != 0 {
		cfg.FloorMinKB = opt.floorMinKB
	}
	if opt.floorFrac >= 0 {
		cfg.FloorFraction = opt.floorFrac
	}
	if opt.stepMinKB != 0 {
		cfg.ShrinkStepMinKB = opt.stepMinKB
	}
	if d.pol, err = dsb.NewPolicy(cfg); err != nil {
		d.close()
		return nil, err
	}
	d.log.Info(fmt.Sprintf("domain memory %d kB, target %d kB, reserve %d kB, floor %d kB, step %d kB",
		maxKB, t, cfg.ReserveKB(), cfg.FloorKB(), cfg.ShrinkStepKB()))
	return d, nil
}

func (d *daemon) close() {
	if d.xs != nil {
		d.xs.Close()
	}
}

// sample reads what the policy needs. PSI is optional: kernels without
// CONFIG_PSI, or built with CONFIG_PSI_DEFAULT_DISABLED and booted without
// psi=1, have none.
func (d *daemon) sample() (dsb.Sample, error) {
	s := dsb.Sample{Time: time.Since(d.start)}
	b, err := os.ReadFile(d.opt.meminfoPath())
	if err != nil {
		return s, fmt.Errorf("reading meminfo: %w", err)
	}
	if s.Mem, err = dsb.ParseMeminfo(string(b)); err != nil {
		return s, err
	}
	if b, err := os.ReadFile(d.opt.pressurePath()); err == nil {
		if s.PSI, err = dsb.ParsePSI(string(b)); err != nil {
			return s, err
		}
	} else if !d.psiWarned {
		d.psiWarned = true
		d.log.Info(fmt.Sprintf("no memory pressure information (%v): relying on MemAvailable; boot the guest with psi=1 for PSI", err))
	}
	if s.TargetKB, err = readKB(d.opt.targetPath()); err != nil {
		return s, fmt.Errorf("reading the balloon target: %w", err)
	}
	if v, err := readKB(d.opt.currentPath()); err == nil {
		s.CurrentKB = v
	}
	return s, nil
}

func (d *daemon) setTarget(kb uint64) error {
	if d.opt.dryRun {
		return nil
	}
	f, err := os.OpenFile(d.opt.targetPath(), os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return fmt.Errorf("opening the balloon target (needs root): %w", err)
	}
	_, err = f.WriteString(strconv.FormatUint(kb, 10) + "\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("setting the balloon target to %d kB: %w", kb, err)
	}
	d.ownTarget = kb
	return nil
}

// domainTargetEvent reads memory/target after its watch fired and reports
// whether the daemon should put its own target back. The watch fires once
// when it is set up, again whenever the toolstack writes the key, and again
// when the guest resumes after a save/restore or a migration (the kernel
// re-registers every watch). On resume the kernel's balloon driver also
// re-reads memory/target — on the destination `xl create` wrote the
// domain's configured size there — and grows the guest back to it, undoing
// what this daemon gave back. The same value re-announced is that case; a
// new value is an administrator's `xl mem-set`, which wins.
func (d *daemon) domainTargetEvent(ctx context.Context) bool {
	v, err := d.xs.Read(ctx, domainTargetKey)
	if err != nil {
		if !errors.Is(err, xenstore.ErrNotFound) {
			d.log.Warn(fmt.Sprintf("reading %s: %v", domainTargetKey, err))
		}
		return false
	}
	v = strings.TrimSpace(v)
	first, prev := !d.domTargetSeen, d.domTarget
	d.domTarget, d.domTargetSeen = v, true
	switch {
	case first:
		return false
	case v != prev:
		d.log.Info(fmt.Sprintf("the domain's %s changed from %s to %s kB (xl mem-set?): following it", domainTargetKey, prev, v))
		d.ownTarget = 0
		return false
	default:
		return d.ownTarget != 0
	}
}

// reassert puts back the target this daemon had set if something else
// (the balloon driver, after a resume) replaced it.
func (d *daemon) reassert() error {
	if d.ownTarget == 0 {
		return nil
	}
	cur, err := readKB(d.opt.targetPath())
	if err != nil {
		return fmt.Errorf("reading the balloon target: %w", err)
	}
	if cur == d.ownTarget {
		return nil
	}
	own := d.ownTarget
	if err := d.setTarget(own); err != nil {
		return err
	}
	d.log.Info(fmt.Sprintf("%s was re-announced (a restore or migration) and the balloon went to %d kB: back to %d kB", domainTargetKey, cur, own))
	return nil
}

// tick runs one periodic step.
func (d *daemon) tick(ctx context.Context) error {
	s, err := d.sample()
	if err != nil {
		return err
	}
	dec := d.pol.Step(s) // also while holding: the policy keeps its view of the guest
	if h := d.hold; h != nil {
		switch {
		case !time.Now().Before(h.until):
			d.endHold(ctx, control.HoldEndedTimeout, "its time ran out")
		case dec.Pressure && dec.TargetKB > s.TargetKB:
			// The guest comes first: never OOM-kill it for a migration.
			d.endHold(ctx, control.HoldEndedPressure, dec.Reason+": taking memory back")
		default:
			policy := dec.Reason
			if dec.Action != dsb.Hold {
				policy = fmt.Sprintf("%s to %d kB: %s", dec.Action, dec.TargetKB, dec.Reason)
			}
			dec = dsb.Decision{TargetKB: s.TargetKB, Action: dsb.Hold,
				Reason: fmt.Sprintf("holding for dom0 (%s) until %s; the policy would %s", h.nonce, h.until.Format(time.TimeOnly), policy)}
		}
	}
	if d.opt.dryRun || d.opt.once {
		fmt.Fprintf(d.out, "%s target %d -> %d kB (free %d, available %d kB): %s\n",
			dec.Action, s.TargetKB, dec.TargetKB, s.Mem.MemFree, s.Mem.MemAvailable, dec.Reason)
	}
	if dec.TargetKB != s.TargetKB {
		if err := d.setTarget(dec.TargetKB); err != nil {
			return err
		}
		if !d.opt.dryRun {
			d.log.Info(fmt.Sprintf("%s %d -> %d kB: %s", dec.Action, s.TargetKB, dec.TargetKB, dec.Reason),
				"action", dec.Action, "from_kb", s.TargetKB, "to_kb", dec.TargetKB)
		}
	}
	if dec.TargetKB != d.pubTarget || time.Since(d.lastPub) >= d.opt.heartbeat {
		return d.publish(ctx, s, dec, "running")
	}
	return nil
}

// publish writes the state keys in one transaction, so dom0 never reads
// a half-updated set.
func (d *daemon) publish(ctx context.Context, s dsb.Sample, dec dsb.Decision, state string) error {
	if d.xs == nil || d.opt.dryRun {
		return nil
	}
	cfg := d.pol.Config()
	kv := [][2]string{
		{control.KeyState, state},
		{control.KeyTarget, strconv.FormatUint(dec.TargetKB, 10)},
		{control.KeyCurrent, strconv.FormatUint(s.CurrentKB, 10)},
		{control.KeyFree, strconv.FormatUint(s.Mem.MemFree, 10)},
		{control.KeyAvailable, strconv.FormatUint(s.Mem.MemAvailable, 10)},
		{control.KeyReserve, strconv.FormatUint(cfg.ReserveKB(), 10)},
		{control.KeyFloor, strconv.FormatUint(cfg.FloorKB(), 10)},
		{control.KeyMax, strconv.FormatUint(cfg.MaxKB, 10)},
		{control.KeyReason, dec.Reason},
		{control.KeyUpdated, strconv.FormatInt(time.Now().Unix(), 10)},
		{control.KeyHold, d.holdStatus.String()},
	}
	if d.opt.kpageflags {
		if pc, err := d.classify(); err == nil {
			kv = append(kv, [2]string{control.KeyPages, pc.Summary()})
		} else {
			d.log.Warn(fmt.Sprintf("kpageflags: %v", err))
		}
	}
	err := d.xs.Update(ctx, func(tx *xenstore.Tx) error {
		for _, e := range kv {
			if err := tx.Write(ctx, control.Key(e[0]), e[1]); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("publishing state under %s: %w", control.Dir, err)
	}
	d.lastPub, d.pubTarget = time.Now(), dec.TargetKB
	return nil
}

// classify reads /proc/kpageflags for every pfn, in 64 KiB chunks (8192
// pfns), counting only: a large guest's file is 2 MiB per GiB.
func (d *daemon) classify() (dsb.PageClasses, error) {
	f, err := os.Open(d.opt.kpageflagsPath())
	if err != nil {
		return dsb.PageClasses{}, fmt.Errorf("opening %s (needs root and CONFIG_PROC_PAGE_MONITOR): %w", d.opt.kpageflagsPath(), err)
	}
	defer f.Close()
	c := dsb.NewClassifier(0, false)
	buf := make([]byte, 64<<10)
	for {
		n, err := io.ReadFull(f, buf)
		if n > 0 {
			w, derr := dsb.DecodeKpageflags(buf[:n])
			if derr != nil {
				return dsb.PageClasses{}, derr
			}
			c.Add(w)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return c.Result(), nil
		}
		if err != nil {
			return dsb.PageClasses{}, fmt.Errorf("reading %s: %w", d.opt.kpageflagsPath(), err)
		}
	}
}

// handleRequest answers dom0's request, if there is a new one:
// balloon-now and balloon-hold are answered once each (by nonce);
// hold-end ends the hold of its nonce, whichever domain home it comes
// from (after a migration, the new domain's).
func (d *daemon) handleRequest(ctx context.Context) error {
	v, err := d.xs.Read(ctx, control.Key(control.KeyRequest))
	if errors.Is(err, xenstore.ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading the balloon request: %w", err)
	}
	req, perr := control.ParseAnyRequest(v)
	if errors.Is(perr, control.ErrNotRequest) {
		return nil // spurious watch event, or garbage: nothing to answer
	}
	if req.Kind == control.HoldEnd {
		if d.hold != nil && d.hold.nonce == req.Nonce {
			d.endHold(ctx, control.HoldEndedDom0, "dom0 ended it")
		}
		return nil // otherwise already ended, or not ours
	}
	if req.Nonce == d.lastNonce {
		return nil // already answered
	}
	d.lastNonce = req.Nonce
	ack := control.Ack{Nonce: req.Nonce, OK: true}
	var released uint64
	s, err := d.sample()
	dec := dsb.Decision{TargetKB: s.TargetKB, Reason: "sampling failed"}
	switch {
	case perr != nil:
		err = perr
		dec.Reason = "bad request"
	case err == nil:
		dec = d.pol.BalloonNow(s)
		err = d.setTarget(dec.TargetKB)
		if err == nil {
			before := have(s.TargetKB, s.CurrentKB)
			var after uint64
			after, err = d.settle(ctx, dec.TargetKB)
			if before > after {
				released = before - after
			}
		}
	}
	ack.TargetKB = dec.TargetKB
	if err != nil {
		ack.OK, ack.Err = false, err.Error()
	}
	if req.Kind == control.BalloonHold && perr == nil {
		// Held from the ack on, even if ballooning failed: dom0 may
		// migrate anyway, and a still balloon is what it needs.
		d.startHold(req.Nonce, req.Hold)
	}
	d.log.Info(fmt.Sprintf("%s %s: %s (target %d kB, released %d kB): %s", req.Kind, req.Nonce, ack.String(), dec.TargetKB, released, dec.Reason))
	if perr == nil {
		if err := d.publish(ctx, s, dec, "running"); err != nil {
			d.log.Warn(err.Error())
		}
	}
	err = d.xs.Update(ctx, func(tx *xenstore.Tx) error {
		if err := tx.Write(ctx, control.Key(control.KeyReleased), strconv.FormatUint(released, 10)); err != nil {
			return err
		}
		if err := tx.Write(ctx, control.Key(control.KeyHold), d.holdStatus.String()); err != nil {
			return err
		}
		return tx.Write(ctx, control.Key(control.KeyAck), ack.String())
	})
	if err != nil {
		return fmt.Errorf("writing the balloon ack: %w", err)
	}
	return nil
}

// startHold holds the balloon for dur from now, replacing a hold in
// force.
func (d *daemon) startHold(nonce string, dur time.Duration) {
	if d.hold != nil {
		d.hold.timer.Stop()
		d.log.Info(fmt.Sprintf("hold %s replaced by %s", d.hold.nonce, nonce))
	}
	until := time.Now().Add(dur)
	d.hold = &hold{nonce: nonce, until: until, timer: time.NewTimer(dur)}
	d.holdStatus = control.HoldStatus{Nonce: nonce, Held: true, Until: until}
	d.log.Info(fmt.Sprintf("holding the balloon for dom0 (%s) until %s, or until hold-end:%s", nonce, until.Format(time.TimeOnly), nonce))
}

// endHold ends the hold in force, if any, and says so in xenstore.
func (d *daemon) endHold(ctx context.Context, why, msg string) {
	if d.hold == nil {
		return
	}
	d.hold.timer.Stop()
	nonce := d.hold.nonce
	d.hold = nil
	d.holdStatus = control.HoldStatus{Nonce: nonce, Ended: why}
	d.log.Info(fmt.Sprintf("hold %s ended (%s): %s; following the policy again", nonce, why, msg))
	if err := d.writeHold(ctx); err != nil {
		d.log.Warn(err.Error())
	}
}

// holdExpiry is the timer channel of the hold in force, nil when none.
func (d *daemon) holdExpiry() <-chan time.Time {
	if d.hold == nil {
		return nil
	}
	return d.hold.timer.C
}

// writeHold publishes the hold status alone.
func (d *daemon) writeHold(ctx context.Context) error {
	if d.xs == nil || d.opt.dryRun {
		return nil
	}
	if err := d.xs.Write(ctx, control.Key(control.KeyHold), d.holdStatus.String()); err != nil {
		return fmt.Errorf("publishing the hold: %w", err)
	}
	return nil
}

func have(target, current uint64) uint64 {
	if current != 0 {
		return current
	}
	return target
}

// settle waits until the balloon driver has reached target (so that dom0,
// when it reads the ack, finds the pages already returned to Xen) and
// returns what the guest holds then.
func (d *daemon) settle(ctx context.Context, target uint64) (uint64, error) {
	slack := d.pol.Config().SettleSlackKB
	deadline := time.Now().Add(d.opt.settleTimeout)
	for {
		cur, err := readKB(d.opt.currentPath())
		if err != nil {
			// No info/current_kb (old kernel or test tree): trust the target.
			return target, nil
		}
		if cur <= target+slack {
			return cur, nil
		}
		if time.Now().After(deadline) {
			return cur, fmt.Errorf("balloon at %d kB has not reached its %d kB target after %v", cur, target, d.opt.settleTimeout)
		}
		select {
		case <-ctx.Done():
			return cur, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// shutdown gives the guest back the target it had when the daemon
// started, so stopping the daemon never leaves the guest squeezed.
func (d *daemon) shutdown() error {
	var errs []error
	if !d.opt.dryRun {
		if err := d.setTarget(d.origTarget); err != nil {
			errs = append(errs, err)
		} else {
			d.log.Info(fmt.Sprintf("stopping: target restored to %d kB", d.origTarget))
		}
	}
	if d.xs != nil {
		// The loop's context is gone; give the last words a few seconds.
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		if d.hold != nil {
			d.hold.timer.Stop()
			d.log.Info(fmt.Sprintf("hold %s ended: stopping", d.hold.nonce))
			d.holdStatus = control.HoldStatus{Nonce: d.hold.nonce, Ended: control.HoldEndedStopped}
			d.hold = nil
		}
		s, err := d.sample()
		if err == nil {
			err = d.publish(ctx, s, dsb.Decision{TargetKB: d.origTarget, Reason: "daemon stopped"}, "stopped")
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// run is the daemon: one step with --once, else a loop until ctx ends.
func run(ctx context.Context, opt options, logger *slog.Logger, out io.Writer) error {
	d, err := newDaemon(ctx, opt, logger, out)
	if err != nil {
		return err
	}
	defer d.close()
	if opt.once {
		return d.tick(ctx)
	}

	var events, targetEvents <-chan xenstore.WatchEvent
	var reassertAt <-chan time.Time
	if d.xs != nil {
		if a, err := d.xs.Read(ctx, control.Key(control.KeyAck)); err == nil {
			if ack, err := control.ParseAck(a); err == nil {
				d.lastNonce = ack.Nonce // answered before a restart
			}
		}
		w, err := d.xs.Watch(ctx, control.Key(control.KeyRequest))
		if err != nil {
			return fmt.Errorf("watching %s: %w", control.Key(control.KeyRequest), err)
		}
		defer w.Close()
		events = w.Events()
		tw, err := d.xs.Watch(ctx, domainTargetKey)
		if err != nil {
			return fmt.Errorf("watching %s: %w", domainTargetKey, err)
		}
		defer tw.Close()
		targetEvents = tw.Events()
	}
	tk := time.NewTicker(opt.period)
	defer tk.Stop()
	if err := d.tick(ctx); err != nil {
		d.log.Warn(err.Error())
	}
	for {
		select {
		case <-ctx.Done():
			return d.shutdown()
		case _, ok := <-events:
			if !ok {
				serr := d.shutdown()
				return errors.Join(fmt.Errorf("xenstore connection lost: %w", d.xs.Err()), serr)
			}
			if err := d.handleRequest(ctx); err != nil {
				d.log.Warn(err.Error())
			}
		case _, ok := <-targetEvents:
			if !ok {
				serr := d.shutdown()
				return errors.Join(fmt.Errorf("xenstore connection lost: %w", d.xs.Err()), serr)
			}
			if d.domainTargetEvent(ctx) {
				if d.hold != nil {
					// Holding for a migration: the balloon must not
					// move, so put the target back at once, and
					// recreate the hold in the (new) home.
					if err := d.reassert(); err != nil {
						d.log.Warn(err.Error())
					}
					if err := d.writeHold(ctx); err != nil {
						d.log.Warn(err.Error())
					}
				}
				// Let the kernel's own watch apply memory/target first
				// (again, when holding: it may come after ours).
				reassertAt = time.After(d.opt.reassertDelay)
				d.lastPub = time.Time{} // republish soon: the home may be new
			}
		case <-d.holdExpiry():
			d.endHold(ctx, control.HoldEndedTimeout, "its time ran out")
		case <-reassertAt:
			reassertAt = nil
			if err := d.reassert(); err != nil {
				d.log.Warn(err.Error())
			}
		case <-tk.C:
			// A failed step (a transient read error) is logged, not
			// fatal: the next period tries again.
			if err := d.tick(ctx); err != nil {
				d.log.Warn(err.Error())
			}
		}
	}
}
