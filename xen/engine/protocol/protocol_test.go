package protocol

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// world is what the two machines' actions did to the domain: the facts
// the invariant is about.
type world struct {
	srcRunning   bool // the source copy runs
	srcDestroyed bool // the source copy (and with it the source's memory) is gone
	dstExists    bool
	dstRunning   bool
	dstAllIn     bool // the destination holds every page
}

// item is one queued input: an event for one side.
type item struct {
	toSrc bool
	sev   Event
	dev   DestEvent
	msg   bool // a record crossing the link (lost when the link is cut)
	done  bool // an action's result (may be replaced by a failure)
}

func (it item) String() string {
	if it.toSrc {
		return "src:" + it.sev.Kind.String()
	}
	return "dst:" + describe(it.dev)
}

// fault is what a run injects at its step-th input.
type fault struct {
	// then, after a cut with recovery on, is injected (insert) into the
	// first side found postcopy-paused.
	then *fault
	step int
	mode string // "insert": a failure arrives before it; "replace": the action failed; "cut": the link dies
	src  bool   // the side that fails (insert, replace)
	sk   EventKind
	dk   DestEventKind
}

// sim runs both machines against each other in memory, FIFO, with the
// link and the backends simulated by w.
type sim struct {
	t     *testing.T
	src   *Source
	dst   *Dest
	w     world
	q     []item
	steps int
	cut   bool
	trace []string
	// seen[i] is the states the machines were in when input i came.
	seen []string
	// recover turns recovery on in both machines; srcWaits and dstWaits
	// say a side is postcopy-paused, waiting for the other on a new link.
	recover            bool
	srcWaits, dstWaits bool
	// cutFrom is the source's state when the link was cut (cut mode).
	cutFrom  SourceState
	thenDone bool
}

func (s *sim) toSrc(ev Event, msg bool) {
	if msg && s.cut {
		return
	}
	s.q = append(s.q, item{toSrc: true, sev: ev, msg: msg, done: !msg})
}

func (s *sim) toDst(ev DestEvent, msg bool) {
	if msg && s.cut {
		return
	}
	s.q = append(s.q, item{dev: ev, msg: msg, done: !msg})
}

func (s *sim) send(r Record) { s.toDst(DestEvent{Kind: DevRecord, Record: r}, true) }

var errInjected = errors.New("injected")

func (s *sim) srcDo(acts []ActionKind) {
	for _, a := range acts {
		switch a {
		case ActOpen:
			s.send(RecDomainHeader)
			s.toSrc(Event{Kind: EvOpened}, false)
		case ActAwaitCreated, ActAwaitReady, ActAwaitResumed, ActAwaitAck, ActDetachCancel:
		case ActLive:
			s.send(RecPageBatch)
			s.toSrc(Event{Kind: EvLiveDone}, false)
		case ActPause:
			s.w.srcRunning = false
			s.toSrc(Event{Kind: EvPaused}, false)
		case ActSendStop:
			s.send(RecPageBatch)
			s.send(RecCoreState)
			s.send(RecSwitchover)
			s.toSrc(Event{Kind: EvStopSent}, false)
		case ActRelinquish:
			s.toSrc(Event{Kind: EvRelinquished}, false)
		case ActSendGo:
			s.send(RecGo)
			s.toSrc(Event{Kind: EvGoSent}, false)
		case ActPostcopy:
			s.send(RecPageBatch)
			s.send(RecDone)
			s.send(RecDoneFinal)
			s.toSrc(Event{Kind: EvPagesDone}, false)
		case ActDestroySource:
			s.send(RecBye) // the driver says BYE once it has the ACK
			s.w.srcDestroyed = true
			s.toSrc(Event{Kind: EvDestroyed}, false)
		case ActResumeSource:
			s.w.srcRunning = true
			s.toSrc(Event{Kind: EvResumedHere}, false)
		case ActReconnect:
			s.srcWaits = true
			s.breakLink(true)
			s.tryReattach()
		case ActReport:
			s.srcWaits = false // a source that ended reconnects no more
			if !s.src.Outcome().OK && !s.cut {
				// A failed source closes both connections.
				s.toDst(DestEvent{Kind: DevConnClosed, Err: errors.New("source closed")}, false)
			}
		default:
			s.t.Fatalf("source action %v unknown to the simulation", a)
		}
	}
}

