package control

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/xenstore"
	"github.com/xl-postcopy/xl-postcopy/xen/xenstore/xenstoretest"
)

func TestAckFormat(t *testing.T) {
	for _, a := range []Ack{
		{Nonce: "abc123", TargetKB: 90000, OK: true},
		{Nonce: "n", TargetKB: 0, Err: "writing target_kb: permission denied"},
	} {
		got, err := ParseAck(a.String())
		require.NoError(t, err, a.String())
		assert.Equal(t, a, got)
	}
	assert.Equal(t, "n1 5 error unspecified failure", Ack{Nonce: "n1", TargetKB: 5}.String())
	assert.Equal(t, "n1 5 error two lines", Ack{Nonce: "n1", TargetKB: 5, Err: "two\nlines"}.String())
	for _, bad := range []string{"", "n1", "n1 5", "n1 x ok", "n1 5 maybe", "n1 -5 ok"} {
		_, err := ParseAck(bad)
		assert.Error(t, err, bad)
	}
}

func TestRequestFormat(t *testing.T) {
	n := NewNonce()
	assert.Len(t, n, 16)
	assert.NotEqual(t, n, NewNonce())
	got, ok := ParseRequest(FormatRequest(n))
	require.True(t, ok)
	assert.Equal(t, n, got)
	for _, bad := range []string{"", "balloon-now:", "balloon-later:x", "balloon-now:a b"} {
		_, ok := ParseRequest(bad)
		assert.False(t, ok, bad)
	}
}

func setup(t *testing.T) (*xenstoretest.Server, *xenstore.Client, *xenstore.Client) {
	t.Helper()
	s := xenstoretest.New(t.TempDir())
	t.Cleanup(func() { s.Close() })
	s.AddDomain(4, "web")
	dom0, err := s.Dial(0)
	require.NoError(t, err)
	t.Cleanup(func() { dom0.Close() })
	guest, err := s.Dial(4)
	require.NoError(t, err)
	t.Cleanup(func() { guest.Close() })
	return s, dom0, guest
}

// watchRequests runs handle on every value of the request key the guest
// sees, until the test ends.
func watchRequests(t *testing.T, guest *xenstore.Client, handle func(ctx context.Context, v string)) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	w, err := guest.Watch(ctx, Key(KeyRequest))
	require.NoError(t, err)
	go func() {
		defer close(done)
		defer w.Close()
		for {
			select {
			case <-ctx.Done():
				return
			case <-w.Events():
			}
			if v, err := guest.Read(ctx, Key(KeyRequest)); err == nil {
				handle(ctx, v)
			}
		}
	}()
}

// answer writes a daemon's answer in one transaction: released_kb, the
// hold key (if hold is not nil) and the ack.
func answer(t *testing.T, ctx context.Context, guest *xenstore.Client, a Ack, hold *HoldStatus) {
	err := guest.Update(ctx, func(tx *xenstore.Tx) error {
		if err := tx.Write(ctx, Key(KeyReleased), fmt.Sprint(a.ReleasedKB)); err != nil {
			return err
		}
		if hold != nil {
			if err := tx.Write(ctx, Key(KeyHold), hold.String()); err != nil {
				return err
			}
		}
		return tx.Write(ctx, Key(KeyAck), a.String())
	})
	if err != nil && ctx.Err() == nil {
		t.Errorf("responder: %v", err)
	}
}

// respond plays a minimal daemon: it answers every new request with ack.
func respond(t *testing.T, guest *xenstore.Client, ack func(nonce string) Ack) {
	watchRequests(t, guest, func(ctx context.Context, v string) {
		if nonce, ok := ParseRequest(v); ok {
			answer(t, ctx, guest, ack(nonce), nil)
		}
	})
}

func TestRequestBalloon(t *testing.T) {
	s, dom0, guest := setup(t)
	// A stale ack from an earlier request must not be taken for the answer.
	require.NoError(t, guest.Write(context.Background(), Key(KeyAck), "oldnonce 1 ok"))
	respond(t, guest, func(n string) Ack { return Ack{Nonce: n, TargetKB: 90112, OK: true, ReleasedKB: 40960} })
	a, err := RequestBalloon(context.Background(), dom0, 4, 5*time.Second)
	require.NoError(t, err)
	assert.True(t, a.OK)
	assert.Equal(t, uint64(90112), a.TargetKB)
	assert.Equal(t, uint64(40960), a.ReleasedKB)
	assert.NotEqual(t, "oldnonce", a.Nonce)
	req, _ := s.Get(Path(4, KeyRequest))
	assert.Equal(t, FormatRequest(a.Nonce), req)

	// A second request gets its own nonce and answer.
	b, err := RequestBalloon(context.Background(), dom0, 4, 5*time.Second)
	require.NoError(t, err)
	assert.NotEqual(t, a.Nonce, b.Nonce)
}

func TestRequestBalloonDaemonError(t *testing.T) {
	_, dom0, guest := setup(t)
	respond(t, guest, func(n string) Ack { return Ack{Nonce: n, TargetKB: 131072, Err: "writing target_kb: EACCES"} })
	a, err := RequestBalloon(context.Background(), dom0, 4, 5*time.Second)
	require.NoError(t, err, "the daemon answered")
	assert.False(t, a.OK)
	assert.Equal(t, "writing target_kb: EACCES", a.Err)
}

