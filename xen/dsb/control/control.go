// Package control is the xenstore protocol between dom0 and the
// guest-balloon daemon, and the dom0 side of it.
//
// The daemon keeps its state under its domain's home,
// /local/domain/<domid>/data/balloon/ (keys below). dom0 writes its
// requests to Request; the daemon answers the first two in Ack with
// "<nonce> <target_kb> ok" or "<nonce> <target_kb> error <message>",
// writing ReleasedKB (and Hold) in the same transaction:
//
//   - "balloon-now:<nonce>": balloon down to the reserve at once, wait
//     until the balloon driver has reached the target, acknowledge.
//   - "balloon-hold:<nonce>:<seconds>": the same, and from the ack on
//     hold the balloon still (for a migration, which must not see the
//     domain's RAM change while it copies it): the periodic policy no
//     longer changes the target, and a re-announced memory/target (the
//     resume after a migration) makes the daemon put its own target back
//     at once. seconds is clamped to 1..MaxHoldSeconds; 0 or anything
//     but a decimal number is answered with an error ack and no hold.
//   - "hold-end:<nonce>": end the hold of that nonce (no answer but Hold).
//
// A hold also ends by itself after its seconds, and early when the
// policy sees memory pressure and wants memory back (the guest comes
// first). An administrator's new memory/target (xl mem-set) still wins.
// The daemon keeps the hold in memory, so it survives a migration, where
// the domain gets a new domid and a fresh home: hold-end goes to the new
// domain's Request. Hold says where it stands: "" when the daemon has not
// held, "held <nonce> until <unix-seconds>" while it holds, and
// "ended <nonce> <why>" after, why being dom0, timeout, pressure or
// stopped (the daemon stopped and gave the guest its memory back).
//
// Permissions: libxl creates data/ owned by the guest, and xenstored gives
// a node dom0 creates the permissions of its parent, so a data/balloon/
// created by either side is owned by the guest and both can use it.
// PrepareDomain makes that explicit for toolstacks that create data/
// differently.
package control

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/xenstore"
)

// Dir is the daemon's directory relative to the domain's home; the guest
// uses it as a relative path, which xenstored resolves against the
// domain's current home (so it follows the domain across a migration,
// where the domid changes).
const Dir = "data/balloon"

// Keys under Dir.
const (
	KeyState     = "state"        // running | stopped | dry-run
	KeyTarget    = "target_kb"    // balloon target now in force
	KeyCurrent   = "current_kb"   // memory the balloon driver holds
	KeyFree      = "free_kb"      // MemFree
	KeyAvailable = "available_kb" // MemAvailable
	KeyReserve   = "reserve_kb"   // the policy's reserve
	KeyFloor     = "floor_kb"     // the policy's floor
	KeyMax       = "max_kb"       // the ceiling; kept across daemon restarts
	KeyReason    = "reason"       // why the last decision was taken
	KeyUpdated   = "updated"      // Unix time of the last publication
	KeyPages     = "pages"        // kpageflags class counts, if enabled
	KeyRequest   = "request"      // written by dom0
	KeyAck       = "ack"          // written by the daemon
	KeyReleased  = "released_kb"  // memory the last balloon-now or balloon-hold gave back
	KeyHold      = "hold"         // "", "held <nonce> until <unix>", "ended <nonce> <why>"
)

// Key returns Dir/key, relative to the domain's home.
func Key(key string) string { return Dir + "/" + key }

// HomePath returns /local/domain/<domid>.
func HomePath(domid uint32) string { return "/local/domain/" + strconv.FormatUint(uint64(domid), 10) }

// Path returns the absolute path of a key of domid's daemon.
func Path(domid uint32, key string) string { return HomePath(domid) + "/" + Key(key) }

// RequestPrefix starts every balloon-now request.
const RequestPrefix = "balloon-now:"

// FormatRequest returns the request value for nonce.
func FormatRequest(nonce string) string { return RequestPrefix + nonce }

// ParseRequest returns the nonce of a request value. ok is false for an
// empty or foreign value.
func ParseRequest(v string) (nonce string, ok bool) {
	nonce, ok = strings.CutPrefix(strings.TrimSpace(v), RequestPrefix)
	if !ok || !validNonce(nonce) {
		return "", false
	}
	return nonce, true
}

