package protocol

import "fmt"

// DestState is a state of the destination's machine.
type DestState uint8

// The destination's states, in the order a migration passes them.
const (
	DstHeader    DestState = iota // waiting for DOMAIN_HEADER
	DstCreating                   // creating the domain (paused)
	DstReceiving                  // CREATED sent: pages, page set, discards, core state
	DstSwitching                  // SWITCHOVER answered with READY; waiting for GO
	DstResuming                   // GO received: resuming the domain
	DstRunning                    // the domain runs here; pages still come
	DstComplete                   // the final checksums arrived: waiting for the last pages, reading back
	DstAcking                     // sending STATS and ACK (with recovery: until BYE says the source has it)
	DstPaused                     // postcopy-paused: the link broke after SWITCHOVER; waiting for the source to reattach
	DstDone                       // complete; the domain runs here
	DstFailed                     // ended; DestOutcome says where the domain is
	numDestStates
)

var destStateNames = [...]string{
	"header", "creating", "receiving", "switching", "resuming", "running", "complete", "acking", "postcopy-paused", "done", "failed",
}

func (s DestState) String() string {
	if int(s) < len(destStateNames) {
		return destStateNames[s]
	}
	return fmt.Sprintf("dest-state(%d)", int(s))
}

// DestStates lists every state.
func DestStates() []DestState {
	out := make([]DestState, 0, numDestStates)
	for s := range numDestStates {
		out = append(out, s)
	}
	return out
}

// DestWhere says what became of the destination's domain.
type DestWhere int

// What a destination can leave behind.
const (
	// NothingHere: no domain was created here (or the factory removed
	// what it made); the source keeps running the domain.
	NothingHere DestWhere = iota + 1
	// DestroyedHere: the half-received domain was destroyed here; it
	// never ran here, so the source runs it (or resumes it).
	DestroyedHere
	// DestroyFailed: destroying the half-received domain failed: a paused
	// domain that never ran is left here for the administrator.
	DestroyFailed
	// RunsHere: the domain ran here; it is left as it is (its vCPUs wait
	// on missing pages, if any) and the source keeps a paused copy.
	RunsHere
)

func (w DestWhere) String() string {
	switch w {
	case NothingHere:
		return "nothing created here"
	case DestroyedHere:
		return "destroyed here, never ran here"
	case DestroyFailed:
		return "left paused here, never ran here"
	case RunsHere:
		return "runs here"
	}
	return fmt.Sprintf("dest-where(%d)", int(w))
}

// Record is a record type the destination's machine judges (the wire
// package's types, without depending on it).
type Record uint8

// The records the source sends on the bulk stream.
const (
	RecDomainHeader Record = iota + 1
	RecPageBatch
	RecPageSet
	RecDiscard
	RecCoreState
	RecSwitchover
	RecGo
	RecDone      // a checksum chunk
	RecDoneFinal // the last checksum chunk
	RecKeepalive
	RecError
	RecBye // the source has the ACK: the migration is over for both
)

var recordNames = map[Record]string{
	RecDomainHeader: "DOMAIN_HEADER", RecPageBatch: "PAGE_BATCH", RecPageSet: "PAGE_SET",
	RecDiscard: "DISCARD", RecCoreState: "CORE_STATE", RecSwitchover: "SWITCHOVER", RecGo: "GO",
	RecDone: "DONE", RecDoneFinal: "DONE(final)", RecKeepalive: "KEEPALIVE", RecError: "ERROR", RecBye: "BYE",
}

func (r Record) String() string {
	if n, ok := recordNames[r]; ok {
		return n
	}
	return fmt.Sprintf("record(%d)", int(r))
}

// DestEventKind says what happened at the destination.
type DestEventKind uint8

// Destination events.
const (
	DevRecord     DestEventKind = iota + 1 // a record arrived on the bulk stream (DestEvent.Record)
	DevCreated                             // the factory made the domain
	DevResumed                             // the domain runs
	DevAllIn                               // every page is present
	DevAcked                               // STATS and ACK are out
	DevReattached                          // the source is back on a new link (postcopy-paused)

	DevConnClosed
	DevPeerError // the source's ERROR: it gave up (a new link would not change that)
	DevBackendError
	DevTimeout
	DevCancel
	DevProtocol
)

