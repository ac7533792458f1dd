// Package protocol holds the migration's two sides as pure state
// machines: Step takes an event (a record received, a backend's result, a
// connection error, a timeout) and returns the actions to carry out next.
// Nothing in here starts a goroutine, reads a clock or does I/O: the
// engine's drivers do that and feed the results back as events, so tests
// can drive every state into every failure in memory (etcd-io/raft's
// shape).
//
// The machines own the decisions an administrator cares about: when the
// domain may run at the destination, when the source copy is resumed,
// kept paused or destroyed, and where the domain runs once a migration
// has failed (Where).
package protocol

import (
	"errors"
	"fmt"
)

// Where says where the domain is once a migration has failed: what an
// administrator (or a caller such as the lab) acts on.
type Where int

// Where a domain can be after a failed migration.
const (
	// RunsAtSource: the migration had not started or was undone before
	// the destination was told to run the domain; it runs at the source.
	RunsAtSource Where = iota + 1
	// PausedAtSource: undoing the migration failed; the domain is paused
	// at the source with all its memory and nothing runs it elsewhere.
	PausedAtSource
	// AfterGo: the destination may be running the domain (GO was sent);
	// the source copy is kept paused with all its memory and is never
	// resumed, so the domain never runs twice.
	AfterGo
	// RunsAtDestination: the migration completed and was verified, the
	// domain runs at the destination, but the source's paused copy could
	// not be destroyed (it is left for the administrator).
	RunsAtDestination
)

func (w Where) String() string {
	switch w {
	case RunsAtSource:
		return "runs at the source"
	case PausedAtSource:
		return "paused at the source"
	case AfterGo:
		return "source copy paused, destination may run it"
	case RunsAtDestination:
		return "runs at the destination, source copy left paused"
	}
	return fmt.Sprintf("where(%d)", int(w))
}

// SourceState is a state of the source's machine.
type SourceState uint8

// The source's states, in the order a migration passes them.
const (
	SrcOpening       SourceState = iota // writing the stream headers and DOMAIN_HEADER
	SrcCreating                         // waiting for CREATED; the domain runs here
	SrcLive                             // pre-copy rounds, recording, early core pages; runs here
	SrcPausing                          // Pause issued
	SrcStopping                         // paused: stop-phase pages, core state, SWITCHOVER
	SrcAwaitReady                       // waiting for READY
	SrcRelinquishing                    // marking the source copy as migrated away
	SrcGoing                            // GO being written: from here the destination may run it
	SrcAwaitResumed                     // waiting for RESUMED
	SrcPostcopy                         // pushing and serving faults until every page is sent
	SrcVerifying                        // checksums sent, waiting for the ACK
	SrcDestroying                       // destroying the source copy
	SrcResuming                         // undoing: resuming the source copy
	SrcRecovering                       // postcopy-paused: the link broke after GO; reconnecting
	SrcDone                             // migrated and verified
	SrcFailed                           // ended; Outcome says where the domain is
	numSourceStates
)

var sourceStateNames = [...]string{
	"opening", "creating", "live", "pausing", "stopping", "await-ready", "relinquishing",
	"going", "await-resumed", "postcopy", "verifying", "destroying", "resuming", "postcopy-paused", "done", "failed",
}

func (s SourceState) String() string {
	if int(s) < len(sourceStateNames) {
		return sourceStateNames[s]
	}
	return fmt.Sprintf("source-state(%d)", int(s))
}

// SourceStates lists every state (for tests that walk them all).
func SourceStates() []SourceState {
	out := make([]SourceState, 0, numSourceStates)
	for s := range numSourceStates {
		out = append(out, s)
	}
	return out
}

// EventKind says what happened.
type EventKind uint8