// Prefixes of the hold requests.
const (
	HoldRequestPrefix = "balloon-hold:"
	HoldEndPrefix     = "hold-end:"
)

// MaxHoldSeconds is the longest hold a daemon grants; longer requests are
// cut to it.
const MaxHoldSeconds = 3600

// FormatHoldRequest returns the balloon-hold request value for nonce,
// with hold rounded up to whole seconds. A hold under a nanosecond gives
// "0", which the daemon rejects.
func FormatHoldRequest(nonce string, hold time.Duration) string {
	sec := int64(0)
	if hold > 0 {
		sec = int64((hold + time.Second - 1) / time.Second)
	}
	return HoldRequestPrefix + nonce + ":" + strconv.FormatInt(sec, 10)
}

// FormatHoldEnd returns the hold-end request value for nonce.
func FormatHoldEnd(nonce string) string { return HoldEndPrefix + nonce }

// RequestKind says what a request asks for.
type RequestKind int

// Request kinds.
const (
	BalloonNow  RequestKind = iota + 1 // "balloon-now:<nonce>"
	BalloonHold                        // "balloon-hold:<nonce>:<seconds>"
	HoldEnd                            // "hold-end:<nonce>"
)

func (k RequestKind) String() string {
	switch k {
	case BalloonNow:
		return "balloon-now"
	case BalloonHold:
		return "balloon-hold"
	case HoldEnd:
		return "hold-end"
	}
	return "request-kind-" + strconv.Itoa(int(k))
}

// Request is a parsed request value.
type Request struct {
	Kind  RequestKind
	Nonce string
	// Hold is a balloon-hold's duration, clamped to 1..MaxHoldSeconds s.
	Hold time.Duration
}

// ErrNotRequest is returned by ParseAnyRequest for a value that is no
// request one can answer: empty, foreign, or without a valid nonce.
var ErrNotRequest = errors.New("not a guest-balloon request")

// ParseAnyRequest parses a request value of any kind. The error wraps
// ErrNotRequest when there is nothing to answer. A balloon-hold with a
// valid nonce but seconds missing, zero or not a decimal number returns
// the Request (Kind and Nonce set) with an error saying why: the daemon
// answers it with an error ack.
func ParseAnyRequest(v string) (Request, error) {
	v = strings.TrimSpace(v)
	if n, ok := ParseRequest(v); ok {
		return Request{Kind: BalloonNow, Nonce: n}, nil
	}
	if n, ok := strings.CutPrefix(v, HoldEndPrefix); ok && validNonce(n) {
		return Request{Kind: HoldEnd, Nonce: n}, nil
	}
	rest, ok := strings.CutPrefix(v, HoldRequestPrefix)
	if !ok {
		return Request{}, fmt.Errorf("%w: %q", ErrNotRequest, v)
	}
	// The nonce may contain ':'; the seconds are after the last one.
	nonce, sec := rest, ""
	if i := strings.LastIndexByte(rest, ':'); i >= 0 {
		nonce, sec = rest[:i], rest[i+1:]
	}
	if !validNonce(nonce) {
		return Request{}, fmt.Errorf("%w: %q has no valid nonce", ErrNotRequest, v)
	}
	r := Request{Kind: BalloonHold, Nonce: nonce}
	n, err := strconv.ParseUint(sec, 10, 64)
	switch {
	case errors.Is(err, strconv.ErrRange):
		n = MaxHoldSeconds
	case err != nil:
		return r, fmt.Errorf("bad request %q: the hold is not \"%s<nonce>:<seconds>\" with decimal seconds", v, HoldRequestPrefix)
	case n == 0:
		return r, fmt.Errorf("bad request %q: a hold of 0 seconds", v)
	}
	r.Hold = time.Duration(min(n, MaxHoldSeconds)) * time.Second
	return r, nil
}

// Why a hold ended, in Hold's "ended <nonce> <why>".
const (
	HoldEndedDom0     = "dom0"     // dom0 wrote hold-end
	HoldEndedTimeout  = "timeout"  // its seconds ran out
	HoldEndedPressure = "pressure" // the guest needed memory back
	HoldEndedStopped  = "stopped"  // the daemon stopped
)

