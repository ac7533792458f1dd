package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestShellQuote(t *testing.T) {
	require.Equal(t, "host-1.example:22", shellQuote("host-1.example:22"))
	require.Equal(t, "''", shellQuote(""))
	require.Equal(t, `'a b'`, shellQuote("a b"))
	require.Equal(t, `'it'\''s'`, shellQuote("it's"))
	require.Equal(t, `'$(rm -rf /)'`, shellQuote("$(rm -rf /)"))
}

// The urgent stream of a remote receiver: the receiver listens on an
// abstract socket, the relay started by a second ssh connects to it.
func TestUrgentListenAttach(t *testing.T) {
	token := testToken(t)
	got := make(chan string, 1)
	errc := make(chan error, 1)
	go func() {
		c, err := listenUrgent(token, 5*time.Second)
		if err != nil {
			errc <- err
			return
		}
		defer c.Close()
		if _, err := c.Write([]byte("from-receiver")); err != nil {
			errc <- err
			return
		}
		b := make([]byte, 11)
		_, err = io.ReadFull(c, b)
		errc <- err
		got <- string(b)
	}()
	// The relay uses stdin/stdout: give it pipes.
	inR, inW, err := os.Pipe()
	require.NoError(t, err)
	outR, outW, err := os.Pipe()
	require.NoError(t, err)
	oldIn, oldOut := os.Stdin, os.Stdout
	os.Stdin, os.Stdout = inR, outW
	defer func() { os.Stdin, os.Stdout = oldIn, oldOut }()
	relayDone := make(chan error, 1)
	go func() { relayDone <- attachUrgent(token, 5*time.Second) }()
	b := make([]byte, 13)
	_, err = io.ReadFull(outR, b)
	require.NoError(t, err)
	require.Equal(t, "from-receiver", string(b))
	_, err = inW.Write([]byte("from-source"))
	require.NoError(t, err)
	require.NoError(t, <-errc)
	require.Equal(t, "from-source", <-got)
	inW.Close()
	select {
	case <-relayDone:
	case <-time.After(5 * time.Second):
		t.Fatal("relay did not end after both sides closed")
	}
}

func TestAttachUrgentTimesOut(t *testing.T) {
	err := attachUrgent("no-such-receiver-token", 100*time.Millisecond)
	require.ErrorContains(t, err, "attach to the receiver's urgent stream")
}

func TestFindConfig(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "g.cfg")
	require.NoError(t, os.WriteFile(p, []byte(`name = "g"`), 0o644))
	b, path, err := findConfig(p, "g")
	require.NoError(t, err)
	require.Equal(t, p, path)
	require.Equal(t, `name = "g"`, string(b))
	_, _, err = findConfig(filepath.Join(dir, "missing.cfg"), "g")
	require.ErrorContains(t, err, "read the domain's xl config")
	_, _, err = findConfig("", "surely-no-such-domain-xlpc")
	require.ErrorContains(t, err, "pass the file it was created from with -C FILE")
}

func TestMigrateCommandLine(t *testing.T) {
	require.Equal(t, 2, runMain([]string{"migrate", "only-domain"}), "missing host")
	require.Equal(t, 2, runMain([]string{"migrate", "--mode", "bogus", "d", "h"}), "bad mode")
	require.Equal(t, 2, runMain([]string{"migrate", "--prepaging", "bogus", "d", "h"}), "bad policy")
	require.Equal(t, 2, runMain([]string{"migrate-receive"}), "receiver without its urgent stream")
	if _, err := os.Stat("/dev/xen/privcmd"); err == nil {
		t.Log("a Xen dom0: the no-Xen error is not checked here")
		return
	}
	require.Equal(t, 1, runMain([]string{"migrate", "1", "localhost"}), "no Xen: a clear error, exit 1")
}

// dialAttempt is one connection of a reconnect attempt, as attachLink
// opens it.
func dialAttempt(t *testing.T, token string, attempt uint64) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", recoverSocket(token))
	require.NoError(t, err)
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], attempt)
	_, err = c.Write(b[:])
	require.NoError(t, err)
	return c
}