// Events. The ones up to Destroyed report that the current state's action
// finished (or, for Created/Ready/Resumed/NotResumed/Acked, that the peer's
// record arrived); the others are failures.
const (
	EvOpened EventKind = iota + 1
	EvCreated
	EvLiveDone     // pre-copy rounds / recording / early core pages are done
	EvPaused       // the backend paused the domain
	EvStopSent     // stop-phase pages, core state and SWITCHOVER are out
	EvReady        // READY arrived
	EvRelinquished // the source copy is marked as migrated away
	EvGoSent       // GO is out
	EvResumed      // RESUMED arrived
	EvNotResumed   // NOT_RESUMED arrived: the destination never ran the domain
	EvPagesDone    // every page has been sent once, the checksums too
	EvAcked        // the ACK arrived (Event.Verified says whether it matched)
	EvDestroyed    // the source copy is destroyed
	EvResumedHere  // the source copy runs again
	EvRecovered    // a new link to the same destination is up (Event.Stage says where it stands)

	EvConnClosed   // either connection closed or failed
	EvPeerError    // the peer's ERROR record
	EvBackendError // the domain's backend failed the current action
	EvTimeout      // the peer was silent too long, or an ack never came
	EvCancel       // the caller cancelled
	EvProtocol     // a record that makes no sense here
)

var eventNames = map[EventKind]string{
	EvOpened: "opened", EvCreated: "created", EvLiveDone: "live-done", EvPaused: "paused",
	EvStopSent: "stop-sent", EvReady: "ready", EvRelinquished: "relinquished", EvGoSent: "go-sent",
	EvResumed: "resumed", EvNotResumed: "not-resumed", EvPagesDone: "pages-done", EvAcked: "acked",
	EvDestroyed: "destroyed", EvResumedHere: "resumed-here", EvRecovered: "recovered",
	EvConnClosed: "conn-closed", EvPeerError: "peer-error", EvBackendError: "backend-error",
	EvTimeout: "timeout", EvCancel: "cancel", EvProtocol: "protocol-error",
}

func (k EventKind) String() string {
	if n, ok := eventNames[k]; ok {
		return n
	}
	return fmt.Sprintf("event(%d)", int(k))
}

// Failures lists the failure events (for tests that inject each).
func Failures() []EventKind {
	return []EventKind{EvConnClosed, EvPeerError, EvBackendError, EvTimeout, EvCancel, EvProtocol}
}

// IsFailure says whether k is a failure event.
func (k EventKind) IsFailure() bool { return k >= EvConnClosed }

// Event is one input to a machine.
type Event struct {
	Kind EventKind
	// Err is the failure's cause (failure events, and a NOT_RESUMED's
	// message).
	Err error
	// Verified is the ACK's verdict (EvAcked).
	Verified bool
	// Stage is where the destination stands once the link is back
	// (EvRecovered).
	Stage Stage
}

// Stage is what a destination reports on a new link after a broken one:
// which part of the migration it still needs.
type Stage uint8

// The stages a destination can be at when the source reconnects.
const (
	// StageNotResumed: it holds the core state and waits for GO; it never
	// ran the domain.
	StageNotResumed Stage = iota + 1
	// StageRunning: the domain runs there; it needs the pages it lacks
	// and the checksums.
	StageRunning
	// StageAcking: it holds every page and has verified them; it sends
	// the ACK again.
	StageAcking
)

func (s Stage) String() string {
	switch s {
	case StageNotResumed:
		return "not-resumed"
	case StageRunning:
		return "running"
	case StageAcking:
		return "acking"
	}
	return fmt.Sprintf("stage(%d)", int(s))
}

// ActionKind says what the driver is to do.
type ActionKind uint8

// Source actions. Each but Report and DetachCancel ends with an event fed
// back to Step.
const (
	ActOpen          ActionKind = iota + 1 // write the stream headers and DOMAIN_HEADER
	ActAwaitCreated                        // wait for CREATED
	ActLive                                // pre-copy rounds / recording / early core pages
	ActPause                               // pause the domain
	ActSendStop                            // stop-phase pages, core state, SWITCHOVER
	ActAwaitReady                          // wait for READY
	ActRelinquish                          // mark the source copy as migrated away
	ActDetachCancel                        // the caller's cancel no longer stops the migration
	ActSendGo                              // write GO
	ActAwaitResumed                        // wait for RESUMED (or NOT_RESUMED)
	ActPostcopy                            // push and serve faults; then send the checksums
	ActAwaitAck                            // wait for the ACK
	ActDestroySource                       // destroy the source copy
	ActResumeSource                        // resume the source copy (undo the pause and the mark)
	ActReconnect                           // postcopy-paused: reconnect (with backoff, within the recovery time)
	ActReport                              // the migration has ended: Outcome
)