// HoldStatus is the value of KeyHold. The zero value is "" (the daemon
// has not held since it started).
type HoldStatus struct {
	Nonce string
	Held  bool      // "held <nonce> until <unix-seconds>"
	Until time.Time // while Held: when the hold times out
	Ended string    // "ended <nonce> <why>": why (HoldEnded*); "" otherwise
}

// String formats the value of KeyHold.
func (h HoldStatus) String() string {
	switch {
	case h.Held:
		return "held " + h.Nonce + " until " + strconv.FormatInt(h.Until.Unix(), 10)
	case h.Ended != "":
		return "ended " + h.Nonce + " " + h.Ended
	}
	return ""
}

// ParseHold parses a value of KeyHold.
func ParseHold(v string) (HoldStatus, error) {
	f := strings.Fields(v)
	switch {
	case len(f) == 0:
		return HoldStatus{}, nil
	case len(f) == 4 && f[0] == "held" && f[2] == "until" && validNonce(f[1]):
		sec, err := strconv.ParseInt(f[3], 10, 64)
		if err != nil {
			return HoldStatus{}, fmt.Errorf("balloon hold %q: bad time: %w", v, err)
		}
		return HoldStatus{Nonce: f[1], Held: true, Until: time.Unix(sec, 0)}, nil
	case len(f) == 3 && f[0] == "ended" && validNonce(f[1]):
		return HoldStatus{Nonce: f[1], Ended: f[2]}, nil
	}
	return HoldStatus{}, fmt.Errorf("balloon hold %q is not \"\", \"held <nonce> until <unix-seconds>\" or \"ended <nonce> <why>\"", v)
}

func validNonce(n string) bool {
	if n == "" || len(n) > 64 {
		return false
	}
	for _, c := range n {
		if c <= ' ' || c > '~' {
			return false
		}
	}
	return true
}

// NewNonce returns 16 random hex digits.
func NewNonce() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b[:])
}

// Ack is the daemon's answer to a request.
type Ack struct {
	Nonce    string
	TargetKB uint64 // the target the daemon set
	OK       bool
	Err      string // the daemon's message when !OK
	// ReleasedKB is what the guest gave back (read from KeyReleased by
	// RequestBalloon and RequestHold; not part of the ack value).
	ReleasedKB uint64
	// HoldUntil is when the hold granted to a balloon-hold times out
	// (read from KeyHold by RequestHold; zero when the daemon did not
	// hold, e.g. for a bad request).
	HoldUntil time.Time
}

// String formats the ack value: "<nonce> <target_kb> ok" or
// "<nonce> <target_kb> error <message>".
func (a Ack) String() string {
	s := a.Nonce + " " + strconv.FormatUint(a.TargetKB, 10)
	if a.OK {
		return s + " ok"
	}
	msg := strings.Join(strings.Fields(a.Err), " ")
	if msg == "" {
		msg = "unspecified failure"
	}
	return s + " error " + msg
}

// ParseAck parses an ack value.
func ParseAck(v string) (Ack, error) {
	f := strings.SplitN(strings.TrimSpace(v), " ", 3)
	if len(f) != 3 || !validNonce(f[0]) {
		return Ack{}, fmt.Errorf("balloon ack %q is not \"<nonce> <target_kb> ok|error <msg>\"", v)
	}
	t, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return Ack{}, fmt.Errorf("balloon ack %q: bad target: %w", v, err)
	}
	a := Ack{Nonce: f[0], TargetKB: t}
	switch {
	case f[2] == "ok":
		a.OK = true
	case f[2] == "error" || strings.HasPrefix(f[2], "error "):
		a.Err = strings.TrimSpace(strings.TrimPrefix(f[2], "error"))
	default:
		return Ack{}, fmt.Errorf("balloon ack %q: status is neither ok nor error", v)
	}
	return a, nil
}