func (s *sim) dstDo(acts []DestAction) {
	for _, a := range acts {
		switch a {
		case DactCreate:
			s.w.dstExists = true
			s.toDst(DestEvent{Kind: DevCreated}, false)
		case DactSendCreated:
			s.toSrc(Event{Kind: EvCreated}, true)
		case DactAccept, DactDetachCancel:
		case DactSendReady:
			s.toSrc(Event{Kind: EvReady}, true)
		case DactResume:
			s.w.dstRunning = true
			s.toDst(DestEvent{Kind: DevResumed}, false)
		case DactSendResumed:
			s.toSrc(Event{Kind: EvResumed}, true)
		case DactAwaitAllIn:
			s.w.dstAllIn = true
			s.toDst(DestEvent{Kind: DevAllIn}, false)
		case DactAck:
			s.toSrc(Event{Kind: EvAcked, Verified: true}, true)
			s.toDst(DestEvent{Kind: DevAcked}, false)
		case DactSendError:
			s.toSrc(Event{Kind: EvPeerError, Err: errors.New("destination failed")}, true)
			// ... and closes both connections, if it has any.
			if !s.cut {
				s.toSrc(Event{Kind: EvConnClosed, Err: errors.New("destination closed")}, false)
			}
		case DactSendNotResumed:
			s.toSrc(Event{Kind: EvNotResumed, Err: errors.New("hypervisor refused the vCPU state")}, true)
		case DactDestroy:
			s.dstWaits = false
			s.w.dstExists, s.w.dstRunning = false, false
			s.dstDo(s.dst.Destroyed(nil))
		case DactAwaitReattach:
			s.dstWaits = true
			s.breakLink(false)
			s.tryReattach()
		case DactRestart:
		case DactReport:
			s.dstWaits = false
		default:
			s.t.Fatalf("destination action %v unknown to the simulation", a)
		}
	}
}

// undoResume makes a resume at the destination fail (replace mode on
// DevResumed): the simulation's resume did not happen after all.
func (s *sim) undoResume() { s.w.dstRunning = false }

// breakLink is a side going postcopy-paused: it drops both connections,
// so the records in flight are lost and the other side sees them close.
// The paused side's own news of the old link is stale: its driver is
// reconnecting and no longer reads it.
func (s *sim) breakLink(src bool) {
	if !s.cut {
		s.cut = true
		s.dropMessages()
		if src {
			s.toDst(DestEvent{Kind: DevConnClosed, Err: errors.New("source dropped the link")}, false)
		} else {
			s.toSrc(Event{Kind: EvConnClosed, Err: errors.New("destination dropped the link")}, false)
		}
	}
	var keep []item
	for _, q := range s.q {
		stale := q.toSrc == src && ((src && (q.sev.Kind == EvConnClosed || q.sev.Kind == EvTimeout)) ||
			(!src && (q.dev.Kind == DevConnClosed || q.dev.Kind == DevTimeout)))
		if !stale {
			keep = append(keep, q)
		}
	}
	s.q = keep
}

func (s *sim) dropMessages() {
	var keep []item
	for _, q := range s.q {
		if !q.msg {
			keep = append(keep, q)
		}
	}
	s.q = keep
}

// tryReattach brings a new link up once both sides wait for it: the
// destination reattaches and tells the source its stage.
func (s *sim) tryReattach() {
	if !s.srcWaits || !s.dstWaits {
		return
	}
	s.cut, s.srcWaits, s.dstWaits = false, false, false
	s.trace = append(s.trace, "REATTACH")
	stage := s.dst.Stage()
	acts := s.dst.Step(DestEvent{Kind: DevReattached})
	s.toSrc(Event{Kind: EvRecovered, Stage: stage}, true)
	s.dstDo(acts)
}