// A new link after a break: the two connections of one attempt come out
// as a pair, a connection of an attempt the source gave up on is closed,
// and a Reattach ends on its context or on Close.
func TestReattachPairsAttempts(t *testing.T) {
	token := testToken(t)
	rl, err := listenReattach(token, t.Logf)
	require.NoError(t, err)
	t.Cleanup(func() { rl.Close() })
	stale := dialAttempt(t, token, 5)
	defer stale.Close()
	a := dialAttempt(t, token, 6)
	defer a.Close()
	b := dialAttempt(t, token, 6)
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c1, c2, err := rl.Reattach(ctx)
	require.NoError(t, err)
	// Both ends are attempt 6's: what a and b write arrives on c1 and c2.
	_, err = a.Write([]byte("a"))
	require.NoError(t, err)
	_, err = b.Write([]byte("b"))
	require.NoError(t, err)
	got := map[string]bool{}
	for _, c := range []io.ReadWriteCloser{c1, c2} {
		p := make([]byte, 1)
		_, err := io.ReadFull(c, p)
		require.NoError(t, err)
		got[string(p)] = true
	}
	require.Equal(t, map[string]bool{"a": true, "b": true}, got)
	// Attempt 5 was dropped: its connection reads EOF.
	_ = stale.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = stale.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF)
	c1.Close()
	c2.Close()

	// Half a pair is not a link.
	half := dialAttempt(t, token, 7)
	defer half.Close()
	sctx, scancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer scancel()
	_, _, err = rl.Reattach(sctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)

	done := make(chan error, 1)
	go func() {
		_, _, err := rl.Reattach(context.Background())
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	require.NoError(t, rl.Close())
	select {
	case err := <-done:
		require.ErrorContains(t, err, "recovery socket is closed")
	case <-time.After(5 * time.Second):
		t.Fatal("Reattach did not end on Close")
	}
	// The half pair waiting was closed with the listener.
	_ = half.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = half.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF)
}

// The source's reconnect through real relay processes (the built
// command's `migrate-receive --attach`, as -s ” runs it): each attempt is
// a new pair, bytes go both ways, and the relays end when the source
// closes its side.
func TestReconnectThroughRelays(t *testing.T) {
	bin := builtCLI(t)
	token := testToken(t)
	rl, err := listenReattach(token, t.Logf)
	require.NoError(t, err)
	defer rl.Close()
	r := &receiver{token: token, attachCmd: func(n uint64) *exec.Cmd {
		return exec.Command(bin, "migrate-receive", "--attach", token, "--link", strconv.FormatUint(n, 10))
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for attempt := 1; attempt <= 2; attempt++ {
		s1, s2, err := r.reconnect(ctx)
		require.NoError(t, err)
		d1, d2, err := rl.Reattach(ctx)
		require.NoError(t, err)
		msg := fmt.Sprintf("attempt-%d", attempt)
		_, err = s1.Write([]byte(msg))
		require.NoError(t, err)
		_, err = s2.Write([]byte(msg))
		require.NoError(t, err)
		for _, d := range []io.ReadWriteCloser{d1, d2} {
			p := make([]byte, len(msg))
			_, err := io.ReadFull(d, p)
			require.NoError(t, err)
			require.Equal(t, msg, string(p))
			_, err = d.Write([]byte("ok"))
			require.NoError(t, err)
		}
		for _, s := range []io.ReadWriteCloser{s1, s2} {
			p := make([]byte, 2)
			_, err := io.ReadFull(s, p)
			require.NoError(t, err)
			require.Equal(t, "ok", string(p))
			s.Close()
		}
		d1.Close()
		d2.Close()
	}
	require.NoError(t, r.wait(10*time.Second), "the relays end when their streams close")
	require.Len(t, r.cmds, 4)
}

// A relay with no receiver behind it exits soon, with the reason.
func TestAttachLinkWithoutReceiver(t *testing.T) {
	start := time.Now()
	err := attachLink("no-such-receiver-token", 1, 100*time.Millisecond)
	require.ErrorContains(t, err, "attach to the receiver's recovery socket")
	require.Less(t, time.Since(start), 5*time.Second)
}

// testToken is a socket token of this test alone (abstract sockets are
// shared by every process of the network namespace, other test runs too).
func testToken(t *testing.T) string {
	t.Helper()
	tok, err := newToken()
	require.NoError(t, err)
	return "test-" + tok
}