// PrepareDomain makes sure domid's data/balloon exists and belongs to the
// guest, so that the daemon can read dom0's requests and write its state
// whoever created the directory first. It needs a dom0 connection.
func PrepareDomain(ctx context.Context, c *xenstore.Client, domid uint32) error {
	dir := HomePath(domid) + "/" + Dir
	if err := c.Mkdir(ctx, dir); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	perms, err := c.GetPerms(ctx, dir)
	if err != nil {
		return fmt.Errorf("reading the permissions of %s: %w", dir, err)
	}
	if perms[0].Domid == domid {
		return nil // already the guest's: avoid a needless watch event
	}
	if err := c.SetPerms(ctx, dir, xenstore.Perm{Domid: domid, Access: xenstore.AccessNone}); err != nil {
		return fmt.Errorf("giving %s to domain %d: %w", dir, domid, err)
	}
	return nil
}

// ErrNoAnswer is returned by RequestBalloon and RequestHold when no ack
// came in time.
var ErrNoAnswer = errors.New("no answer from guest-balloon")

// RequestBalloon asks domid's guest-balloon daemon to balloon down to its
// reserve now and waits up to timeout for the acknowledgement. An ack
// with !OK is returned with a nil error: the daemon answered, and the
// caller decides whether its failure matters (a migration can go on).
func RequestBalloon(ctx context.Context, c *xenstore.Client, domid uint32, timeout time.Duration) (Ack, error) {
	return request(ctx, c, domid, timeout, BalloonNow, FormatRequest)
}

// RequestHold asks domid's guest-balloon daemon to balloon down to its
// reserve now and then to hold the balloon still for up to hold (whole
// seconds, rounded up; the daemon cuts it to MaxHoldSeconds), and waits up
// to timeout for the acknowledgement, as RequestBalloon does. The Ack
// carries the Nonce that EndHold needs and, when the daemon holds,
// HoldUntil. The daemon holds even when ballooning failed (an ack with
// !OK and a HoldUntil); a rejected request comes back with !OK and no
// HoldUntil. The hold ends with EndHold, after hold, or when the guest
// comes under memory pressure.
func RequestHold(ctx context.Context, c *xenstore.Client, domid uint32, timeout, hold time.Duration) (Ack, error) {
	if hold <= 0 {
		return Ack{}, fmt.Errorf("holding domain %d's balloon: the hold must be positive, not %v", domid, hold)
	}
	a, err := request(ctx, c, domid, timeout, BalloonHold, func(nonce string) string {
		return FormatHoldRequest(nonce, hold)
	})
	if err != nil {
		return a, err
	}
	if v, err := c.Read(ctx, Path(domid, KeyHold)); err == nil {
		if h, err := ParseHold(v); err == nil && h.Held && h.Nonce == a.Nonce {
			a.HoldUntil = h.Until
		}
	}
	return a, nil
}

// EndHold tells domid's guest-balloon daemon to end the hold that
// RequestHold's nonce started (after a migration, domid is the domain's
// new id). It does not wait: the daemon says in KeyHold when it is done
// ("ended <nonce> dom0"), and a hold dom0 never ends times out anyway.
func EndHold(ctx context.Context, c *xenstore.Client, domid uint32, nonce string) error {
	if !validNonce(nonce) {
		return fmt.Errorf("ending the balloon hold of domain %d: invalid nonce %q", domid, nonce)
	}
	if err := prepare(ctx, c, domid); err != nil {
		return fmt.Errorf("ending the balloon hold of domain %d: %w", domid, err)
	}
	if err := c.Write(ctx, Path(domid, KeyRequest), FormatHoldEnd(nonce)); err != nil {
		return fmt.Errorf("writing the hold-end request for domain %d: %w", domid, err)
	}
	return nil
}

// prepare checks that domid exists and readies its data/balloon.
func prepare(ctx context.Context, c *xenstore.Client, domid uint32) error {
	home := HomePath(domid)
	if _, err := c.Read(ctx, home); err != nil {
		if errors.Is(err, xenstore.ErrNotFound) {
			return fmt.Errorf("domain %d has no xenstore home %s: does it exist?", domid, home)
		}
		return fmt.Errorf("reading %s: %w", home, err)
	}
	return PrepareDomain(ctx, c, domid)
}