// recoveryOver ends the waits nothing will answer: the recovery time runs
// out on a side whose peer is gone.
func (s *sim) recoveryOver() {
	if s.srcWaits {
		s.srcWaits = false
		s.toSrc(Event{Kind: EvTimeout, Err: errors.New("recovery time over")}, false)
	}
	if s.dstWaits {
		s.dstWaits = false
		s.toDst(DestEvent{Kind: DevTimeout, Err: errors.New("recovery time over")}, false)
	}
}

func (s *sim) run(f *fault) {
	s.src, s.dst = NewSource(), NewDest()
	if s.recover {
		s.src.EnableRecovery()
		s.dst.EnableRecovery()
	}
	s.w = world{srcRunning: true}
	s.srcDo(s.src.Start())
	for s.steps < 1000 {
		if len(s.q) == 0 {
			s.recoveryOver()
			if len(s.q) == 0 {
				break
			}
		}
		it := s.q[0]
		s.q = s.q[1:]
		s.seen = append(s.seen, fmt.Sprintf("%v/%v", s.src.State(), s.dst.State()))
		if f != nil && f.then != nil && !s.thenDone && (s.src.State() == SrcRecovering || s.dst.State() == DstPaused) {
			s.thenDone = true
			g := *f.then
			g.src = s.src.State() == SrcRecovering
			s.trace = append(s.trace, "PAUSED-FAULT")
			if !s.backendBusy(&g) {
				s.inject(&g)
			}
		}
		if f != nil && s.steps == f.step {
			switch f.mode {
			case "insert":
				if s.backendBusy(f) {
					break // only the outstanding action's result can be a backend error then
				}
				s.inject(f)
			case "replace":
				if it.done && it.toSrc == f.src && replaceable(it, f) {
					if !it.toSrc && it.dev.Kind == DevResumed {
						s.undoResume()
					}
					if !it.toSrc && it.dev.Kind == DevCreated {
						s.w.dstExists = false // a factory that fails removes what it made
					}
					if it.toSrc && it.sev.Kind == EvResumedHere {
						s.w.srcRunning = false
					}
					if it.toSrc && it.sev.Kind == EvPaused {
						s.w.srcRunning = true
					}
					if it.toSrc && it.sev.Kind == EvDestroyed {
						s.w.srcDestroyed = false
					}
					s.inject(f)
					s.steps++
					continue
				}
			case "cut":
				s.cut = true
				s.cutFrom = s.src.State()
				s.dropMessages()
				s.toSrc(Event{Kind: EvConnClosed, Err: errors.New("link cut")}, false)
				s.toDst(DestEvent{Kind: DevConnClosed, Err: errors.New("link cut")}, false)
				if it.msg {
					s.steps++
					continue
				}
			}
		}
		s.steps++
		s.trace = append(s.trace, it.String())
		if it.toSrc {
			s.srcDo(s.src.Step(it.sev))
		} else {
			s.dstDo(s.dst.Step(it.dev))
		}
	}
}

func (s *sim) inject(f *fault) {
	s.trace = append(s.trace, fmt.Sprintf("INJECT %s %v%v", f.mode, f.sk, f.dk))
	if f.src {
		s.srcDo(s.src.Step(Event{Kind: f.sk, Err: errInjected}))
	} else {
		s.dstDo(s.dst.Step(DestEvent{Kind: f.dk, Err: errInjected}))
	}
}

