package control

import (
	"context"
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

// respond plays a minimal daemon: it answers every new request with ack.
func respond(t *testing.T, guest *xenstore.Client, ack func(nonce string) Ack) {
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
			v, err := guest.Read(ctx, Key(KeyRequest))
			if err != nil {
				continue
			}
			nonce, ok := ParseRequest(v)
			if !ok {
				continue
			}
			a := ack(nonce)
			err = guest.Update(ctx, func(tx *xenstore.Tx) error {
				if err := tx.Write(ctx, Key(KeyReleased), fmt.Sprint(a.ReleasedKB)); err != nil {
					return err
				}
				return tx.Write(ctx, Key(KeyAck), a.String())
			})
			if err != nil && ctx.Err() == nil {
				t.Errorf("responder: %v", err)
			}
		}
	}()
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
