package xenstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// Where xenstore is reached. A guest only has the kernel device; dom0 has
// xenstored's socket (and usually the device too, which goes through the
// dom0 kernel's own xenstore connection).
const (
	XenbusDevice     = "/dev/xen/xenbus"
	SocketPath       = "/run/xenstored/socket"
	LegacySocketPath = "/var/run/xenstored/socket"
	// EnvPath names the environment variable that overrides the choice,
	// the same one libxenstore honours.
	EnvPath = "XENSTORED_PATH"
)

// ErrNoXenstore is returned by Open when no way to reach xenstore exists.
var ErrNoXenstore = errors.New("no xenstore: neither " + XenbusDevice + " nor " + SocketPath +
	" exists — is this a Xen guest or dom0?")

// Open connects to xenstore the way this machine allows: the path in
// $XENSTORED_PATH if set, else xenstored's socket (dom0), else the xenbus
// device (guest).
func Open() (*Client, error) {
	if p := os.Getenv(EnvPath); p != "" {
		return OpenPath(p)
	}
	for _, p := range []string{SocketPath, LegacySocketPath, XenbusDevice} {
		if _, err := os.Stat(p); err == nil {
			return OpenPath(p)
		}
	}
	return nil, ErrNoXenstore
}

// OpenPath connects to xenstore at path: a unix socket is dialled, anything
// else (the xenbus character device) is opened read-write.
func OpenPath(path string) (*Client, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("xenstore at %s: %w", path, err)
	}
	if st.Mode()&os.ModeSocket != 0 {
		conn, err := net.Dial("unix", path)
		if err != nil {
			return nil, fmt.Errorf("connecting to xenstored at %s (is xenstored running?): %w", path, err)
		}
		return NewClient(conn), nil
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("opening xenstore device %s (needs root in a Xen guest): %w", path, err)
	}
	return NewClient(f), nil
}

type reply struct {
	h Header
	p []byte
}

type pending struct {
	ch  chan reply
	op  Op
	seq uint64 // order of sending
}

// Client is a connection to xenstored. Its methods are safe for concurrent
// use: each request carries its own req_id and waits for the reply with
// that id, so slow requests do not hold up others.
type Client struct {
	conn io.ReadWriteCloser
	wmu  sync.Mutex // one message on the wire at a time

	mu      sync.Mutex
	nextID  uint32
	nextSeq uint64
	pending map[uint32]*pending
	watches map[string]*Watch // by token
	nextTok uint64
	err     error         // why the connection ended, once it has
	done    chan struct{} // closed when the reader stops
	closing bool
}

// NewClient runs the protocol over an already open connection, e.g. a
// net.Conn to a test double. The Client owns conn and closes it in Close.
func NewClient(conn io.ReadWriteCloser) *Client {
	c := &Client{
		conn:    conn,
		nextID:  1, // 0 is what watch events carry
		pending: make(map[uint32]*pending),
		watches: make(map[string]*Watch),
		done:    make(chan struct{}),
	}
	go c.readLoop()
	return c
}

// Close ends the connection. Pending requests fail with ErrClosed and the
// channels of all watches are closed.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closing = true
	c.mu.Unlock()
	err := c.conn.Close()
	<-c.done
	return err
}

// Err reports why the connection ended, or nil while it is up.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *Client) readLoop() {
	var err error
	for {
		var h Header
		var p []byte
		h, p, err = ReadMessage(c.conn)
		if err != nil {
			break
		}
		if h.Op == OpWatchEvent {
			c.deliver(p)
			continue
		}
		c.mu.Lock()
		pr := c.match(h)
		c.mu.Unlock()
		// A reply nobody waits for belongs to a request whose context
		// was cancelled: drop it.
		if pr != nil {
			pr.ch <- reply{h, p}
		}
	}
	c.mu.Lock()
	if c.closing {
		c.err = ErrClosed
	} else {
		c.err = fmt.Errorf("%w: %w", ErrClosed, err)
	}
	for id, pr := range c.pending {
		close(pr.ch)
		delete(c.pending, id)
	}
	ws := c.watches
	c.watches = map[string]*Watch{}
	c.mu.Unlock()
	for _, w := range ws {
		w.finish()
	}
	close(c.done)
}

