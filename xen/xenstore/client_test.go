package xenstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/xenstore"
	"github.com/xl-postcopy/xl-postcopy/xen/xenstore/xenstoretest"
)

func newServer(t *testing.T) *xenstoretest.Server {
	t.Helper()
	s := xenstoretest.New(t.TempDir())
	t.Cleanup(func() { s.Close() })
	return s
}

func dial(t *testing.T, s *xenstoretest.Server, domid uint32) *xenstore.Client {
	t.Helper()
	c, err := s.Dial(domid)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestReadWriteDirectoryRemove(t *testing.T) {
	s := newServer(t)
	c := dial(t, s, 0)
	ctx := ctxT(t)

	require.NoError(t, c.Write(ctx, "/a/b/c", "hello"))
	v, err := c.Read(ctx, "/a/b/c")
	require.NoError(t, err)
	assert.Equal(t, "hello", v)
	// WRITE created the parents with empty values.
	v, err = c.Read(ctx, "/a/b")
	require.NoError(t, err)
	assert.Equal(t, "", v)

	require.NoError(t, c.Write(ctx, "/a/b/d", "binary\x00value"))
	v, err = c.Read(ctx, "/a/b/d")
	require.NoError(t, err)
	assert.Equal(t, "binary\x00value", v, "values are octet strings")

	require.NoError(t, c.Mkdir(ctx, "/a/e"))
	require.NoError(t, c.Mkdir(ctx, "/a/b/c"), "MKDIR of an existing node is fine")
	v, _ = c.Read(ctx, "/a/b/c")
	assert.Equal(t, "hello", v, "MKDIR leaves the value alone")

	names, err := c.Directory(ctx, "/a")
	require.NoError(t, err)
	assert.Equal(t, []string{"b", "e"}, names)
	names, err = c.Directory(ctx, "/a/e")
	require.NoError(t, err)
	assert.Empty(t, names)

	require.NoError(t, c.Remove(ctx, "/a/b"))
	_, err = c.Read(ctx, "/a/b/c")
	assert.ErrorIs(t, err, xenstore.ErrNotFound)
	assert.ErrorIs(t, err, fs.ErrNotExist)
	var xe *xenstore.Error
	require.ErrorAs(t, err, &xe)
	assert.Equal(t, "ENOENT", xe.Errno)
	assert.Equal(t, xenstore.OpRead, xe.Op)
	assert.Contains(t, err.Error(), "/a/b/c")

	require.NoError(t, c.Remove(ctx, "/a/b"), "RM of a missing node is fine")
	assert.ErrorIs(t, c.Remove(ctx, "/nope/x"), xenstore.ErrNotFound, "RM with a missing parent is not")

	p, err := c.GetDomainPath(ctx, 7)
	require.NoError(t, err)
	assert.Equal(t, "/local/domain/7", p)
}

func TestGuestRelativePathsAndPermissions(t *testing.T) {
	s := newServer(t)
	s.AddDomain(5, "guest5")
	s.AddDomain(6, "guest6")
	g := dial(t, s, 5)
	dom0 := dial(t, s, 0)
	ctx := ctxT(t)

	v, err := g.Read(ctx, "name")
	require.NoError(t, err)
	assert.Equal(t, "guest5", v)

	require.NoError(t, g.Write(ctx, "data/balloon/state", "running"))
	v, ok := s.Get("/local/domain/5/data/balloon/state")
	require.True(t, ok)
	assert.Equal(t, "running", v)
	perms, err := dom0.GetPerms(ctx, "/local/domain/5/data/balloon/state")
	require.NoError(t, err)
	assert.Equal(t, uint32(5), perms[0].Domid, "a node a guest creates is owned by the guest")

	_, err = g.Read(ctx, "/local/domain/6/name")
	assert.ErrorIs(t, err, xenstore.ErrPermission)
	assert.ErrorIs(t, g.Write(ctx, "/local/domain/6/data/x", "y"), xenstore.ErrPermission)
	assert.ErrorIs(t, g.Write(ctx, "name", "evil"), xenstore.ErrPermission, "the guest's name is read-only to it")

	// dom0 creates a key in the guest's data dir: it inherits the guest's
	// ownership, so the guest can rewrite it.
	require.NoError(t, dom0.Write(ctx, "/local/domain/5/data/ctl", "x"))
	require.NoError(t, g.Write(ctx, "data/ctl", "y"))
	// A key dom0 makes read-only for the guest.
	require.NoError(t, dom0.Write(ctx, "/local/domain/5/data/ro", "x"))
	require.NoError(t, dom0.SetPerms(ctx, "/local/domain/5/data/ro",
		xenstore.Perm{Domid: 0, Access: xenstore.AccessNone}, xenstore.Perm{Domid: 5, Access: xenstore.AccessRead}))
	perms, err = g.GetPerms(ctx, "data/ro")
	require.NoError(t, err)
	assert.Equal(t, []xenstore.Perm{{0, 'n'}, {5, 'r'}}, perms)
	v, err = g.Read(ctx, "data/ro")
	require.NoError(t, err)
	assert.Equal(t, "x", v)
	assert.ErrorIs(t, g.Write(ctx, "data/ro", "z"), xenstore.ErrPermission)
	assert.ErrorIs(t, g.SetPerms(ctx, "data/ro", xenstore.Perm{Domid: 5, Access: 'b'}), xenstore.ErrPermission)

	assert.ErrorIs(t, g.SetPerms(ctx, "data/ctl", xenstore.Perm{Domid: 5, Access: 'q'}), xenstore.ErrInvalid,
		"bad access letters are refused before they reach the wire")
}

func TestConcurrentRequests(t *testing.T) {
	s := newServer(t)
	c := dial(t, s, 0)
	ctx := ctxT(t)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				path := fmt.Sprintf("/t/g%d/k%d", g, i)
				val := fmt.Sprintf("v%d-%d", g, i)
				if err := c.Write(ctx, path, val); err != nil {
					errs <- err
					return
				}
				got, err := c.Read(ctx, path)
				if err != nil {
					errs <- err
					return
				}
				if got != val {
					errs <- fmt.Errorf("%s: got %q want %q", path, got, val)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	names, err := c.Directory(ctx, "/t/g3")
	require.NoError(t, err)
	assert.Len(t, names, 50)
}

// rawServer accepts one connection on a unix socket and runs fn on it, for
// tests that need replies no real daemon would send.
func rawServer(t *testing.T, fn func(c net.Conn)) *xenstore.Client {
	t.Helper()
	path := filepath.Join(t.TempDir(), "raw.sock")
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := l.Accept()
		l.Close()
		if err != nil {
			return
		}
		defer c.Close()
		fn(c)
	}()
	c, err := xenstore.OpenPath(path)
	require.NoError(t, err)
	t.Cleanup(func() {
		c.Close()
		<-done
	})
	return c
}

func TestRepliesOutOfOrder(t *testing.T) {
	// The daemon may answer in any order; req_id must match them up.
	c := rawServer(t, func(conn net.Conn) {
		h1, p1, err := xenstore.ReadMessage(conn)
		if err != nil {
			return
		}
		h2, p2, err := xenstore.ReadMessage(conn)
		if err != nil {
			return
		}
		for _, r := range []struct {
			h xenstore.Header
			p []byte
		}{{h2, p2}, {h1, p1}} {
			// Echo the path back as the value.
			path := bytes.TrimSuffix(r.p, []byte{0})
			conn.Write(xenstore.AppendMessage(nil, xenstore.Header{Op: xenstore.OpRead, ReqID: r.h.ReqID}, path))
		}
		// Wait for the client to go.
		xenstore.ReadMessage(conn)
	})
	ctx := ctxT(t)
	var wg sync.WaitGroup
	got := make([]string, 2)
	errs := make([]error, 2)
	for i, p := range []string{"/first", "/second"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i], errs[i] = c.Read(ctx, p)
		}()
		if i == 0 {
			time.Sleep(20 * time.Millisecond) // let the first go out first
		}
	}
	wg.Wait()
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	assert.Equal(t, []string{"/first", "/second"}, got)
}