func TestRequestBalloonNoDaemon(t *testing.T) {
	_, dom0, guest := setup(t)
	start := time.Now()
	_, err := RequestBalloon(context.Background(), dom0, 4, 200*time.Millisecond)
	require.ErrorIs(t, err, ErrNoAnswer)
	assert.GreaterOrEqual(t, time.Since(start), 200*time.Millisecond)
	assert.Contains(t, err.Error(), "no guest-balloon daemon answered in domain 4 within 200ms: is guest-balloon running in the guest?")

	// With a state left by a daemon that died, the message says so.
	require.NoError(t, guest.Write(context.Background(), Key(KeyState), "running"))
	require.NoError(t, guest.Write(context.Background(), Key(KeyUpdated), fmt.Sprint(time.Now().Add(-time.Minute).Unix())))
	_, err = RequestBalloon(context.Background(), dom0, 4, 100*time.Millisecond)
	assert.ErrorContains(t, err, `its last state was "running", published 1m`)

	_, err = RequestBalloon(context.Background(), dom0, 9, time.Second)
	assert.ErrorContains(t, err, "domain 9 has no xenstore home")
}

func TestPrepareDomainGivesDirToGuest(t *testing.T) {
	s, dom0, guest := setup(t)
	ctx := context.Background()
	// A toolstack that made data/ dom0-only: the guest could not create
	// its directory, and a dom0-created one would not be the guest's.
	require.NoError(t, dom0.SetPerms(ctx, HomePath(4)+"/data", xenstore.Perm{Domid: 0, Access: xenstore.AccessNone}))
	assert.ErrorIs(t, guest.Write(ctx, Key(KeyState), "running"), xenstore.ErrPermission)
	require.NoError(t, PrepareDomain(ctx, dom0, 4))
	assert.Equal(t, uint32(4), s.Perms(HomePath(4) + "/" + Dir)[0].Domid)
	require.NoError(t, guest.Write(ctx, Key(KeyState), "running"))
	require.NoError(t, dom0.Write(ctx, Path(4, KeyRequest), FormatRequest("x")))
	v, err := guest.Read(ctx, Key(KeyRequest))
	require.NoError(t, err, "a request dom0 writes inherits the guest's ownership")
	assert.Equal(t, "balloon-now:x", v)
	require.NoError(t, PrepareDomain(ctx, dom0, 4), "idempotent")
}

func TestResolveDomain(t *testing.T) {
	s, dom0, _ := setup(t)
	s.AddDomain(12, "db")
	ctx := context.Background()
	id, err := ResolveDomain(ctx, dom0, "db")
	require.NoError(t, err)
	assert.Equal(t, uint32(12), id)
	id, err = ResolveDomain(ctx, dom0, "4")
	require.NoError(t, err)
	assert.Equal(t, uint32(4), id)
	_, err = ResolveDomain(ctx, dom0, "nosuch")
	assert.ErrorContains(t, err, `no domain named "nosuch"`)
	_, err = ResolveDomain(ctx, dom0, "77")
	assert.ErrorContains(t, err, "domain 77 does not exist")
}

func TestHoldRequestFormat(t *testing.T) {
	assert.Equal(t, "balloon-hold:n1:30", FormatHoldRequest("n1", 30*time.Second))
	assert.Equal(t, "balloon-hold:n1:2", FormatHoldRequest("n1", 1500*time.Millisecond), "rounded up")
	assert.Equal(t, "balloon-hold:n1:0", FormatHoldRequest("n1", 0))
	assert.Equal(t, "hold-end:n1", FormatHoldEnd("n1"))

	for _, c := range []struct {
		v    string
		want Request
	}{
		{"balloon-now:a", Request{Kind: BalloonNow, Nonce: "a"}},
		{"balloon-hold:a:30", Request{Kind: BalloonHold, Nonce: "a", Hold: 30 * time.Second}},
		{"balloon-hold:a:b:1", Request{Kind: BalloonHold, Nonce: "a:b", Hold: time.Second}},
		{"balloon-hold:a:7200", Request{Kind: BalloonHold, Nonce: "a", Hold: MaxHoldSeconds * time.Second}},
		{"balloon-hold:a:99999999999999999999999", Request{Kind: BalloonHold, Nonce: "a", Hold: MaxHoldSeconds * time.Second}},
		{"hold-end:a\n", Request{Kind: HoldEnd, Nonce: "a"}},
	} {
		got, err := ParseAnyRequest(c.v)
		require.NoError(t, err, c.v)
		assert.Equal(t, c.want, got, c.v)
	}
	// Bad seconds: answerable (the nonce is there), but an error.
	for _, bad := range []string{"balloon-hold:a:0", "balloon-hold:a:", "balloon-hold:a", "balloon-hold:a:x", "balloon-hold:a:-5", "balloon-hold:a:+5", "balloon-hold:a:1.5"} {
		got, err := ParseAnyRequest(bad)
		require.Error(t, err, bad)
		assert.NotErrorIs(t, err, ErrNotRequest, bad)
		assert.Equal(t, Request{Kind: BalloonHold, Nonce: "a"}, got, bad)
		assert.Contains(t, err.Error(), "bad request", bad)
	}
	// Nothing to answer.
	for _, bad := range []string{"", "balloon-later:x", "balloon-hold:", "balloon-hold::5", "balloon-hold:a b:5", "hold-end:", "hold-end:a b"} {
		_, err := ParseAnyRequest(bad)
		assert.ErrorIs(t, err, ErrNotRequest, bad)
	}
	_, ok := ParseRequest("balloon-hold:a:30")
	assert.False(t, ok, "ParseRequest stays balloon-now only")
}

