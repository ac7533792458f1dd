package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
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
//
// Recovery (postcopy-paused): the receiver also listens on
// @xl-postcopy-recover-TOKEN for the whole migration. When the link
// breaks after GO, the source runs the same command again twice, as
// `SSH HOST xl-postcopy migrate-receive --attach TOKEN` (locally
// `xl-postcopy migrate-receive --attach TOKEN`), and each relays one new
// stream to that socket; the engine tells them apart by their channel
// headers.

// receiver is a started migrate-receive and its two streams.
type receiver struct {
	bulk, urgent io.ReadWriteCloser
	// token names the receiver's abstract sockets.
	token string
	// attachCmd makes one relay process to the receiver's recovery
	// socket for reconnect attempt n.
	attachCmd func(n uint64) *exec.Cmd

	mu       sync.Mutex
	cmds     []*exec.Cmd
	attempts uint64
}

// newToken is a random name for a receiver's sockets.
func newToken() (string, error) {
	tok := make([]byte, 8)
	if _, err := rand.Read(tok); err != nil {
		return "", fmt.Errorf("receiver token: %w", err)
	}
	return hex.EncodeToString(tok), nil
}

// reconnect is the engine's Options.Reconnect: two new relays to the
// receiver's recovery socket, through the same transport as the first
// link. A relay that cannot reach the receiver exits, which the engine
// sees as the handshake failing, and it tries again later.
func (r *receiver) reconnect(ctx context.Context) (bulk, urgent io.ReadWriteCloser, err error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	r.mu.Lock()
	r.attempts++
	n := r.attempts
	r.mu.Unlock()
	c1, s1, err := startPiped(r.attachCmd(n))
	if err != nil {
		return nil, nil, err
	}
	c2, s2, err := startPiped(r.attachCmd(n))
	if err != nil {
		s1.Close()
		_ = c1.Process.Kill()
		_ = c1.Wait()
		return nil, nil, err
	}
	r.mu.Lock()
	r.cmds = append(r.cmds, c1, c2)
	r.mu.Unlock()
	return s1, s2, nil
}