func TestMalformedReplies(t *testing.T) {
	s := newServer(t)
	c := dial(t, s, 0)
	ctx := ctxT(t)
	msg := func(op xenstore.Op, h xenstore.Header, p string) []byte {
		return xenstore.AppendMessage(nil, xenstore.Header{Op: op, ReqID: h.ReqID, TxID: h.TxID}, []byte(p))
	}
	cases := []struct {
		name  string
		reply func(h xenstore.Header) []byte
		call  func() error
		check func(t *testing.T, err error)
	}{
		{"wrong type", func(h xenstore.Header) []byte { return msg(xenstore.OpWrite, h, "OK\x00") },
			func() error { _, err := c.Read(ctx, "/x"); return err },
			func(t *testing.T, err error) { assert.ErrorIs(t, err, xenstore.ErrProtocol) }},
		{"unknown errno", func(h xenstore.Header) []byte { return msg(xenstore.OpError, h, "EFUTURE\x00") },
			func() error { _, err := c.Read(ctx, "/x"); return err },
			func(t *testing.T, err error) {
				var xe *xenstore.Error
				require.ErrorAs(t, err, &xe)
				assert.Equal(t, "EFUTURE", xe.Errno)
				assert.NotErrorIs(t, err, xenstore.ErrNotFound)
			}},
		{"garbage errno", func(h xenstore.Header) []byte { return msg(xenstore.OpError, h, "oops, no\x00") },
			func() error { _, err := c.Read(ctx, "/x"); return err },
			func(t *testing.T, err error) { assert.ErrorIs(t, err, xenstore.ErrProtocol) }},
		{"write not OK", func(h xenstore.Header) []byte { return msg(xenstore.OpWrite, h, "KO\x00") },
			func() error { return c.Write(ctx, "/x", "v") },
			func(t *testing.T, err error) { assert.ErrorIs(t, err, xenstore.ErrProtocol) }},
		{"directory unterminated", func(h xenstore.Header) []byte { return msg(xenstore.OpDirectory, h, "a\x00b") },
			func() error { _, err := c.Directory(ctx, "/x"); return err },
			func(t *testing.T, err error) { assert.ErrorIs(t, err, xenstore.ErrProtocol) }},
		{"directory slash", func(h xenstore.Header) []byte { return msg(xenstore.OpDirectory, h, "a/b\x00") },
			func() error { _, err := c.Directory(ctx, "/x"); return err },
			func(t *testing.T, err error) { assert.ErrorIs(t, err, xenstore.ErrProtocol) }},
		{"transaction id", func(h xenstore.Header) []byte { return msg(xenstore.OpTransactionStart, h, "abc\x00") },
			func() error { _, err := c.Begin(ctx); return err },
			func(t *testing.T, err error) { assert.ErrorIs(t, err, xenstore.ErrProtocol) }},
		{"domain path", func(h xenstore.Header) []byte { return msg(xenstore.OpGetDomainPath, h, "local\x00") },
			func() error { _, err := c.GetDomainPath(ctx, 1); return err },
			func(t *testing.T, err error) { assert.ErrorIs(t, err, xenstore.ErrProtocol) }},
		{"perms", func(h xenstore.Header) []byte { return msg(xenstore.OpGetPerms, h, "x1\x00") },
			func() error { _, err := c.GetPerms(ctx, "/x"); return err },
			func(t *testing.T, err error) { assert.ErrorIs(t, err, xenstore.ErrProtocol) }},
		{"wrong tx", func(h xenstore.Header) []byte {
			return xenstore.AppendMessage(nil, xenstore.Header{Op: xenstore.OpRead, ReqID: h.ReqID, TxID: 99}, []byte("v"))
		},
			func() error { _, err := c.Read(ctx, "/x"); return err },
			func(t *testing.T, err error) { assert.ErrorIs(t, err, xenstore.ErrProtocol) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s.SetInterceptor(func(_ uint32, h xenstore.Header, _ []byte) ([]byte, bool) { return tc.reply(h), true })
			err := tc.call()
			s.SetInterceptor(nil)
			require.Error(t, err)
			tc.check(t, err)
			// A malformed reply to one request does not spoil the
			// connection for the next.
			require.NoError(t, c.Write(ctx, "/ok", "1"))
		})
	}
}