// match finds (and removes) the request a reply answers, with c.mu held.
//
// Linux's /dev/xen/xenbus answers WATCH and UNWATCH itself, and (at least
// up to the versions read while writing this) builds that "OK" reply with
// req_id and tx_id zero. It does so synchronously in write(), so such a
// reply belongs to the oldest WATCH (or UNWATCH) still waiting.
func (c *Client) match(h Header) *pending {
	if pr := c.pending[h.ReqID]; pr != nil {
		delete(c.pending, h.ReqID)
		return pr
	}
	if h.ReqID != 0 || (h.Op != OpWatch && h.Op != OpUnwatch) {
		return nil
	}
	var oldest *pending
	var oldestID uint32
	for id, pr := range c.pending {
		if pr.op == h.Op && (oldest == nil || pr.seq < oldest.seq) {
			oldest, oldestID = pr, id
		}
	}
	if oldest != nil {
		delete(c.pending, oldestID)
	}
	return oldest
}

func (c *Client) deliver(p []byte) {
	parts, err := SplitNul(p)
	// A malformed event cannot be routed; watches may fire spuriously
	// anyway, so dropping it loses nothing a consumer can rely on.
	if err != nil || len(parts) < 2 {
		return
	}
	c.mu.Lock()
	w := c.watches[parts[1]]
	c.mu.Unlock()
	if w != nil {
		w.push(WatchEvent{Path: parts[0], Token: parts[1]})
	}
}

// request sends one request and returns the reply payload. An ERROR reply
// becomes *Error; a reply of another type than op is ErrProtocol.
func (c *Client) request(ctx context.Context, tx uint32, op Op, path string, payload []byte) ([]byte, error) {
	if len(payload) > PayloadMax {
		return nil, fmt.Errorf("xenstore %s %s: %w", op, path, ErrTooBigRequest)
	}
	ch := make(chan reply, 1)
	c.mu.Lock()
	c.nextSeq++
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, fmt.Errorf("xenstore %s %s: %w", op, path, err)
	}
	id := c.nextID
	c.nextID++
	if c.nextID == 0 {
		c.nextID = 1
	}
	c.pending[id] = &pending{ch: ch, op: op, seq: c.nextSeq}
	c.mu.Unlock()

	c.wmu.Lock()
	err := WriteMessage(c.conn, Header{Op: op, ReqID: id, TxID: tx}, payload)
	c.wmu.Unlock()
	if err != nil {
		c.forget(id)
		return nil, fmt.Errorf("xenstore %s %s: sending request: %w", op, path, err)
	}
	select {
	case r, ok := <-ch:
		if !ok {
			return nil, fmt.Errorf("xenstore %s %s: %w", op, path, c.Err())
		}
		if r.h.Op == OpError {
			return nil, parseError(op, path, r.p)
		}
		if r.h.Op != op {
			return nil, fmt.Errorf("%w: %s %s: reply has type %s", ErrProtocol, op, path, r.h.Op)
		}
		if r.h.TxID != tx && r.h.ReqID != 0 {
			return nil, fmt.Errorf("%w: %s %s: reply for transaction %d, request was in %d", ErrProtocol, op, path, r.h.TxID, tx)
		}
		return r.p, nil
	case <-ctx.Done():
		c.forget(id)
		return nil, fmt.Errorf("xenstore %s %s: %w", op, path, ctx.Err())
	}
}

func (c *Client) forget(id uint32) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// ErrTooBigRequest is returned before sending a request whose payload
// would exceed PayloadMax (xenstored would drop the whole connection).
var ErrTooBigRequest = errors.New("request payload exceeds the 4096-byte xenstore limit")

