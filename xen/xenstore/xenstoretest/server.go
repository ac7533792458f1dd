// Package xenstoretest is a small in-process xenstored for tests: a tree
// of nodes with owner/permission rules, watches, transactions and domain
// homes, served over unix sockets with the real wire protocol. Each socket
// is bound to a domain id, standing in for that domain's /dev/xen/xenbus
// (or, for domain 0, for xenstored's socket).
//
// It follows the C xenstored where tests can observe it: new nodes inherit
// their parent's permissions, a node created by a guest is owned by that
// guest, relative paths resolve against /local/domain/<domid>, a watch
// fires once when set, and a transaction commit fails with EAGAIN if the
// store changed after it began. It does not implement quotas, INTRODUCE,
// DIRECTORY_PART or permission filtering of watch events.
package xenstoretest

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/xl-postcopy/xl-postcopy/xen/xenstore"
)

type node struct {
	value string
	perms []xenstore.Perm
}

type watch struct {
	wpath    string // absolute
	token    string
	relative bool
}

type conn struct {
	domid   uint32
	c       net.Conn
	wmu     sync.Mutex
	watches []watch
	txs     map[uint32]*txn
}

type txn struct {
	tree    map[string]*node
	gen     uint64
	changed []change
}

type change struct {
	path    string
	removed bool
}

// Interceptor lets a test replace the server's answer to a request: when
// it returns handled, raw is written to the connection as is (it may be a
// malformed message, or nothing at all).
type Interceptor func(domid uint32, h xenstore.Header, payload []byte) (raw []byte, handled bool)

// Server is the fake xenstored. Its methods are safe for concurrent use.
type Server struct {
	dir string

	mu        sync.Mutex
	tree      map[string]*node
	gen       uint64 // bumped by every committed change
	conns     map[*conn]bool
	listeners []net.Listener
	nextTx    uint32
	intercept Interceptor
	wg        sync.WaitGroup
	closed    bool
}

// New returns a server with the skeleton xenstored starts with: "/",
// "/local" and "/local/domain", owned by dom0 and unreadable to guests.
// Sockets are created in dir (use t.TempDir()).
func New(dir string) *Server {
	s := &Server{dir: dir, tree: map[string]*node{}, conns: map[*conn]bool{}}
	dom0 := []xenstore.Perm{{Domid: 0, Access: xenstore.AccessNone}}
	for _, p := range []string{"/", "/local", "/local/domain"} {
		s.tree[p] = &node{perms: dom0}
	}
	return s
}

// Listen opens a unix socket whose connections act as domain domid and
// returns its path.
func (s *Server) Listen(domid uint32) (string, error) {
	path := filepath.Join(s.dir, "xs-dom"+strconv.FormatUint(uint64(domid), 10)+"-"+strconv.Itoa(len(s.listeners))+".sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		return "", fmt.Errorf("xenstoretest: listen: %w", err)
	}
	s.mu.Lock()
	s.listeners = append(s.listeners, l)
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			cn := &conn{domid: domid, c: c, txs: map[uint32]*txn{}}
			s.mu.Lock()
			if s.closed {
				s.mu.Unlock()
				c.Close()
				return
			}
			s.conns[cn] = true
			s.mu.Unlock()
			s.wg.Add(1)
			go s.serve(cn)
		}
	}()
	return path, nil
}

// Dial listens as domid and returns a client connected there.
func (s *Server) Dial(domid uint32) (*xenstore.Client, error) {
	path, err := s.Listen(domid)
	if err != nil {
		return nil, err
	}
	return xenstore.OpenPath(path)
}

// Close stops all listeners and connections.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for _, l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		c.c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// SetInterceptor installs (or with nil removes) an Interceptor.
func (s *Server) SetInterceptor(f Interceptor) {
	s.mu.Lock()
	s.intercept = f
	s.mu.Unlock()
}

// AddDomain creates a guest's home the way libxl does: /local/domain/<id>
// readable by the guest, with "name" and "domid" keys, and a "data"
// directory the guest owns.
func (s *Server) AddDomain(domid uint32, name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	home := "/local/domain/" + strconv.FormatUint(uint64(domid), 10)
	ro := []xenstore.Perm{{Domid: 0, Access: xenstore.AccessNone}, {Domid: domid, Access: xenstore.AccessRead}}
	s.tree[home] = &node{perms: ro}
	s.tree[home+"/name"] = &node{value: name, perms: ro}
	s.tree[home+"/domid"] = &node{value: strconv.FormatUint(uint64(domid), 10), perms: ro}
	s.tree[home+"/data"] = &node{perms: []xenstore.Perm{{Domid: domid, Access: xenstore.AccessNone}}}
	s.gen++
}