func TestOversizedReplyKillsConnection(t *testing.T) {
	s := newServer(t)
	c := dial(t, s, 0)
	ctx := ctxT(t)
	s.SetInterceptor(func(_ uint32, h xenstore.Header, _ []byte) ([]byte, bool) {
		b := xenstore.AppendMessage(nil, xenstore.Header{Op: h.Op, ReqID: h.ReqID}, nil)
		b[12], b[13] = 0x01, 0x20 // len = 8193
		return b, true
	})
	_, err := c.Read(ctx, "/x")
	require.Error(t, err)
	assert.ErrorIs(t, err, xenstore.ErrClosed)
	assert.ErrorIs(t, err, xenstore.ErrProtocol)
	s.SetInterceptor(nil)
	_, err = c.Read(ctx, "/x")
	assert.ErrorIs(t, err, xenstore.ErrClosed, "the stream cannot be resynchronised")
	assert.ErrorIs(t, c.Err(), xenstore.ErrProtocol)
}

func TestServerHangsUp(t *testing.T) {
	c := rawServer(t, func(conn net.Conn) {
		xenstore.ReadMessage(conn)
		conn.Write([]byte{2, 0, 0}) // a third of a header, then EOF
	})
	_, err := c.Read(ctxT(t), "/x")
	assert.ErrorIs(t, err, xenstore.ErrClosed)
}