// request writes the request value format(nonce) for a new nonce and
// waits up to timeout for the daemon's ack of that nonce.
func request(ctx context.Context, c *xenstore.Client, domid uint32, timeout time.Duration, kind RequestKind, format func(nonce string) string) (Ack, error) {
	if err := prepare(ctx, c, domid); err != nil {
		return Ack{}, err
	}
	ackPath := Path(domid, KeyAck)
	// The watch goes first so that an ack cannot slip in unseen.
	w, err := c.Watch(ctx, ackPath)
	if err != nil {
		return Ack{}, fmt.Errorf("watching %s: %w", ackPath, err)
	}
	defer w.Close()

	nonce := NewNonce()
	if err := c.Write(ctx, Path(domid, KeyRequest), format(nonce)); err != nil {
		return Ack{}, fmt.Errorf("writing the %s request for domain %d: %w", kind, domid, err)
	}
	tctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		select {
		case _, ok := <-w.Events():
			if !ok {
				return Ack{}, fmt.Errorf("waiting for domain %d's %s ack: %w", domid, kind, w.Err())
			}
			v, err := c.Read(tctx, ackPath)
			if errors.Is(err, xenstore.ErrNotFound) {
				continue
			}
			if err != nil {
				return Ack{}, fmt.Errorf("reading %s: %w", ackPath, err)
			}
			a, err := ParseAck(v)
			if err != nil || a.Nonce != nonce {
				continue // an older answer, or garbage: keep waiting
			}
			if r, err := c.Read(tctx, Path(domid, KeyReleased)); err == nil {
				a.ReleasedKB, _ = strconv.ParseUint(strings.TrimSpace(r), 10, 64)
			}
			return a, nil
		case <-tctx.Done():
			if ctx.Err() != nil {
				return Ack{}, ctx.Err()
			}
			return Ack{}, noAnswer(ctx, c, domid, timeout, kind)
		}
	}
}

// noAnswer builds the timeout error, with what the daemon last published
// when there is something.
func noAnswer(ctx context.Context, c *xenstore.Client, domid uint32, timeout time.Duration, kind RequestKind) error {
	what, hint := "", "is guest-balloon running in the guest?"
	if kind == BalloonHold {
		// A daemon from before balloon-hold ignores it.
		what, hint = " the balloon-hold request", "is guest-balloon running in the guest, and new enough to know balloon-hold?"
	}
	if st, err := c.Read(ctx, Path(domid, KeyState)); err == nil {
		hint += fmt.Sprintf(" (its last state was %q", st)
		if u, err := c.Read(ctx, Path(domid, KeyUpdated)); err == nil {
			if sec, err := strconv.ParseInt(u, 10, 64); err == nil {
				hint += fmt.Sprintf(", published %s ago", time.Since(time.Unix(sec, 0)).Round(time.Second))
			}
		}
		hint += ")"
	}
	return fmt.Errorf("%w: no guest-balloon daemon answered%s in domain %d within %v: %s", ErrNoAnswer, what, domid, timeout, hint)
}

// ResolveDomain turns a domain name or numeric id into a domid, looking
// names up in /local/domain/*/name like xl does.
func ResolveDomain(ctx context.Context, c *xenstore.Client, dom string) (uint32, error) {
	if id, err := strconv.ParseUint(dom, 10, 16); err == nil {
		if _, err := c.Read(ctx, HomePath(uint32(id))); err != nil {
			if errors.Is(err, xenstore.ErrNotFound) {
				return 0, fmt.Errorf("domain %d does not exist (no %s in xenstore)", id, HomePath(uint32(id)))
			}
			return 0, fmt.Errorf("looking up domain %d: %w", id, err)
		}
		return uint32(id), nil
	}
	ids, err := c.Directory(ctx, "/local/domain")
	if err != nil {
		return 0, fmt.Errorf("listing domains in xenstore: %w", err)
	}
	for _, s := range ids {
		id, err := strconv.ParseUint(s, 10, 16)
		if err != nil {
			continue
		}
		name, err := c.Read(ctx, "/local/domain/"+s+"/name")
		if err == nil && name == dom {
			return uint32(id), nil
		}
	}
	return 0, fmt.Errorf("no domain named %q (see xl list)", dom)
}
