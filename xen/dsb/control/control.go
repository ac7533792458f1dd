// Package control is the xenstore protocol between dom0 and the
// guest-balloon daemon, and the dom0 side of it.
//
// The daemon keeps its state under its domain's home,
// /local/domain/<domid>/data/balloon/ (keys below). dom0 asks for an
// immediate balloon by writing Request = "balloon-now:<nonce>"; the daemon
// balloons down to its reserve and answers in Ack with
// "<nonce> <target_kb> ok" or "<nonce> <target_kb> error <message>",
// writing ReleasedKB in the same transaction.
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
	KeyReleased  = "released_kb"  // memory the last balloon-now gave back
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
	// RequestBalloon; not part of the ack value).
	ReleasedKB uint64
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

// ErrNoAnswer is returned by RequestBalloon when no ack came in time.
var ErrNoAnswer = errors.New("no answer from guest-balloon")

// RequestBalloon asks domid's guest-balloon daemon to balloon down to its
// reserve now and waits up to timeout for the acknowledgement. An ack
// with !OK is returned with a nil error: the daemon answered, and the
// caller decides whether its failure matters (a migration can go on).
func RequestBalloon(ctx context.Context, c *xenstore.Client, domid uint32, timeout time.Duration) (Ack, error) {
	home := HomePath(domid)
	if _, err := c.Read(ctx, home); err != nil {
		if errors.Is(err, xenstore.ErrNotFound) {
			return Ack{}, fmt.Errorf("domain %d has no xenstore home %s: does it exist?", domid, home)
		}
		return Ack{}, fmt.Errorf("reading %s: %w", home, err)
	}
	if err := PrepareDomain(ctx, c, domid); err != nil {
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
	if err := c.Write(ctx, Path(domid, KeyRequest), FormatRequest(nonce)); err != nil {
		return Ack{}, fmt.Errorf("writing the balloon request for domain %d: %w", domid, err)
	}
	tctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		select {
		case _, ok := <-w.Events():
			if !ok {
				return Ack{}, fmt.Errorf("waiting for domain %d's balloon ack: %w", domid, w.Err())
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
			return Ack{}, noAnswer(ctx, c, domid, timeout)
		}
	}
}

// noAnswer builds the timeout error, with what the daemon last published
// when there is something.
func noAnswer(ctx context.Context, c *xenstore.Client, domid uint32, timeout time.Duration) error {
	hint := "is guest-balloon running in the guest?"
	if st, err := c.Read(ctx, Path(domid, KeyState)); err == nil {
		hint += fmt.Sprintf(" (its last state was %q", st)
		if u, err := c.Read(ctx, Path(domid, KeyUpdated)); err == nil {
			if sec, err := strconv.ParseInt(u, 10, 64); err == nil {
				hint += fmt.Sprintf(", published %s ago", time.Since(time.Unix(sec, 0)).Round(time.Second))
			}
		}
		hint += ")"
	}
	return fmt.Errorf("%w: no guest-balloon daemon answered in domain %d within %v: %s", ErrNoAnswer, domid, timeout, hint)
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