func TestRequestLimits(t *testing.T) {
	s := newServer(t)
	c := dial(t, s, 0)
	ctx := ctxT(t)
	err := c.Write(ctx, "/big", strings.Repeat("x", xenstore.PayloadMax))
	assert.ErrorIs(t, err, xenstore.ErrTooBigRequest)
	assert.ErrorIs(t, c.Write(ctx, "", "v"), xenstore.ErrInvalid)
	assert.ErrorIs(t, c.Write(ctx, "/a\x00b", "v"), xenstore.ErrInvalid)
	assert.ErrorIs(t, c.Write(ctx, "/a//b", "v"), xenstore.ErrInvalid, "the daemon's EINVAL")
	require.NoError(t, c.Write(ctx, "/still", "alive"), "refused requests never reached the wire")
}

func TestContextCancelThenLateReply(t *testing.T) {
	release := make(chan struct{})
	c := rawServer(t, func(conn net.Conn) {
		h, _, err := xenstore.ReadMessage(conn)
		if err != nil {
			return
		}
		<-release
		// The late reply to the cancelled request, then a real one.
		conn.Write(xenstore.AppendMessage(nil, xenstore.Header{Op: xenstore.OpRead, ReqID: h.ReqID}, []byte("late")))
		h, _, err = xenstore.ReadMessage(conn)
		if err != nil {
			return
		}
		conn.Write(xenstore.AppendMessage(nil, xenstore.Header{Op: xenstore.OpRead, ReqID: h.ReqID}, []byte("fresh")))
		xenstore.ReadMessage(conn)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := c.Read(ctx, "/slow")
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	close(release)
	v, err := c.Read(ctxT(t), "/fast")
	require.NoError(t, err)
	assert.Equal(t, "fresh", v)
}

func TestOpen(t *testing.T) {
	s := newServer(t)
	path, err := s.Listen(0)
	require.NoError(t, err)
	t.Setenv(xenstore.EnvPath, path)
	c, err := xenstore.Open()
	require.NoError(t, err)
	require.NoError(t, c.Write(ctxT(t), "/via/env", "1"))
	c.Close()

	t.Setenv(xenstore.EnvPath, filepath.Join(t.TempDir(), "missing"))
	_, err = xenstore.Open()
	assert.ErrorIs(t, err, fs.ErrNotExist)

	t.Setenv(xenstore.EnvPath, "")
	for _, p := range []string{xenstore.SocketPath, xenstore.LegacySocketPath, xenstore.XenbusDevice} {
		if _, err := os.Stat(p); err == nil {
			t.Skipf("precondition: this host has %s, so Open's no-xenstore error cannot be seen", p)
		}
	}
	_, err = xenstore.Open()
	assert.ErrorIs(t, err, xenstore.ErrNoXenstore)
	assert.Contains(t, err.Error(), "is this a Xen guest or dom0?")
}

func TestClosedClient(t *testing.T) {
	s := newServer(t)
	c := dial(t, s, 0)
	require.NoError(t, c.Close())
	_, err := c.Read(context.Background(), "/x")
	assert.ErrorIs(t, err, xenstore.ErrClosed)
	assert.False(t, errors.Is(err, xenstore.ErrProtocol), "a plain close is not a protocol error")
}

// WatchDomains signals once when set (as every watch fires) and then on
// each @releaseDomain, and not after stop.
func TestWatchDomains(t *testing.T) {
	s := newServer(t)
	c := dial(t, s, 0)
	ch, stop, err := c.WatchDomains(ctxT(t))
	require.NoError(t, err)
	got := func() bool {
		select {
		case <-ch:
			return true
		case <-time.After(300 * time.Millisecond):
			return false
		}
	}
	require.True(t, got(), "no first event")
	require.False(t, got(), "an event without a domain change")
	s.ReleaseDomain()
	require.True(t, got(), "@releaseDomain did not signal")
	s.Set("/local/domain/0/name", "Domain-0")
	require.False(t, got(), "an ordinary write signalled")
	stop()
	s.ReleaseDomain()
	require.False(t, got(), "signalled after stop")
}