func checkPath(path string) error {
	if path == "" {
		return fmt.Errorf("xenstore: empty path: %w", ErrInvalid)
	}
	if strings.IndexByte(path, 0) >= 0 {
		return fmt.Errorf("xenstore: path %q contains a NUL byte: %w", path, ErrInvalid)
	}
	max := RelPathMax
	if path[0] == '/' || path[0] == '@' {
		max = AbsPathMax
	}
	if len(path) > max {
		return fmt.Errorf("xenstore: path of %d bytes exceeds %d: %w", len(path), max, ErrTooBig)
	}
	return nil
}

// expectOK checks the "OK" payload of replies that carry no data.
func expectOK(op Op, path string, p []byte) error {
	s := strings.TrimSuffix(string(p), "\x00")
	if s != "OK" {
		return fmt.Errorf("%w: %s %s: expected OK, got %q", ErrProtocol, op, path, truncate(p))
	}
	return nil
}

// The operations below are shared by Client (tx 0) and Tx.

func (c *Client) read(ctx context.Context, tx uint32, path string) (string, error) {
	if err := checkPath(path); err != nil {
		return "", err
	}
	p, err := c.request(ctx, tx, OpRead, path, joinNul(path))
	if err != nil {
		return "", err
	}
	// Values carry no NUL by convention; a trailing one some daemons add
	// is the C string terminator, not part of the value.
	return strings.TrimSuffix(string(p), "\x00"), nil
}

func (c *Client) write(ctx context.Context, tx uint32, path, value string) error {
	if err := checkPath(path); err != nil {
		return err
	}
	payload := append(joinNul(path), value...)
	p, err := c.request(ctx, tx, OpWrite, path, payload)
	if err != nil {
		return err
	}
	return expectOK(OpWrite, path, p)
}

func (c *Client) simple(ctx context.Context, tx uint32, op Op, path string) error {
	if err := checkPath(path); err != nil {
		return err
	}
	p, err := c.request(ctx, tx, op, path, joinNul(path))
	if err != nil {
		return err
	}
	return expectOK(op, path, p)
}

func (c *Client) directory(ctx context.Context, tx uint32, path string) ([]string, error) {
	if err := checkPath(path); err != nil {
		return nil, err
	}
	p, err := c.request(ctx, tx, OpDirectory, path, joinNul(path))
	if err != nil {
		return nil, err
	}
	names, err := SplitNul(p)
	if err != nil {
		return nil, fmt.Errorf("xenstore DIRECTORY %s: %w", path, err)
	}
	for _, n := range names {
		if n == "" || strings.IndexByte(n, '/') >= 0 {
			return nil, fmt.Errorf("%w: DIRECTORY %s: bad child name %q", ErrProtocol, path, n)
		}
	}
	return names, nil
}

func (c *Client) getPerms(ctx context.Context, tx uint32, path string) ([]Perm, error) {
	if err := checkPath(path); err != nil {
		return nil, err
	}
	p, err := c.request(ctx, tx, OpGetPerms, path, joinNul(path))
	if err != nil {
		return nil, err
	}
	parts, err := SplitNul(p)
	if err != nil {
		return nil, fmt.Errorf("xenstore GET_PERMS %s: %w", path, err)
	}
	if len(parts) == 0 {
		return nil, fmt.Errorf("%w: GET_PERMS %s: empty permission list", ErrProtocol, path)
	}
	perms := make([]Perm, len(parts))
	for i, s := range parts {
		if perms[i], err = ParsePerm(s); err != nil {
			return nil, fmt.Errorf("%w: GET_PERMS %s: %w", ErrProtocol, path, err)
		}
	}
	return perms, nil
}

func (c *Client) setPerms(ctx context.Context, tx uint32, path string, perms []Perm) error {
	if err := checkPath(path); err != nil {
		return err
	}
	if len(perms) == 0 {
		return fmt.Errorf("xenstore SET_PERMS %s: need at least the owner entry: %w", path, ErrInvalid)
	}
	parts := []string{path}
	for _, pm := range perms {
		if err := pm.check(); err != nil {
			return fmt.Errorf("xenstore SET_PERMS %s: %w", path, err)
		}
		parts = append(parts, pm.String())
	}
	p, err := c.request(ctx, tx, OpSetPerms, path, joinNul(parts...))
	if err != nil {
		return err
	}
	return expectOK(OpSetPerms, path, p)
}