// Get returns the value at an absolute path.
func (s *Server) Get(path string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, ok := s.tree[path]
	if !ok {
		return "", false
	}
	return n.value, true
}

// Perms returns the permissions of an absolute path, nil if it is absent.
func (s *Server) Perms(path string) []xenstore.Perm {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n, ok := s.tree[path]; ok {
		return append([]xenstore.Perm(nil), n.perms...)
	}
	return nil
}

// Set writes a value as dom0 would, firing watches.
func (s *Server) Set(path, value string) {
	s.mu.Lock()
	out := s.writeNode(s.tree, 0, path, value)
	s.gen++
	events := s.fire(out)
	s.mu.Unlock()
	send(events)
}

// ReleaseDomain fires the @releaseDomain watches, as xenstored does when
// a domain shuts down (or suspends), dies or is destroyed.
func (s *Server) ReleaseDomain() {
	s.mu.Lock()
	events := s.fire([]change{{path: "@releaseDomain"}})
	s.mu.Unlock()
	send(events)
}

type outMsg struct {
	c   *conn
	raw []byte
}

func send(msgs []outMsg) {
	for _, m := range msgs {
		m.c.wmu.Lock()
		// A failed write means that client went away; its reader
		// notices and cleans up.
		_, _ = m.c.c.Write(m.raw)
		m.c.wmu.Unlock()
	}
}

func (s *Server) serve(cn *conn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, cn)
		s.mu.Unlock()
		cn.c.Close()
	}()
	for {
		h, p, err := xenstore.ReadMessage(cn.c)
		if err != nil {
			return
		}
		s.mu.Lock()
		icpt := s.intercept
		s.mu.Unlock()
		if icpt != nil {
			if raw, ok := icpt(cn.domid, h, p); ok {
				send([]outMsg{{cn, raw}})
				continue
			}
		}
		s.mu.Lock()
		rop, payload, events := s.handle(cn, h, p)
		s.mu.Unlock()
		reply := xenstore.AppendMessage(nil, xenstore.Header{Op: rop, ReqID: h.ReqID, TxID: h.TxID}, payload)
		send(append([]outMsg{{cn, reply}}, events...))
	}
}

type xsErr struct{ name string }

func (e xsErr) Error() string { return e.name }

var (
	eNOENT = xsErr{"ENOENT"}
	eACCES = xsErr{"EACCES"}
	eINVAL = xsErr{"EINVAL"}
	eAGAIN = xsErr{"EAGAIN"}
	eNOSYS = xsErr{"ENOSYS"}
	eEXIST = xsErr{"EEXIST"}
)

func okReply() []byte { return []byte("OK\x00") }

// handle runs one request with s.mu held and returns the reply type and
// payload plus the watch events it caused.
func (s *Server) handle(cn *conn, h xenstore.Header, p []byte) (xenstore.Op, []byte, []outMsg) {
	payload, changes, err := s.exec(cn, h, p)
	if err != nil {
		var xe xsErr
		if !errors.As(err, &xe) {
			xe = eINVAL
		}
		return xenstore.OpError, []byte(xe.name + "\x00"), nil
	}
	var events []outMsg
	if len(changes) > 0 {
		events = s.fire(changes)
	}
	if h.Op == xenstore.OpWatch {
		// Fires once at once, with the path as the client gave it.
		parts, _ := xenstore.SplitNul(p)
		events = append(events, outMsg{cn, watchEvent(parts[0], parts[1])})
	}
	return h.Op, payload, events
}

func watchEvent(path, token string) []byte {
	return xenstore.AppendMessage(nil, xenstore.Header{Op: xenstore.OpWatchEvent}, []byte(path+"\x00"+token+"\x00"))
}

func (s *Server) abs(cn *conn, path string) (string, error) {
	if path == "" {
		return "", eINVAL
	}
	if path[0] != '/' && path[0] != '@' {
		path = "/local/domain/" + strconv.FormatUint(uint64(cn.domid), 10) + "/" + path
	}
	if path[0] == '@' {
		return path, nil
	}
	if len(path) > xenstore.AbsPathMax || strings.Contains(path, "//") || (len(path) > 1 && strings.HasSuffix(path, "/")) {
		return "", eINVAL
	}
	for _, c := range path {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("-/_@", c)) {
			return "", eINVAL
		}
	}
	return path, nil
}

func parent(path string) string {
	i := strings.LastIndexByte(path, '/')
	if i <= 0 {
		return "/"
	}
	return path[:i]
}