func TestHoldStatusFormat(t *testing.T) {
	until := time.Unix(1700000000, 0)
	for _, c := range []struct {
		h HoldStatus
		v string
	}{
		{HoldStatus{}, ""},
		{HoldStatus{Nonce: "n1", Held: true, Until: until}, "held n1 until 1700000000"},
		{HoldStatus{Nonce: "n1", Ended: HoldEndedPressure}, "ended n1 pressure"},
	} {
		assert.Equal(t, c.v, c.h.String())
		got, err := ParseHold(c.v)
		require.NoError(t, err, c.v)
		assert.Equal(t, c.h, got)
	}
	for _, bad := range []string{"held", "held n1 until x", "held n1 at 5", "ended n1", "maybe n1 x"} {
		_, err := ParseHold(bad)
		assert.Error(t, err, bad)
	}
}

// respondHold plays a daemon that knows balloon-hold: it grants holds,
// rejects bad ones, and records the hold-end requests it sees.
func respondHold(t *testing.T, guest *xenstore.Client, ends chan<- string) {
	watchRequests(t, guest, func(ctx context.Context, v string) {
		r, perr := ParseAnyRequest(v)
		switch {
		case errors.Is(perr, ErrNotRequest):
			return
		case r.Kind == HoldEnd:
			ends <- r.Nonce
			return
		}
		a := Ack{Nonce: r.Nonce, TargetKB: 90112, OK: true, ReleasedKB: 4096}
		hold := HoldStatus{Nonce: r.Nonce, Held: true, Until: time.Unix(1700000000, 0).Add(r.Hold)}
		if perr != nil {
			a, hold = Ack{Nonce: r.Nonce, TargetKB: 131072, Err: perr.Error()}, HoldStatus{}
		}
		answer(t, ctx, guest, a, &hold)
	})
}

func TestRequestHoldEndHold(t *testing.T) {
	s, dom0, guest := setup(t)
	ends := make(chan string, 4)
	respondHold(t, guest, ends)
	ctx := context.Background()

	a, err := RequestHold(ctx, dom0, 4, 5*time.Second, 90*time.Second)
	require.NoError(t, err)
	assert.True(t, a.OK)
	assert.Equal(t, uint64(90112), a.TargetKB)
	assert.Equal(t, uint64(4096), a.ReleasedKB)
	assert.Equal(t, time.Unix(1700000090, 0), a.HoldUntil, "from the hold key")
	req, _ := s.Get(Path(4, KeyRequest))
	assert.Equal(t, "balloon-hold:"+a.Nonce+":90", req)

	require.NoError(t, EndHold(ctx, dom0, 4, a.Nonce))
	select {
	case n := <-ends:
		assert.Equal(t, a.Nonce, n)
	case <-time.After(5 * time.Second):
		t.Fatal("the daemon saw no hold-end")
	}
	req, _ = s.Get(Path(4, KeyRequest))
	assert.Equal(t, "hold-end:"+a.Nonce, req)

	// A hold the daemon cannot express is refused before asking; one it
	// rejects comes back as an error ack without a hold.
	_, err = RequestHold(ctx, dom0, 4, time.Second, 0)
	assert.ErrorContains(t, err, "the hold must be positive")
	require.NoError(t, dom0.Write(ctx, Path(4, KeyRequest), "balloon-hold:bad:0"))
	waitAck := func() string {
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			if v, _ := s.Get(Path(4, KeyAck)); len(v) > 4 && v[:4] == "bad " {
				return v
			}
			time.Sleep(5 * time.Millisecond)
		}
		t.Fatal("no ack for the bad request")
		return ""
	}
	assert.Contains(t, waitAck(), "bad 131072 error bad request")

	assert.ErrorContains(t, EndHold(ctx, dom0, 4, "a b"), "invalid nonce")
	assert.ErrorContains(t, EndHold(ctx, dom0, 9, "n"), "domain 9 has no xenstore home")
}

func TestRequestHoldNoDaemon(t *testing.T) {
	_, dom0, _ := setup(t)
	_, err := RequestHold(context.Background(), dom0, 4, 100*time.Millisecond, time.Minute)
	require.ErrorIs(t, err, ErrNoAnswer)
	assert.ErrorContains(t, err, "answered the balloon-hold request in domain 4 within 100ms")
	assert.ErrorContains(t, err, "new enough to know balloon-hold")
}