// wait reaps the receiver's processes; their failure was reported over
// the stream already, so only the first exit error is returned for logs.
func (r *receiver) wait(timeout time.Duration) error {
	r.mu.Lock()
	cmds := append([]*exec.Cmd(nil), r.cmds...)
	r.mu.Unlock()
	done := make(chan error, 1)
	go func() {
		var first error
		for _, c := range cmds {
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
		for _, c := range cmds {
			_ = c.Process.Kill()
		}
		return errors.New("the receiver did not exit; killed")
	}
}

// startLocalReceiver runs `self migrate-receive` with the two streams on
// socket pairs: bulk on stdin/stdout, urgent on fd 3.
func startLocalReceiver(self string, extra []string) (*receiver, error) {
	token, err := newToken()
	if err != nil {
		return nil, err
	}
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
	args := append([]string{"migrate-receive", "--urgent-fd", "3", "--recover-token", token}, extra...)
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
	return &receiver{bulk: b, urgent: u, token: token, attachCmd: localAttach(self, token), cmds: []*exec.Cmd{cmd}}, nil
}

// localAttach makes the relay command of a local receiver's new links.
func localAttach(self, token string) func(n uint64) *exec.Cmd {
	return func(n uint64) *exec.Cmd {
		c := exec.Command(self, "migrate-receive", "--attach", token, "--link", strconv.FormatUint(n, 10))
		c.Env = xendom.CleanEnv()
		return c
	}
}

// remoteAttach makes the relay command of a remote receiver's new links.
func remoteAttach(sshCmd, host, remoteBin, token string) func(n uint64) *exec.Cmd {
	rune3 := fmt.Sprintf("%s %s %s migrate-receive --attach %s --link", sshCmd, shellQuote(host), remoteBin, token)
	return func(n uint64) *exec.Cmd { return shellCmd(fmt.Sprintf("%s %d", rune3, n)) }
}

// A take-over's receiver is one that waits already: only new links are
// made to it. Their attempt numbers start from the clock, above any the
// dead process used (it counted from 1), since the receiver drops a
// connection of an attempt not newer than the last it took.
func takeOverAttempts() uint64 { return uint64(time.Now().UnixNano()) }

// attachOnlyLocal is a take-over's local receiver (-s ”).
func attachOnlyLocal(self, token string) *receiver {
	return &receiver{token: token, attachCmd: localAttach(self, token), attempts: takeOverAttempts()}
}

// attachOnlyRemote is a take-over's receiver through sshCmd on host.
func attachOnlyRemote(sshCmd, host, remoteBin, token string) *receiver {
	return &receiver{token: token, attachCmd: remoteAttach(sshCmd, host, remoteBin, token), attempts: takeOverAttempts()}
}

// startRemoteReceiver runs the receiver through sshCmd (a shell command
// prefix such as "ssh -o BatchMode=yes") on host.
func startRemoteReceiver(sshCmd, host, remoteBin string, extra []string) (*receiver, error) {
	token, err := newToken()
	if err != nil {
		return nil, err
	}
	rune1 := fmt.Sprintf("%s %s %s migrate-receive --urgent-listen %s --recover-token %s %s", sshCmd, shellQuote(host), remoteBin, token, token, strings.Join(extra, " "))
	rune2 := fmt.Sprintf("%s %s %s migrate-receive --urgent-attach %s", sshCmd, shellQuote(host), remoteBin, token)
	c1, bulk, err := startPiped(shellCmd(rune1))
	if err != nil {
		return nil, err
	}
	c2, urg, err := startPiped(shellCmd(rune2))
	if err != nil {
		bulk.Close()
		_ = c1.Process.Kill()
		_ = c1.Wait()
		return nil, err
	}
	return &receiver{bulk: bulk, urgent: urg, token: token, attachCmd: remoteAttach(sshCmd, host, remoteBin, token),
		cmds: []*exec.Cmd{c1, c2}}, nil
}

// shellCmd runs a transport command line through /bin/sh, as xl does.
func shellCmd(rune string) *exec.Cmd {
	cmd := exec.Command("/bin/sh", "-c", rune)
	cmd.Env = xendom.CleanEnv()
	return cmd
}

// startPiped starts cmd with its stdin and stdout as one stream.
func startPiped(cmd *exec.Cmd) (*exec.Cmd, io.ReadWriteCloser, error) {
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
		return nil, nil, fmt.Errorf("start %q: %w", strings.Join(cmd.Args, " "), err)
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

// recoverSocket is the abstract unix socket a receiver takes a new link
// on after a break (postcopy-paused).
func recoverSocket(token string) string { return "@xl-postcopy-recover-" + token }

// listenUrgent accepts the attach relay's connection.
func listenUrgent(token string, timeout time.Duration) (net.Conn, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: urgentSocket(token), Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen for the urgent stream: %w", err)
	}
	defer l.Close()
	deadline := time.Now().Add(timeout)
	for {
		_ = l.SetDeadline(deadline)
		c, err := l.AcceptUnix()
		if err != nil {
			return nil, fmt.Errorf("no urgent stream attached within %v: %w", timeout, err)
		}
		if err := samePeer(c); err != nil {
			c.Close()
			continue
		}
		return c, nil
	}
}

// samePeer refuses a connection to an abstract socket (which any process
// in this network namespace can reach) from another user than this one.
func samePeer(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return fmt.Errorf("peer credentials: %w", cerr)
	}
	if int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("peer pid %d runs as uid %d, not %d", cred.Pid, cred.Uid, os.Geteuid())
	}
	return nil
}

// reattachListener takes a paused migration's new links on the recovery
// socket; its Reattach is the engine's DestOptions.Reattach. Each relay
// opens its connection with the source's attempt number (8 bytes, big
// endian), so the two connections of one attempt are paired and those
// of attempts the source gave up on are dropped, whatever order the
// relays arrive in.
type reattachListener struct {
	l    *net.UnixListener
	logf func(string, ...any)
	// arrived is poked whenever a connection joins pending.
	arrived chan struct{}
	done    chan struct{}
	once    sync.Once

	mu sync.Mutex
	// pending are connections whose attempt's other half has not come
	// or that no Reattach has taken yet.
	pending map[uint64][]*net.UnixConn
	// newest is the latest attempt handed out: a connection of it or of
	// an earlier one is of a link given up, and closed when it comes.
	newest uint64
	closed bool
}