var actionNames = map[ActionKind]string{
	ActOpen: "open", ActAwaitCreated: "await-created", ActLive: "live", ActPause: "pause",
	ActSendStop: "send-stop", ActAwaitReady: "await-ready", ActRelinquish: "relinquish",
	ActDetachCancel: "detach-cancel", ActSendGo: "send-go", ActAwaitResumed: "await-resumed",
	ActPostcopy: "postcopy", ActAwaitAck: "await-ack", ActDestroySource: "destroy-source",
	ActResumeSource: "resume-source", ActReconnect: "reconnect", ActReport: "report",
}

func (k ActionKind) String() string {
	if n, ok := actionNames[k]; ok {
		return n
	}
	return fmt.Sprintf("action(%d)", int(k))
}

// Outcome is how a migration ended.
type Outcome struct {
	// OK: migrated, verified, source copy destroyed.
	OK bool
	// Where the domain is (0 when OK).
	Where Where
	// Err is the first failure (nil when OK).
	Err error
	// ResumeErr is the error of resuming the source copy (PausedAtSource).
	ResumeErr error
	// At is the state the first failure came in.
	At SourceState
	// Resumed: the source copy was paused and has been resumed.
	Resumed bool
	// Recoveries is how many times a broken link was replaced by a new one.
	Recoveries int
	// LinkErr is the last link failure a recovery got past (nil: none).
	LinkErr error
}

// Source is the source's machine.
type Source struct {
	state SourceState
	// recover: after GO a broken link pauses the migration
	// (SrcRecovering) instead of ending it.
	recover    bool
	takeOver   bool // started paused after GO (TakeOver)
	recoveries int
	linkErr    error
	destRan    bool // RESUMED arrived (or a recovery said it runs there)
	failAt     SourceState
	err        error
	rerr       error
	where      Where
	ok         bool
	started    bool
	resumed    bool
}

// NewSource returns a machine in SrcOpening.
func NewSource() *Source { return &Source{state: SrcOpening} }

// EnableRecovery makes a broken link after GO pause the migration and
// reconnect (ActReconnect) instead of ending it. Call before Start.
func (m *Source) EnableRecovery() { m.recover = true }

// TakeOver makes the machine start where a source process that died
// after GO left its migration: paused (SrcRecovering), recovery on, the
// first action a new link (ActReconnect). The destination's answer says
// where it stands, and GO was sent before by the dead process, so from
// the start the domain may run at the destination. Call before Start.
func (m *Source) TakeOver() {
	m.recover = true
	m.takeOver = true
	m.state = SrcRecovering
	m.linkErr = errors.New("the source process that sent GO died")
}

// State is the current state.
func (m *Source) State() SourceState { return m.state }

// Start returns the first actions.
func (m *Source) Start() []ActionKind {
	if m.started {
		return nil
	}
	m.started = true
	if m.takeOver {
		return []ActionKind{ActReconnect}
	}
	return []ActionKind{ActOpen}
}

// Outcome is how the migration ended; valid once Report was returned.
func (m *Source) Outcome() Outcome {
	return Outcome{OK: m.ok, Where: m.where, Err: m.err, ResumeErr: m.rerr, At: m.failAt, Resumed: m.resumed,
		Recoveries: m.recoveries, LinkErr: m.linkErr}
}

// Ended says whether the machine is done (Report returned).
func (m *Source) Ended() bool { return m.state == SrcDone || m.state == SrcFailed }