// check asserts the invariant: the domain runs on exactly one side, or
// runs nowhere and is paused at the source with all its memory; never
// two running copies, never a destroyed source copy without a complete
// destination; and the outcomes say what the world is.
func (s *sim) check(t *testing.T) {
	t.Helper()
	if v := s.violation(); v != "" {
		t.Fatalf("%s\nworld %+v\ntrace %v\nsource %v %+v\ndest %v %+v", v, s.w, s.trace,
			s.src.State(), s.src.Outcome(), s.dst.State(), s.dst.Outcome())
	}
}

// violation is the first invariant the run broke, or "".
func (s *sim) violation() string {
	w := s.w
	so, do := s.src.Outcome(), s.dst.Outcome()
	switch {
	case !s.src.Ended():
		return "source never ended"
	case !s.dst.Ended():
		return "destination never ended"
	case w.srcRunning && w.dstRunning:
		return "two running copies"
	case !w.srcRunning && !w.dstRunning && w.srcDestroyed:
		return "the domain runs nowhere and the source's memory is gone"
	case w.srcDestroyed && !(w.dstRunning && w.dstAllIn):
		return "source copy destroyed before the destination was complete"
	case so.OK && !(w.srcDestroyed && w.dstRunning):
		return "source says migrated, the world disagrees"
	case !so.OK && so.Where == RunsAtSource && !w.srcRunning:
		return "source says it runs at the source, it does not"
	case !so.OK && so.Where == PausedAtSource && (w.srcRunning || w.dstRunning || w.srcDestroyed):
		return "source says paused at the source, the world disagrees"
	case !so.OK && (so.Where == AfterGo || so.Where == RunsAtDestination) && w.srcRunning:
		return "source says its copy is kept paused, it runs"
	case !so.OK && so.Where == 0:
		return "source ended without a where"
	case w.dstRunning != (do.OK || do.Where == RunsHere):
		return "destination's outcome says otherwise about its running copy"
	case (do.Where == DestroyedHere || do.Where == NothingHere) && w.dstExists:
		return "destination says destroyed, its domain exists"
	}
	return ""
}

// The checker itself can fail: worlds that break the invariant, with the
// outcomes of a clean run, are each caught.
func TestInvariantCatchesBrokenWorlds(t *testing.T) {
	for name, w := range map[string]world{
		"two running copies":  {srcRunning: true, dstRunning: true, dstExists: true, dstAllIn: true},
		"memory gone":         {srcDestroyed: true},
		"destroyed too early": {srcDestroyed: true, dstRunning: true, dstExists: true},
	} {
		s := &sim{t: t}
		s.run(nil)
		s.w = w
		require.NotEmpty(t, s.violation(), name)
	}
	s := &sim{t: t}
	s.run(nil)
	require.Empty(t, s.violation())
}

func TestCleanRun(t *testing.T) {
	s := &sim{t: t}
	s.run(nil)
	s.check(t)
	require.True(t, s.src.Outcome().OK, s.trace)
	require.True(t, s.dst.Outcome().OK, s.trace)
	require.Equal(t, SrcDone, s.src.State())
	require.Equal(t, DstDone, s.dst.State())
}

// TestEveryStateEveryFailure injects every failure, on either side, at
// every input of a clean run (so in every state both machines pass), as a
// failure arriving from outside (insert), as the failure of the action
// whose result that input is (replace), and as the link dying there
// (cut); each run must keep the invariant. It runs with recovery off and
// on (recover/...); with recovery on, every cut once GO may have left must
// end in a complete migration, and each failure is injected again into
// the postcopy-paused side after a cut (cut+...).
func TestEveryStateEveryFailure(t *testing.T) {
	for _, recover := range []bool{false, true} {
		name := "plain"
		if recover {
			name = "recover"
		}
		t.Run(name, func(t *testing.T) { everyStateEveryFailure(t, recover) })
	}
}

