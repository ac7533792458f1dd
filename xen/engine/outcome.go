package engine

import (
	"errors"
	"fmt"

	"github.com/xl-postcopy/xl-postcopy/xen/engine/protocol"
)

// Where says where the domain is once a migration has failed: what an
// administrator (or a caller such as the lab) acts on. Callers take it
// from the error with errors.As, never from the error's text. The
// protocol package's source machine decides it.
type Where = protocol.Where

// Where a domain can be after a failed migration (see protocol.Where).
const (
	RunsAtSource      = protocol.RunsAtSource
	PausedAtSource    = protocol.PausedAtSource
	AfterGo           = protocol.AfterGo
	RunsAtDestination = protocol.RunsAtDestination
)

// Error is a failed migration: where the domain is now, and why.
type Error struct {
	Domain string
	Where  Where
	Err    error
}

func (e *Error) Error() string {
	switch e.Where {
	case RunsAtSource:
		return fmt.Sprintf("migration failed, domain %q runs at the source: %v", e.Domain, e.Err)
	case PausedAtSource:
		return fmt.Sprintf("migration failed and resuming domain %q at the source failed too: %v; the domain is PAUSED at the source with all its memory", e.Domain, e.Err)
	case AfterGo:
		return fmt.Sprintf("migration failed after switchover: %v; the source copy of %q stays PAUSED with all its memory and is not resumed, so the domain never runs twice: check the destination", e.Err, e.Domain)
	case RunsAtDestination:
		return fmt.Sprintf("migration of %q complete and verified, it runs at the destination, but: %v; the source's paused copy is left here: remove it with xl destroy", e.Domain, e.Err)
	}
	return fmt.Sprintf("migration of %q: %v (%v)", e.Domain, e.Err, e.Where)
}

func (e *Error) Unwrap() error { return e.Err }

// WhereOf returns where err says the domain is, and false for an error
// that is not a migration outcome.
func WhereOf(err error) (Where, bool) {
	var e *Error
	if errors.As(err, &e) {
		return e.Where, true
	}
	return 0, false
}

// UnreadableError is returned by Source.ReadPages when some pages could not
// be read (a page the guest gave back to the hypervisor after the page set
// was taken); the buffer holds the others. Their content is unknown: the
// engine never sends them as data.
type UnreadableError struct {
	PFNs []uint64
	Err  error // the first per-page error, for the log
}

func (e *UnreadableError) Error() string {
	return fmt.Sprintf("%d pages unreadable (first pfn %#x): %v", len(e.PFNs), e.PFNs[0], e.Err)
}

func (e *UnreadableError) Unwrap() error { return e.Err }

// DestError is a destination's failed (or unverified) migration: what it
// left here, and why. Callers take Where with errors.As.
type DestError struct {
	Domain string
	Where  protocol.DestWhere
	// NeverRan: the domain got GO but could not be resumed here, so the
	// source resumes its copy.
	NeverRan bool
	// Missing is the pages still missing here (Where RunsHere).
	Missing uint64
	// Complete: every page is here (the failure came at or after the ACK).
	Complete bool
	Err      error
}

func (e *DestError) Error() string {
	switch e.Where {
	case protocol.NothingHere:
		return e.Err.Error()
	case protocol.DestroyedHere:
		if e.NeverRan {
			return fmt.Sprintf("%v; destroyed it here, the source resumes it", e.Err)
		}
		return fmt.Sprintf("%v; the half-received domain was destroyed here, the source keeps running it", e.Err)
	case protocol.DestroyFailed:
		return fmt.Sprintf("%v; domain %q is left PAUSED here and never ran here: remove it with xl destroy", e.Err, e.Domain)
	case protocol.RunsHere:
		if e.Complete {
			return fmt.Sprintf("%v (the domain is complete and runs here)", e.Err)
		}
		if e.Missing == 0 {
			return fmt.Sprintf("%v; the domain runs here with every page, unverified, and the source keeps a paused copy with all memory", e.Err)
		}
		return fmt.Sprintf("%v; the domain runs here with %d pages still missing: its vCPUs wait on those faults, and the source keeps a paused copy with all memory", e.Err, e.Missing)
	}
	return fmt.Sprintf("%v (%v)", e.Err, e.Where)
}

func (e *DestError) Unwrap() error { return e.Err }