// listenReattach listens on the recovery socket of token for the whole
// migration.
func listenReattach(token string, logf func(string, ...any)) (*reattachListener, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: recoverSocket(token), Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen for a new link after a break: %w", err)
	}
	r := &reattachListener{l: l, logf: logf, arrived: make(chan struct{}, 1), done: make(chan struct{}),
		pending: map[uint64][]*net.UnixConn{}}
	go r.acceptLoop()
	return r, nil
}

func (r *reattachListener) acceptLoop() {
	for {
		c, err := r.l.AcceptUnix()
		if err != nil {
			return
		}
		go r.admit(c)
	}
}

// admit reads a connection's attempt number and files it.
func (r *reattachListener) admit(c *net.UnixConn) {
	if err := samePeer(c); err != nil {
		r.logf("a connection to the recovery socket was refused: %v", err)
		c.Close()
		return
	}
	var b [8]byte
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, b[:]); err != nil {
		r.logf("a connection to the recovery socket said nothing: %v", err)
		c.Close()
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	a := binary.BigEndian.Uint64(b[:])
	r.mu.Lock()
	if r.closed || a <= r.newest || len(r.pending[a]) >= 2 {
		r.mu.Unlock()
		c.Close()
		return
	}
	r.pending[a] = append(r.pending[a], c)
	r.mu.Unlock()
	select {
	case r.arrived <- struct{}{}:
	default:
	}
}

// Close stops listening and drops the connections waiting for a pair.
func (r *reattachListener) Close() error {
	err := r.l.Close()
	r.once.Do(func() { close(r.done) })
	r.mu.Lock()
	r.closed = true
	for a, cs := range r.pending {
		for _, c := range cs {
			c.Close()
		}
		delete(r.pending, a)
	}
	r.mu.Unlock()
	return err
}

// Reattach waits for both connections of one attempt of the source's (the
// newest, if several are complete) and drops those of earlier attempts.
func (r *reattachListener) Reattach(ctx context.Context) (io.ReadWriteCloser, io.ReadWriteCloser, error) {
	for {
		if c1, c2, ok := r.takePair(); ok {
			return c1, c2, nil
		}
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-r.done:
			return nil, nil, errors.New("the recovery socket is closed")
		case <-r.arrived:
		}
	}
}

func (r *reattachListener) takePair() (*net.UnixConn, *net.UnixConn, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	best, found := uint64(0), false
	for a, cs := range r.pending {
		if len(cs) == 2 && (!found || a > best) {
			best, found = a, true
		}
	}
	if !found {
		return nil, nil, false
	}
	pair := r.pending[best]
	delete(r.pending, best)
	r.newest = best
	for a, cs := range r.pending {
		if a < best {
			for _, c := range cs {
				c.Close()
			}
			delete(r.pending, a)
		}
	}
	return pair[0], pair[1], true
}

// attachLink relays stdin/stdout to the receiver's recovery socket,
// saying first which of the source's attempts it belongs to.
func attachLink(token string, attempt uint64, timeout time.Duration) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], attempt)
	return attachSocket(recoverSocket(token), "recovery socket", timeout, b[:])
}

// attachUrgent relays stdin/stdout to the receiver's urgent socket.
func attachUrgent(token string, timeout time.Duration) error {
	return attachSocket(urgentSocket(token), "urgent stream", timeout, nil)
}

// attachSocket relays stdin/stdout to the abstract socket name, trying to
// connect for timeout, after writing preamble.
func attachSocket(name, what string, timeout time.Duration, preamble []byte) error {
	deadline := time.Now().Add(timeout)
	var c net.Conn
	var err error
	for {
		c, err = net.Dial("unix", name)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("attach to the receiver's %s: %w", what, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	defer c.Close()
	if len(preamble) > 0 {
		if _, err := c.Write(preamble); err != nil {
			return fmt.Errorf("attach to the receiver's %s: %w", what, err)
		}
	}
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