// MayRunAtDestination says whether the destination may be running the
// domain: from the moment GO may have left.
func (m *Source) MayRunAtDestination() bool {
	switch m.state {
	case SrcGoing, SrcAwaitResumed, SrcPostcopy, SrcVerifying, SrcDestroying, SrcRecovering, SrcDone:
		return true
	case SrcFailed:
		return m.where == AfterGo || m.where == RunsAtDestination
	}
	return false
}

// next maps a state and the success event that ends its action to the
// following state and its actions.
var sourceNext = map[SourceState]struct {
	on   EventKind
	to   SourceState
	acts []ActionKind
}{
	SrcOpening:       {EvOpened, SrcCreating, []ActionKind{ActAwaitCreated}},
	SrcCreating:      {EvCreated, SrcLive, []ActionKind{ActLive}},
	SrcLive:          {EvLiveDone, SrcPausing, []ActionKind{ActPause}},
	SrcPausing:       {EvPaused, SrcStopping, []ActionKind{ActSendStop}},
	SrcStopping:      {EvStopSent, SrcAwaitReady, []ActionKind{ActAwaitReady}},
	SrcAwaitReady:    {EvReady, SrcRelinquishing, []ActionKind{ActRelinquish}},
	SrcRelinquishing: {EvRelinquished, SrcGoing, []ActionKind{ActDetachCancel, ActSendGo}},
	SrcGoing:         {EvGoSent, SrcAwaitResumed, []ActionKind{ActAwaitResumed}},
	SrcAwaitResumed:  {EvResumed, SrcPostcopy, []ActionKind{ActPostcopy}},
	SrcPostcopy:      {EvPagesDone, SrcVerifying, []ActionKind{ActAwaitAck}},
	SrcVerifying:     {EvAcked, SrcDestroying, []ActionKind{ActDestroySource}},
}

// Step feeds one event and returns what to do next.
func (m *Source) Step(ev Event) []ActionKind {
	if m.Ended() {
		return nil
	}
	if ev.Kind == EvCancel && m.MayRunAtDestination() {
		// From GO on the domain may run at the destination with its
		// memory still here: a cancel must not end the migration, or the
		// guest is stranded there.
		return nil
	}
	// Three states wait on the backend, whose answer alone decides them:
	// other failures meanwhile are remembered and change nothing yet (a
	// connection closing while the domain is being paused does not unpause
	// it).
	switch m.state {
	case SrcRecovering:
		return m.recovering(ev)
	case SrcResuming:
		switch ev.Kind {
		case EvResumedHere:
			m.where = RunsAtSource
			m.resumed = true
			return m.end(SrcFailed)
		case EvBackendError:
			m.rerr = eventErr(ev)
			m.where = PausedAtSource
			return m.end(SrcFailed)
		}
		return nil // a late record (READY, say) changes nothing now
	case SrcDestroying:
		switch ev.Kind {
		case EvDestroyed:
			m.ok = true
			return m.end(SrcDone)
		case EvBackendError:
			m.fail(ev)
			m.where = RunsAtDestination
			return m.end(SrcFailed)
		}
		return nil
	case SrcPausing:
		switch {
		case ev.Kind == EvBackendError:
			// The pause failed: the domain still runs here.
			m.fail(ev)
			m.where = RunsAtSource
			return m.end(SrcFailed)
		case ev.Kind == EvPaused && m.err != nil:
			// Paused after a failure came in: undo the pause.
			m.state = SrcResuming
			return []ActionKind{ActResumeSource}
		}
	}
	if ev.Kind == EvNotResumed {
		switch m.state {
		case SrcGoing, SrcAwaitResumed:
			// The destination got GO and never ran the domain (its
			// hypervisor refused the vCPU state): it runs nowhere, so
			// resuming it here is safe.
			m.fail(Event{Kind: EvPeerError, Err: fmt.Errorf("the destination could not resume the domain and never ran it: %w", eventErr(ev))})
			m.state = SrcResuming
			return []ActionKind{ActResumeSource}
		}
		// Before GO it is a peer failure; after RESUMED the destination
		// has run the domain and cannot take that back.
		return m.failure(Event{Kind: EvProtocol, Err: fmt.Errorf("NOT_RESUMED in state %v: %w", m.state, eventErr(ev))})
	}
	if ev.Kind == EvResumed {
		m.destRan = true
	}
	if ev.Kind == EvAcked && m.state == SrcVerifying && !ev.Verified {
		return m.failure(Event{Kind: EvProtocol, Err: eventErr(ev)})
	}
	if ev.Kind.IsFailure() {
		return m.failure(ev)
	}
	n, ok := sourceNext[m.state]
	if !ok || n.on != ev.Kind {
		return m.failure(Event{Kind: EvProtocol, Err: fmt.Errorf("%v in state %v", ev.Kind, m.state)})
	}
	m.state = n.to
	return n.acts
}