// access returns the access domid has on n, following xenstored: dom0 and
// the owner have full access, then a matching entry, then the default.
func access(n *node, domid uint32) (read, write bool) {
	if domid == 0 || n.perms[0].Domid == domid {
		return true, true
	}
	a := n.perms[0].Access
	for _, p := range n.perms[1:] {
		if p.Domid == domid {
			a = p.Access
			break
		}
	}
	return a == xenstore.AccessRead || a == xenstore.AccessReadWrite, a == xenstore.AccessWrite || a == xenstore.AccessReadWrite
}

// writeNode creates path (and missing parents) or sets its value, with no
// permission check; it returns the changes for watches.
func (s *Server) writeNode(tree map[string]*node, domid uint32, path, value string) []change {
	var created []string
	for p := path; ; p = parent(p) {
		if _, ok := tree[p]; ok {
			break
		}
		created = append(created, p)
	}
	for i := len(created) - 1; i >= 0; i-- {
		par := tree[parent(created[i])]
		perms := append([]xenstore.Perm(nil), par.perms...)
		if domid != 0 {
			// Domains own what they create.
			perms[0].Domid = domid
		}
		tree[created[i]] = &node{perms: perms}
	}
	tree[path].value = value
	return []change{{path: path}}
}

// canCreate checks write access on the nearest existing ancestor.
func canCreate(tree map[string]*node, domid uint32, path string) bool {
	for p := parent(path); ; p = parent(p) {
		if n, ok := tree[p]; ok {
			_, w := access(n, domid)
			return w
		}
	}
}