func everyStateEveryFailure(t *testing.T, recover bool) {
	clean := &sim{t: t, recover: recover}
	clean.run(nil)
	require.True(t, clean.src.Outcome().OK && clean.dst.Outcome().OK, clean.trace)
	total := clean.steps
	seen := map[string]bool{}
	for step := 0; step < total; step++ {
		states := clean.seen[step]
		var faults []fault
		for _, k := range Failures() {
			faults = append(faults, fault{step: step, mode: "insert", src: true, sk: k}, fault{step: step, mode: "replace", src: true, sk: k})
		}
		for _, k := range DestFailures() {
			faults = append(faults, fault{step: step, mode: "insert", dk: k}, fault{step: step, mode: "replace", dk: k})
		}
		faults = append(faults, fault{step: step, mode: "cut"})
		if recover {
			for i, k := range Failures() {
				dk := DestFailures()[min(i, len(DestFailures())-1)]
				faults = append(faults, fault{step: step, mode: "cut", then: &fault{mode: "insert", sk: k, dk: dk}})
			}
			faults = append(faults, fault{step: step, mode: "cut", then: &fault{mode: "insert", sk: EvCancel, dk: DevPeerError}})
		}
		for _, f := range faults {
			name := fmt.Sprintf("%s/step%02d/%s", states, step, f.mode)
			if f.then != nil {
				name += fmt.Sprintf("+paused-%v-or-%v", f.then.sk, f.then.dk)
			}
			if f.mode != "cut" {
				if f.src {
					name += "/source-" + f.sk.String()
				} else {
					name += "/dest-" + f.dk.String()
				}
			}
			t.Run(name, func(t *testing.T) {
				s := &sim{t: t, recover: recover}
				s.run(&f)
				s.check(t)
				if !recover || f.mode != "cut" || f.then != nil {
					return
				}
				switch s.cutFrom {
				case SrcGoing, SrcAwaitResumed, SrcPostcopy, SrcVerifying:
					require.True(t, s.src.Outcome().OK && s.dst.Outcome().OK,
						"a cut after GO must be recovered: %v\nsource %+v\ndest %+v", s.trace, s.src.Outcome(), s.dst.Outcome())
					require.Equal(t, 1, s.src.Outcome().Recoveries)
					require.Equal(t, 1, s.dst.Outcome().Recoveries)
				}
			})
			seen[states] = true
			if f.then != nil {
				seen[fmt.Sprintf("%v/*", SrcRecovering)] = true
			}
		}
	}
	// Every state but the terminal ones was the stage of some injection.
	var srcStates, dstStates = map[SourceState]bool{}, map[DestState]bool{}
	for st := range seen {
		for _, s := range SourceStates() {
			for _, d := range DestStates() {
				if st == fmt.Sprintf("%v/%v", s, d) {
					srcStates[s], dstStates[d] = true, true
				}
			}
		}
	}
	for _, s := range []SourceState{SrcOpening, SrcCreating, SrcLive, SrcPausing, SrcStopping, SrcAwaitReady,
		SrcRelinquishing, SrcGoing, SrcAwaitResumed, SrcPostcopy, SrcVerifying, SrcDestroying} {
		require.True(t, srcStates[s], "no injection while the source was %v", s)
	}
	for _, d := range []DestState{DstHeader, DstCreating, DstReceiving, DstSwitching, DstResuming, DstRunning, DstComplete, DstAcking} {
		require.True(t, dstStates[d], "no injection while the destination was %v", d)
	}
}

// With recovery on, a failure injected into a postcopy-paused side hits
// both paused states (the cut+ runs above), and a second recovery works.
func TestPausedStatesAreReached(t *testing.T) {
	var srcPaused, dstPaused bool
	clean := &sim{t: t, recover: true}
	clean.run(nil)
	for step := 0; step < clean.steps; step++ {
		s := &sim{t: t, recover: true}
		s.run(&fault{step: step, mode: "cut", then: &fault{mode: "insert", sk: EvTimeout, dk: DevTimeout}})
		s.check(t)
		for _, st := range s.seen {
			srcPaused = srcPaused || strings.HasPrefix(st, SrcRecovering.String()+"/")
			dstPaused = dstPaused || strings.HasSuffix(st, "/"+DstPaused.String())
		}
	}
	require.True(t, srcPaused, "no input reached the source while postcopy-paused")
	require.True(t, dstPaused, "no input reached the destination while postcopy-paused")
}