// DestFailures lists the failure events.
func DestFailures() []DestEventKind {
	return []DestEventKind{DevConnClosed, DevPeerError, DevBackendError, DevTimeout, DevCancel, DevProtocol}
}

var destEventNames = map[DestEventKind]string{
	DevRecord: "record", DevCreated: "created", DevResumed: "resumed", DevAllIn: "all-in",
	DevAcked: "acked", DevReattached: "reattached", DevConnClosed: "conn-closed", DevPeerError: "peer-error",
	DevBackendError: "backend-error", DevTimeout: "timeout", DevCancel: "cancel", DevProtocol: "protocol-error",
}

func (k DestEventKind) String() string {
	if n, ok := destEventNames[k]; ok {
		return n
	}
	return fmt.Sprintf("dest-event(%d)", int(k))
}

// IsFailure says whether k is a failure event.
func (k DestEventKind) IsFailure() bool { return k >= DevConnClosed }

// DestEvent is one input to the destination's machine.
type DestEvent struct {
	Kind   DestEventKind
	Record Record // DevRecord
	Err    error
}

// DestAction says what the destination's driver is to do.
type DestAction uint8

// Destination actions.
const (
	DactCreate         DestAction = iota + 1 // run the factory
	DactSendCreated                          // send CREATED
	DactAccept                               // handle the record just judged (place, discard, keep the core state...)
	DactSendReady                            // answer SWITCHOVER
	DactDetachCancel                         // from resume on, the caller's cancel no longer stops it
	DactResume                               // resume the domain with the core state
	DactSendResumed                          // send RESUMED
	DactAwaitAllIn                           // wait for the last pages, read the memory back
	DactAck                                  // send STATS and ACK
	DactSendError                            // tell the source why (ERROR)
	DactSendNotResumed                       // tell the source the domain never ran here (NOT_RESUMED)
	DactDestroy                              // destroy the half-received domain
	DactAwaitReattach                        // postcopy-paused: keep the domain, wait for the source on a new link
	DactRestart                              // after a reattach: forget partial checksums, ask again for the pages faulted on
	DactReport                               // ended: DestOutcome
)

var destActionNames = map[DestAction]string{
	DactCreate: "create", DactSendCreated: "send-created", DactSendResumed: "send-resumed", DactAccept: "accept", DactSendReady: "send-ready", DactDetachCancel: "detach-cancel",
	DactResume: "resume", DactAwaitAllIn: "await-all-in", DactAck: "ack", DactSendError: "send-error",
	DactSendNotResumed: "send-not-resumed", DactDestroy: "destroy", DactReport: "report",
	DactAwaitReattach: "await-reattach", DactRestart: "restart",
}

func (a DestAction) String() string {
	if n, ok := destActionNames[a]; ok {
		return n
	}
	return fmt.Sprintf("dest-action(%d)", int(a))
}

// DestOutcome is how the destination's side ended.
type DestOutcome struct {
	OK    bool
	Where DestWhere // 0 when OK
	Err   error
	At    DestState // the state the first failure came in
	// Recoveries is how many times the source came back on a new link.
	Recoveries int
}

// Dest is the destination's machine.
type Dest struct {
	state DestState
	// recover: after SWITCHOVER a broken link pauses (DstPaused) instead
	// of ending this side; from holds the state it broke in.
	recover    bool
	from       DestState
	recoveries int
	linkErr    error
	ackSent    bool
	haveCore   bool
	err        error
	at         DestState
	where      DestWhere
	ok         bool
}

// NewDest returns a machine waiting for DOMAIN_HEADER.
func NewDest() *Dest { return &Dest{state: DstHeader} }

// EnableRecovery makes a broken link after SWITCHOVER pause this side
// until the source reattaches, instead of ending it.
func (m *Dest) EnableRecovery() { m.recover = true }

// Stage is what this side tells a source that reattaches (DstPaused).
func (m *Dest) Stage() Stage {
	switch m.from {
	case DstSwitching:
		return StageNotResumed
	case DstAcking:
		return StageAcking
	}
	return StageRunning
}

// State is the current state.
func (m *Dest) State() DestState { return m.state }

