package main

import (
	"io"
	"os"
	"path/filepath"
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
	token := "test" + filepath.Base(t.TempDir())
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