// backendBusy says whether the failing side waits on its backend, whose
// failure is then that action's result (replace), not an event of its own.
func (s *sim) backendBusy(f *fault) bool {
	if f.src {
		st := s.src.State()
		return f.sk == EvBackendError && (st == SrcPausing || st == SrcResuming || st == SrcDestroying || st == SrcRelinquishing)
	}
	st := s.dst.State()
	return f.dk == DevBackendError && (st == DstCreating || st == DstResuming)
}

// backendResults are the action results only the backend gives: a driver
// reports their failure as EvBackendError (DevBackendError), never as a
// network failure.
var backendResults = map[EventKind]bool{EvPaused: true, EvResumedHere: true, EvDestroyed: true, EvRelinquished: true}

// replaceable says whether f may stand in for the result it.
func replaceable(it item, f *fault) bool {
	if f.sk == EvCancel || f.dk == DevCancel {
		return false // a cancel comes from outside, never as an action's result
	}
	if it.toSrc && backendResults[it.sev.Kind] {
		return f.sk == EvBackendError
	}
	if !it.toSrc && (it.dev.Kind == DevResumed || it.dev.Kind == DevCreated) {
		return f.dk == DevBackendError
	}
	return true
}

// A machine that takes over from a source process that died after GO
// starts paused, asks for a new link first, and goes on from where the
// destination says it stands; any failure then leaves the domain where a
// failure after GO does (AfterGo), never resumed here on its own.
func TestTakeOver(t *testing.T) {
	for _, tc := range []struct {
		stage Stage
		next  ActionKind
		state SourceState
	}{
		{StageNotResumed, ActSendGo, SrcGoing},
		{StageRunning, ActPostcopy, SrcPostcopy},
		{StageAcking, ActAwaitAck, SrcVerifying},
	} {
		m := NewSource()
		m.TakeOver()
		require.True(t, m.MayRunAtDestination(), "GO was sent by the process that died")
		require.Equal(t, []ActionKind{ActReconnect}, m.Start())
		require.Equal(t, SrcRecovering, m.State())
		require.Nil(t, m.Step(Event{Kind: EvCancel}), "a cancel cannot strand the guest")
		require.Equal(t, []ActionKind{tc.next}, m.Step(Event{Kind: EvRecovered, Stage: tc.stage}), tc.stage)
		require.Equal(t, tc.state, m.State())
		require.Equal(t, 1, m.Outcome().Recoveries)
	}
	m := NewSource()
	m.TakeOver()
	m.Start()
	require.Equal(t, []ActionKind{ActReport}, m.Step(Event{Kind: EvTimeout, Err: errors.New("no new link")}))
	o := m.Outcome()
	require.False(t, o.OK)
	require.Equal(t, AfterGo, o.Where)
	require.ErrorContains(t, o.Err, "died")

	// After a take-over the usual recovery goes on: a later cut pauses
	// again.
	m = NewSource()
	m.TakeOver()
	m.Start()
	m.Step(Event{Kind: EvRecovered, Stage: StageRunning})
	require.Equal(t, []ActionKind{ActReconnect}, m.Step(Event{Kind: EvConnClosed}))
	require.Equal(t, []ActionKind{ActAwaitAck}, m.Step(Event{Kind: EvRecovered, Stage: StageAcking}))
	require.Equal(t, []ActionKind{ActDestroySource}, m.Step(Event{Kind: EvAcked, Verified: true}))
	require.Equal(t, []ActionKind{ActReport}, m.Step(Event{Kind: EvDestroyed}))
	require.True(t, m.Outcome().OK)
	require.Equal(t, 2, m.Outcome().Recoveries)
}
