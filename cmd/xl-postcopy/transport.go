package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xl-postcopy/xl-postcopy/xen/xendom"
)

// A migration uses two byte streams to the receiver: bulk (the stream of
// pages and control records) and urgent (fault requests and their
// replies, which must never queue behind bulk). Like xl, the receiver is
// started with a command: locally with `-s ''`, else `SSH HOST
// xl-postcopy migrate-receive`, whose stdin/stdout carry bulk. The urgent
// stream goes over a second `SSH HOST xl-postcopy migrate-receive
// --urgent-attach TOKEN`, which relays to the receiver's abstract unix
// socket @xl-postcopy-TOKEN.

// receiver is a started migrate-receive and its two streams.
type receiver struct {
	bulk, urgent io.ReadWriteCloser
	cmds         []*exec.Cmd
}

// wait reaps the receiver's processes; their failure was reported over
// the stream already, so only the first exit error is returned for logs.
func (r *receiver) wait(timeout time.Duration) error {
	done := make(chan error, 1)
	go func() {
		var first error
		for _, c := range r.cmds {
			if err := c.Wait(); err != nil && first == nil {
				first = fmt.Errorf("%s: %w", strings.Join(c.Args, " "), err)
			}
		}
		done <- first
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(timeout):
		for _, c := range r.cmds {
			_ = c.Process.Kill()
		}
		return errors.New("the receiver did not exit; killed")
	}
}

// startLocalReceiver runs `self migrate-receive` with the two streams on
// socket pairs: bulk on stdin/stdout, urgent on fd 3.
func startLocalReceiver(self string, extra []string) (*receiver, error) {
	bulkA, bulkB, err := socketPair()
	if err != nil {
		return nil, err
	}
	urgA, urgB, err := socketPair()
	if err != nil {
		bulkA.Close()
		bulkB.Close()
		return nil, err
	}
	args := append([]string{"migrate-receive", "--urgent-fd", "3"}, extra...)
	cmd := exec.Command(self, args...)
	cmd.Env = xendom.CleanEnv()
	cmd.Stdin, cmd.Stdout, cmd.Stderr = bulkB, bulkB, os.Stderr
	cmd.ExtraFiles = []*os.File{urgB}
	if err := cmd.Start(); err != nil {
		bulkA.Close()
		bulkB.Close()
		urgA.Close()
		urgB.Close()
		return nil, fmt.Errorf("start the local receiver %s: %w", self, err)
	}
	bulkB.Close()
	urgB.Close()
	b, err := fileConn(bulkA)
	if err != nil {
		return nil, err
	}
	u, err := fileConn(urgA)
	if err != nil {
		return nil, err
	}
	return &receiver{bulk: b, urgent: u, cmds: []*exec.Cmd{cmd}}, nil
}

// startRemoteReceiver runs the receiver through sshCmd (a shell command
// prefix such as "ssh -o BatchMode=yes") on host.
func startRemoteReceiver(sshCmd, host, remoteBin string, extra []string) (*receiver, error) {
	tok := make([]byte, 8)
	if _, err := rand.Read(tok); err != nil {
		return nil, fmt.Errorf("receiver token: %w", err)
	}
	token := hex.EncodeToString(tok)
	rune1 := fmt.Sprintf("%s %s %s migrate-receive --urgent-listen %s %s", sshCmd, shellQuote(host), remoteBin, token, strings.Join(extra, " "))
	rune2 := fmt.Sprintf("%s %s %s migrate-receive --urgent-attach %s", sshCmd, shellQuote(host), remoteBin, token)
	c1, bulk, err := startPiped(rune1)
	if err != nil {
		return nil, err
	}
	c2, urg, err := startPiped(rune2)
	if err != nil {
		bulk.Close()
		_ = c1.Process.Kill()
		_ = c1.Wait()
		return nil, err
	}
	return &receiver{bulk: bulk, urgent: urg, cmds: []*exec.Cmd{c1, c2}}, nil
}

func startPiped(rune string) (*exec.Cmd, io.ReadWriteCloser, error) {
	cmd := exec.Command("/bin/sh", "-c", rune)
	cmd.Env = xendom.CleanEnv()
	w, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, err
	}
	r, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start %q: %w", rune, err)
	}
	return cmd, &pipeConn{r: r, w: w}, nil
}

// pipeConn joins a reader and a writer into one stream.
type pipeConn struct {
	r    io.ReadCloser
	w    io.WriteCloser
	once sync.Once
}

func (p *pipeConn) Read(b []byte) (int, error)  { return p.r.Read(b) }
func (p *pipeConn) Write(b []byte) (int, error) { return p.w.Write(b) }
func (p *pipeConn) Close() error {
	var err error
	p.once.Do(func() { err = errors.Join(p.w.Close(), p.r.Close()) })
	return err
}

func socketPair() (*os.File, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "stream-a"), os.NewFile(uintptr(fds[1]), "stream-b"), nil
}

// fileConn turns a socket file into a net.Conn (and closes the file).
func fileConn(f *os.File) (net.Conn, error) {
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("stream socket: %w", err)
	}
	return c, nil
}

func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r == '-' || r == '.' || r == '_' || r == ':' || r == '@' || r == '/' ||
			(r >= '0' && r <= '9') || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z'))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// urgentSocket is the abstract unix socket of a receiver's urgent stream.
func urgentSocket(token string) string { return "@xl-postcopy-" + token }

// listenUrgent accepts the attach relay's connection.
func listenUrgent(token string, timeout time.Duration) (net.Conn, error) {
	l, err := net.Listen("unix", urgentSocket(token))
	if err != nil {
		return nil, fmt.Errorf("listen for the urgent stream: %w", err)
	}
	defer l.Close()
	if ul, ok := l.(*net.UnixListener); ok {
		_ = ul.SetDeadline(time.Now().Add(timeout))
	}
	c, err := l.Accept()
	if err != nil {
		return nil, fmt.Errorf("no urgent stream attached within %v: %w", timeout, err)
	}
	return c, nil
}

// attachUrgent relays stdin/stdout to the receiver's urgent socket.
func attachUrgent(token string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var c net.Conn
	var err error
	for {
		c, err = net.Dial("unix", urgentSocket(token))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("attach to the receiver's urgent stream: %w", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	defer c.Close()
	errc := make(chan error, 2)
	go func() {
		_, err := io.Copy(c, os.Stdin)
		if uc, ok := c.(*net.UnixConn); ok {
			_ = uc.CloseWrite()
		}
		errc <- err
	}()
	go func() {
		_, err := io.Copy(os.Stdout, c)
		errc <- err
	}()
	return <-errc
}