// recoverable says whether a failure pauses the migration instead of
// ending it: a broken or silent link once GO may have left, with recovery
// on. The peer's ERROR, a backend's failure or a protocol error are not
// the link's: a new link would not change them.
func (m *Source) recoverable(ev Event) bool {
	if !m.recover || (ev.Kind != EvConnClosed && ev.Kind != EvTimeout) {
		return false
	}
	switch m.state {
	case SrcGoing, SrcAwaitResumed, SrcPostcopy, SrcVerifying:
		return true
	}
	return false
}

// recovering is the postcopy-paused state: the source copy stays paused
// with all its memory while the driver reconnects; only a new link or the
// end of the recovery time (any failure) decides.
func (m *Source) recovering(ev Event) []ActionKind {
	switch {
	case ev.Kind == EvRecovered:
		m.recoveries++
		switch ev.Stage {
		case StageNotResumed:
			if m.destRan {
				break // it said RESUMED before: it cannot take that back
			}
			// GO never arrived (or was lost with the link): send it again.
			m.state = SrcGoing
			return []ActionKind{ActSendGo}
		case StageRunning:
			m.destRan = true
			m.state = SrcPostcopy
			return []ActionKind{ActPostcopy}
		case StageAcking:
			m.destRan = true
			m.state = SrcVerifying
			return []ActionKind{ActAwaitAck}
		}
		m.fail(Event{Kind: EvProtocol, Err: fmt.Errorf("the destination reports stage %v after a recovery (it ran the domain: %v)", ev.Stage, m.destRan)})
	case ev.Kind.IsFailure():
		m.fail(Event{Kind: ev.Kind, Err: fmt.Errorf("%w (the link broke after GO: %v)", eventErr(ev), m.linkErr)})
	default:
		return nil // a late record of the old link changes nothing
	}
	m.where = AfterGo
	return m.end(SrcFailed)
}

// failure decides what a failure in the current state means for the
// domain: the invariant is that it runs on exactly one side, or is paused
// at the source with all its memory and runs nowhere.
func (m *Source) failure(ev Event) []ActionKind {
	if m.recoverable(ev) {
		m.linkErr = eventErr(ev)
		m.state = SrcRecovering
		return []ActionKind{ActReconnect}
	}
	m.fail(ev)
	switch m.state {
	case SrcOpening, SrcCreating, SrcLive:
		// Not paused: it runs here.
		m.where = RunsAtSource
		return m.end(SrcFailed)
	case SrcPausing:
		// The pause's own answer decides (above).
		return nil
	case SrcStopping, SrcAwaitReady, SrcRelinquishing:
		// Paused, GO not sent: nothing can run it elsewhere.
		m.state = SrcResuming
		return []ActionKind{ActResumeSource}
	}
	// GO may have left: the source copy stays paused with its memory.
	m.where = AfterGo
	return m.end(SrcFailed)
}

func (m *Source) fail(ev Event) {
	if m.err == nil {
		m.err = eventErr(ev)
		m.failAt = m.state
	}
}

func (m *Source) end(s SourceState) []ActionKind {
	m.state = s
	return []ActionKind{ActReport}
}

func eventErr(ev Event) error {
	if ev.Err != nil {
		return ev.Err
	}
	return errors.New(ev.Kind.String())
}