// Ended says whether the machine is done.
func (m *Dest) Ended() bool { return m.state == DstDone || m.state == DstFailed }

// Outcome is how the destination's side ended.
func (m *Dest) Outcome() DestOutcome {
	return DestOutcome{OK: m.ok, Where: m.where, Err: m.err, At: m.at, Recoveries: m.recoveries}
}

// Ran says whether the domain has run (or may be running) here.
func (m *Dest) Ran() bool {
	switch m.state {
	case DstRunning, DstComplete, DstAcking, DstDone:
		return true
	case DstPaused:
		return m.from != DstSwitching
	case DstFailed:
		return m.where == RunsHere
	}
	return false
}

// Step feeds one event and returns what to do next.
func (m *Dest) Step(ev DestEvent) []DestAction {
	if m.Ended() {
		return nil
	}
	if ev.Kind == DevCancel && m.Ran() {
		// The domain runs here and this is its only running copy.
		return nil
	}
	if m.state == DstPaused {
		return m.paused(ev)
	}
	if m.state == DstResuming {
		switch {
		case ev.Kind == DevResumed && m.err != nil:
			// It runs now, and something failed meanwhile: it stays
			// here, the source keeps its paused copy.
			m.state = DstFailed
			m.where = RunsHere
			return []DestAction{DactSendError, DactReport}
		case ev.Kind == DevResumed:
			m.state = DstRunning
			return []DestAction{DactSendResumed}
		case ev.Kind == DevBackendError:
			// The domain never ran here: the source may resume it, and
			// must be told so.
			m.failed(ev)
			m.state = DstFailed
			m.where = DestroyedHere
			return []DestAction{DactSendNotResumed, DactDestroy}
		case ev.Kind.IsFailure():
			// The resume's own answer decides.
			m.failed(ev)
			return nil
		}
		return m.failure(DestEvent{Kind: DevProtocol, Err: fmt.Errorf("%v while resuming", describe(ev))})
	}
	if m.state == DstCreating {
		// The factory's own answer decides: a failure meanwhile is
		// remembered, and what it made is destroyed once it returns.
		switch {
		case ev.Kind == DevBackendError:
			return m.failure(ev)
		case ev.Kind == DevCreated && m.err != nil:
			m.state = DstFailed
			m.where = DestroyedHere
			return []DestAction{DactSendError, DactDestroy}
		case ev.Kind.IsFailure():
			m.failed(ev)
			return nil
		}
	}
	if m.state == DstFailed {
		return nil
	}
	if ev.Kind.IsFailure() {
		return m.failure(ev)
	}
	switch ev.Kind {
	case DevCreated:
		if m.state == DstCreating {
			m.state = DstReceiving
			return []DestAction{DactSendCreated}
		}
	case DevAllIn:
		if m.state == DstComplete {
			m.state = DstAcking
			return []DestAction{DactAck}
		}
	case DevAcked:
		if m.state == DstAcking && m.recover {
			// Done once the source says it has the ACK (BYE): an ACK lost
			// with the link is sent again on the next.
			m.ackSent = true
			return nil
		}
		if m.state == DstAcking {
			m.ok = true
			m.state = DstDone
			return []DestAction{DactReport}
		}
	case DevRecord:
		return m.record(ev.Record)
	}
	return m.failure(DestEvent{Kind: DevProtocol, Err: fmt.Errorf("%v in state %v", describe(ev), m.state)})
}