func (s *Server) exec(cn *conn, h xenstore.Header, p []byte) ([]byte, []change, error) {
	tree := s.tree
	var tx *txn
	if h.TxID != 0 {
		tx = cn.txs[h.TxID]
		if tx == nil {
			return nil, nil, eNOENT
		}
		tree = tx.tree
	}
	parts, err := xenstore.SplitNul(p)
	if err != nil && h.Op != xenstore.OpWrite {
		return nil, nil, eINVAL
	}
	arg := func(i int) (string, error) {
		if i >= len(parts) {
			return "", eINVAL
		}
		return parts[i], nil
	}
	pathArg := func() (string, error) {
		a, err := arg(0)
		if err != nil {
			return "", err
		}
		return s.abs(cn, a)
	}
	record := func(ch []change) []change {
		if tx != nil {
			tx.changed = append(tx.changed, ch...)
			return nil
		}
		s.gen++
		return ch
	}

	switch h.Op {
	case xenstore.OpRead, xenstore.OpGetPerms, xenstore.OpDirectory:
		path, err := pathArg()
		if err != nil {
			return nil, nil, err
		}
		n, ok := tree[path]
		if !ok {
			return nil, nil, eNOENT
		}
		if r, _ := access(n, cn.domid); !r {
			return nil, nil, eACCES
		}
		switch h.Op {
		case xenstore.OpRead:
			return []byte(n.value), nil, nil
		case xenstore.OpGetPerms:
			var b []byte
			for _, pm := range n.perms {
				b = append(b, pm.String()+"\x00"...)
			}
			return b, nil, nil
		default:
			var names []string
			prefix := path + "/"
			if path == "/" {
				prefix = "/"
			}
			for k := range tree {
				if k != path && strings.HasPrefix(k, prefix) && !strings.Contains(k[len(prefix):], "/") {
					names = append(names, k[len(prefix):])
				}
			}
			sort.Strings(names)
			var b []byte
			for _, n := range names {
				b = append(b, n+"\x00"...)
			}
			return b, nil, nil
		}

	case xenstore.OpWrite:
		i := strings.IndexByte(string(p), 0)
		if i < 0 {
			return nil, nil, eINVAL
		}
		path, err := s.abs(cn, string(p[:i]))
		if err != nil {
			return nil, nil, err
		}
		if n, ok := tree[path]; ok {
			if _, w := access(n, cn.domid); !w {
				return nil, nil, eACCES
			}
		} else if !canCreate(tree, cn.domid, path) {
			return nil, nil, eACCES
		}
		return okReply(), record(s.writeNode(tree, cn.domid, path, string(p[i+1:]))), nil

	case xenstore.OpMkdir:
		path, err := pathArg()
		if err != nil {
			return nil, nil, err
		}
		if _, exists := tree[path]; exists {
			return okReply(), nil, nil
		}
		if !canCreate(tree, cn.domid, path) {
			return nil, nil, eACCES
		}
		return okReply(), record(s.writeNode(tree, cn.domid, path, "")), nil

	case xenstore.OpRm:
		path, err := pathArg()
		if err != nil {
			return nil, nil, err
		}
		n, exists := tree[path]
		if !exists {
			if _, pok := tree[parent(path)]; !pok {
				return nil, nil, eNOENT
			}
			return okReply(), nil, nil
		}
		if path == "/" {
			return nil, nil, eINVAL
		}
		if _, w := access(n, cn.domid); !w {
			return nil, nil, eACCES
		}
		for k := range tree {
			if k == path || strings.HasPrefix(k, path+"/") {
				delete(tree, k)
			}
		}
		return okReply(), record([]change{{path: path, removed: true}}), nil

	case xenstore.OpSetPerms:
		path, err := pathArg()
		if err != nil {
			return nil, nil, err
		}
		n, exists := tree[path]
		if !exists {
			return nil, nil, eNOENT
		}
		if cn.domid != 0 && n.perms[0].Domid != cn.domid {
			return nil, nil, eACCES
		}
		if len(parts) < 2 {
			return nil, nil, eINVAL
		}
		var perms []xenstore.Perm
		for _, s := range parts[1:] {
			pm, err := xenstore.ParsePerm(s)
			if err != nil {
				return nil, nil, eINVAL
			}
			perms = append(perms, pm)
		}
		n.perms = perms
		return okReply(), record([]change{{path: path}}), nil

	case xenstore.OpWatch, xenstore.OpUnwatch:
		path, err := pathArg()
		if err != nil {
			return nil, nil, err
		}
		token, err := arg(1)
		if err != nil {
			return nil, nil, err
		}
		rel := parts[0][0] != '/' && parts[0][0] != '@'
		if h.Op == xenstore.OpWatch {
			for _, w := range cn.watches {
				if w.wpath == path && w.token == token {
					return nil, nil, eEXIST
				}
			}
			cn.watches = append(cn.watches, watch{wpath: path, token: token, relative: rel})
			return okReply(), nil, nil
		}
		for i, w := range cn.watches {
			if w.wpath == path && w.token == token {
				cn.watches = append(cn.watches[:i], cn.watches[i+1:]...)
				return okReply(), nil, nil
			}
		}
		return nil, nil, eNOENT

	case xenstore.OpGetDomainPath:
		a, err := arg(0)
		if err != nil {
			return nil, nil, err
		}
		id, perr := strconv.ParseUint(a, 10, 16)
		if perr != nil {
			return nil, nil, eINVAL
		}
		return []byte("/local/domain/" + strconv.FormatUint(id, 10) + "\x00"), nil, nil

	case xenstore.OpTransactionStart:
		if h.TxID != 0 {
			return nil, nil, eINVAL
		}
		s.nextTx++
		copyTree := make(map[string]*node, len(s.tree))
		for k, n := range s.tree {
			nn := *n
			nn.perms = append([]xenstore.Perm(nil), n.perms...)
			copyTree[k] = &nn
		}
		cn.txs[s.nextTx] = &txn{tree: copyTree, gen: s.gen}
		return []byte(strconv.FormatUint(uint64(s.nextTx), 10) + "\x00"), nil, nil

	case xenstore.OpTransactionEnd:
		if tx == nil {
			return nil, nil, eNOENT
		}
		delete(cn.txs, h.TxID)
		a, err := arg(0)
		if err != nil {
			return nil, nil, err
		}
		switch a {
		case "F":
			return okReply(), nil, nil
		case "T":
			if tx.gen != s.gen {
				return nil, nil, eAGAIN
			}
			if len(tx.changed) == 0 {
				return okReply(), nil, nil
			}
			s.tree = tx.tree
			s.gen++
			return okReply(), tx.changed, nil
		}
		return nil, nil, eINVAL
	}
	return nil, nil, eNOSYS
}

// fire builds the watch events for changes, for every connection.
func (s *Server) fire(changes []change) []outMsg {
	var out []outMsg
	for c := range s.conns {
		for _, w := range c.watches {
			for _, ch := range changes {
				var epath string
				switch {
				case ch.path == w.wpath || strings.HasPrefix(ch.path, w.wpath+"/") || w.wpath == "/":
					epath = ch.path
				case ch.removed && strings.HasPrefix(w.wpath, ch.path+"/"):
					epath = w.wpath
				default:
					continue
				}
				if w.relative {
					epath = strings.TrimPrefix(epath, "/local/domain/"+strconv.FormatUint(uint64(c.domid), 10)+"/")
				}
				out = append(out, outMsg{c, watchEvent(epath, w.token)})
			}
		}
	}
	return out
}
