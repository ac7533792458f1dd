package engine

import (
	"errors"
	"fmt"
)

// Where says where the domain is once a migration has failed: what an
// administrator (or a caller such as the lab) acts on. Callers take it
// from the error with errors.As, never from the error's text.
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
)

func (w Where) String() string {
	switch w {
	case RunsAtSource:
		return "runs at the source"
	case PausedAtSource:
		return "paused at the source"
	case AfterGo:
		return "source copy paused, destination may run it"
	}
	return fmt.Sprintf("where(%d)", int(w))
}

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