// record judges one record from the source against the state.
func (m *Dest) record(r Record) []DestAction {
	bad := func() []DestAction {
		return m.failure(DestEvent{Kind: DevProtocol, Err: fmt.Errorf("unexpected %v record in state %v", r, m.state)})
	}
	switch r {
	case RecKeepalive:
		return nil
	case RecError:
		return m.failure(DestEvent{Kind: DevPeerError, Err: fmt.Errorf("the source sent ERROR")})
	}
	switch m.state {
	case DstAcking:
		if r == RecBye && m.ackSent {
			m.ok = true
			m.state = DstDone
			return []DestAction{DactReport}
		}
	case DstHeader:
		if r != RecDomainHeader {
			return bad()
		}
		m.state = DstCreating
		return []DestAction{DactCreate}
	case DstReceiving:
		switch r {
		case RecPageBatch, RecPageSet, RecDiscard:
			return []DestAction{DactAccept}
		case RecCoreState:
			if m.haveCore {
				return bad()
			}
			m.haveCore = true
			return []DestAction{DactAccept}
		case RecSwitchover:
			if !m.haveCore {
				return m.failure(DestEvent{Kind: DevProtocol, Err: fmt.Errorf("SWITCHOVER before CORE_STATE")})
			}
			m.state = DstSwitching
			return []DestAction{DactAccept, DactSendReady}
		}
	case DstSwitching:
		if r == RecGo {
			m.state = DstResuming
			return []DestAction{DactDetachCancel, DactResume}
		}
	case DstRunning:
		switch r {
		case RecPageBatch, RecDone:
			return []DestAction{DactAccept}
		case RecDoneFinal:
			m.state = DstComplete
			return []DestAction{DactAccept, DactAwaitAllIn}
		}
	}
	return bad()
}

// paused is the postcopy-paused state: the domain stays as it is (vCPUs
// waiting on missing pages keep waiting) until the source reattaches or
// the recovery time ends (any failure).
func (m *Dest) paused(ev DestEvent) []DestAction {
	switch {
	case ev.Kind == DevReattached:
		m.recoveries++
		switch m.from {
		case DstSwitching:
			m.state = DstSwitching
			return nil
		case DstAcking:
			m.state = DstAcking
			m.ackSent = false
			return []DestAction{DactAck}
		}
		// The checksums, if some came, are sent again after the pages.
		m.state = DstRunning
		return []DestAction{DactRestart}
	case ev.Kind.IsFailure():
		if ev.Kind == DevCancel && m.from != DstSwitching {
			return nil // the only running copy: a cancel does not end it
		}
		if m.err == nil {
			m.failed(ev)
			m.err = fmt.Errorf("%w (the link broke after SWITCHOVER: %v)", m.err, m.linkErr)
			m.at = m.from
		}
		m.state = DstFailed
		if m.from == DstSwitching {
			// It never ran here: the source never resumed its copy
			// either (GO may have left), and keeps it paused.
			m.where = DestroyedHere
			return []DestAction{DactSendError, DactDestroy}
		}
		m.where = RunsHere
		return []DestAction{DactSendError, DactReport}
	}
	return nil
}

// failure decides what a failure means for the domain here.
func (m *Dest) failure(ev DestEvent) []DestAction {
	if m.recover && (ev.Kind == DevConnClosed || ev.Kind == DevTimeout) {
		switch m.state {
		case DstSwitching, DstRunning, DstComplete, DstAcking:
			m.linkErr = ev.Err
			m.from = m.state
			m.state = DstPaused
			return []DestAction{DactAwaitReattach}
		}
	}
	m.failed(ev)
	prev := m.state
	m.state = DstFailed
	switch prev {
	case DstHeader, DstCreating:
		// Nothing here (a factory that fails removes what it made).
		m.where = NothingHere
		return []DestAction{DactSendError, DactReport}
	case DstReceiving, DstSwitching:
		// It never ran here: destroy it, the source resumes its copy.
		m.where = DestroyedHere
		return []DestAction{DactSendError, DactDestroy}
	}
	// It ran here: it stays, the source keeps its paused copy.
	m.where = RunsHere
	return []DestAction{DactSendError, DactReport}
}

// Destroyed feeds the result of DactDestroy: nil, or the error that left
// the domain behind.
func (m *Dest) Destroyed(err error) []DestAction {
	if m.state != DstFailed || m.where != DestroyedHere {
		return nil
	}
	if err != nil {
		m.where = DestroyFailed
		m.err = fmt.Errorf("%w (destroying the domain that never ran here failed too: %v)", m.err, err)
	}
	return []DestAction{DactReport}
}

func (m *Dest) failed(ev DestEvent) {
	if m.err == nil {
		m.err = ev.Err
		if m.err == nil {
			m.err = fmt.Errorf("%v", ev.Kind)
		}
		m.at = m.state
	}
}

func describe(ev DestEvent) string {
	if ev.Kind == DevRecord {
		return ev.Record.String()
	}
	return ev.Kind.String()
}
