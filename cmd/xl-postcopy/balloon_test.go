package main

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/dsb/control"
	"github.com/xl-postcopy/xl-postcopy/xen/xenstore"
	"github.com/xl-postcopy/xl-postcopy/xen/xenstore/xenstoretest"
)

// balloonFakeDaemon answers balloon requests in domain domid the way guest-balloon
// does (guest-balloon itself is tested against the same double in its own
// package).
func balloonFakeDaemon(t *testing.T, s *xenstoretest.Server, domid uint32, ack func(nonce string) control.Ack) {
	guest, err := s.Dial(domid)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	w, err := guest.Watch(ctx, control.Key(control.KeyRequest))
	require.NoError(t, err)
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); w.Close(); guest.Close(); <-done })
	go func() {
		defer close(done)
		for range w.Events() {
			v, err := guest.Read(ctx, control.Key(control.KeyRequest))
			if err != nil {
				continue
			}
			nonce, ok := control.ParseRequest(v)
			if !ok {
				continue
			}
			a := ack(nonce)
			_ = guest.Write(ctx, control.Key(control.KeyReleased), fmt.Sprint(a.ReleasedKB))
			_ = guest.Write(ctx, control.Key(control.KeyAck), a.String())
		}
	}()
}

func balloonDom0(t *testing.T, s *xenstoretest.Server) *xenstore.Client {
	c, err := s.Dial(0)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

func TestBalloonCommand(t *testing.T) {
	s := xenstoretest.New(t.TempDir())
	defer s.Close()
	s.AddDomain(3, "web")
	balloonFakeDaemon(t, s, 3, func(n string) control.Ack {
		return control.Ack{Nonce: n, TargetKB: 90112, OK: true, ReleasedKB: 40960}
	})
	var out bytes.Buffer
	require.NoError(t, runBalloon(context.Background(), balloonDom0(t, s), "web", 5*time.Second, &out))
	assert.Contains(t, out.String(), "domain 3: balloon target 90112 kB, released 40960 kB (10240 pages)")
	out.Reset()
	require.NoError(t, runBalloon(context.Background(), balloonDom0(t, s), "3", 5*time.Second, &out), "numeric domid")
	assert.Contains(t, out.String(), "domain 3:")
}

func TestBalloonCommandErrors(t *testing.T) {
	s := xenstoretest.New(t.TempDir())
	defer s.Close()
	s.AddDomain(3, "web")
	s.AddDomain(4, "db")
	balloonFakeDaemon(t, s, 4, func(n string) control.Ack {
		return control.Ack{Nonce: n, TargetKB: 131072, Err: "setting the balloon target: permission denied"}
	})
	c := balloonDom0(t, s)
	err := runBalloon(context.Background(), c, "web", 100*time.Millisecond, &bytes.Buffer{})
	assert.ErrorContains(t, err, "no guest-balloon daemon answered in domain 3 within 100ms: is guest-balloon running in the guest?")
	err = runBalloon(context.Background(), c, "db", 5*time.Second, &bytes.Buffer{})
	assert.ErrorContains(t, err, "guest-balloon in domain 4 answered with an error: setting the balloon target: permission denied")
	err = runBalloon(context.Background(), c, "nosuch", time.Second, &bytes.Buffer{})
	assert.ErrorContains(t, err, `no domain named "nosuch"`)
}

func TestBalloonCommandLine(t *testing.T) {
	assert.Equal(t, 2, runMain([]string{"balloon"}), "missing domain is a usage error")
	assert.Equal(t, 2, runMain([]string{"balloon", "a", "b"}))
	assert.Equal(t, 2, runMain([]string{"balloon", "--timeout=0", "a"}))

	s := xenstoretest.New(t.TempDir())
	defer s.Close()
	path, err := s.Listen(0)
	require.NoError(t, err)
	t.Setenv(xenstore.EnvPath, path)
	assert.Equal(t, 1, runMain([]string{"balloon", "--timeout=50ms", "nosuch"}), "runs through xenstore.Open")
}