// Read returns the value stored at path.
func (c *Client) Read(ctx context.Context, path string) (string, error) {
	return c.read(ctx, 0, path)
}

// Write stores value at path, creating missing parents with empty values.
func (c *Client) Write(ctx context.Context, path, value string) error {
	return c.write(ctx, 0, path, value)
}

// Mkdir makes sure path exists, leaving an existing value alone.
func (c *Client) Mkdir(ctx context.Context, path string) error {
	return c.simple(ctx, 0, OpMkdir, path)
}

// Remove deletes path and everything below it. A missing path is not an
// error; a missing parent is (ErrNotFound).
func (c *Client) Remove(ctx context.Context, path string) error {
	return c.simple(ctx, 0, OpRm, path)
}

// Directory lists the names of the immediate children of path.
func (c *Client) Directory(ctx context.Context, path string) ([]string, error) {
	return c.directory(ctx, 0, path)
}

// GetPerms returns the permissions of path; the first entry names the
// owner and the access of domains not listed.
func (c *Client) GetPerms(ctx context.Context, path string) ([]Perm, error) {
	return c.getPerms(ctx, 0, path)
}

// SetPerms replaces the permissions of path. perms[0] names the owner
// (who always has full access) and the access of every domain not listed.
func (c *Client) SetPerms(ctx context.Context, path string, perms ...Perm) error {
	return c.setPerms(ctx, 0, path, perms)
}

// GetDomainPath returns the home of a domain, /local/domain/<domid>.
func (c *Client) GetDomainPath(ctx context.Context, domid uint32) (string, error) {
	id := strconv.FormatUint(uint64(domid), 10)
	p, err := c.request(ctx, 0, OpGetDomainPath, id, joinNul(id))
	if err != nil {
		return "", err
	}
	parts, err := SplitNul(p)
	if err != nil {
		return "", fmt.Errorf("xenstore GET_DOMAIN_PATH %s: %w", id, err)
	}
	if len(parts) != 1 || !strings.HasPrefix(parts[0], "/") {
		return "", fmt.Errorf("%w: GET_DOMAIN_PATH %s: reply %q is not an absolute path", ErrProtocol, id, truncate(p))
	}
	return parts[0], nil
}

// Access is one domain's right on a node.
type Access byte

// Access letters of the wire format.
const (
	AccessNone      Access = 'n'
	AccessRead      Access = 'r'
	AccessWrite     Access = 'w'
	AccessReadWrite Access = 'b' // "both"
)

// Perm is one entry of a node's permission list.
type Perm struct {
	Domid  uint32
	Access Access
}

// String returns the wire form, e.g. "b5".
func (p Perm) String() string {
	return string(rune(p.Access)) + strconv.FormatUint(uint64(p.Domid), 10)
}

func (p Perm) check() error {
	switch p.Access {
	case AccessNone, AccessRead, AccessWrite, AccessReadWrite:
	default:
		return fmt.Errorf("permission access %q is not one of n, r, w, b: %w", rune(p.Access), ErrInvalid)
	}
	if p.Domid > 0xffff {
		return fmt.Errorf("permission domid %d out of range: %w", p.Domid, ErrInvalid)
	}
	return nil
}

// ParsePerm parses the wire form of a permission, e.g. "r0".
func ParsePerm(s string) (Perm, error) {
	if len(s) < 2 {
		return Perm{}, fmt.Errorf("permission %q too short", s)
	}
	id, err := strconv.ParseUint(s[1:], 10, 16)
	if err != nil {
		return Perm{}, fmt.Errorf("permission %q: bad domid: %w", s, err)
	}
	p := Perm{Domid: uint32(id), Access: Access(s[0])}
	if err := p.check(); err != nil {
		return Perm{}, err
	}
	return p, nil
}
