// Package xenstore is a pure-Go client for xenstored, Xen's configuration
// database, speaking the wire protocol of xen/include/public/io/xs_wire.h
// (described in docs/misc/xenstore.txt of the Xen tree).
//
// A guest talks to xenstored through the kernel's /dev/xen/xenbus device;
// dom0 tools connect to xenstored's unix socket. Both carry the same byte
// stream: a 16-byte little-endian header {type, req_id, tx_id, len} followed
// by at most 4096 bytes of payload. Replies are matched to requests by
// req_id, so one Client serves many goroutines at once; watch events arrive
// unsolicited and are delivered on per-watch channels.
package xenstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Op is the type field of a xenstore message (enum xsd_sockmsg_type).
type Op uint32

// Message types. The numbering is fixed by the wire protocol; 20 was the
// long-removed XS_RESTRICT and is skipped.
const (
	OpControl            Op = 0
	OpDirectory          Op = 1
	OpRead               Op = 2
	OpGetPerms           Op = 3
	OpWatch              Op = 4
	OpUnwatch            Op = 5
	OpTransactionStart   Op = 6
	OpTransactionEnd     Op = 7
	OpIntroduce          Op = 8
	OpRelease            Op = 9
	OpGetDomainPath      Op = 10
	OpWrite              Op = 11
	OpMkdir              Op = 12
	OpRm                 Op = 13
	OpSetPerms           Op = 14
	OpWatchEvent         Op = 15
	OpError              Op = 16
	OpIsDomainIntroduced Op = 17
	OpResume             Op = 18
	OpSetTarget          Op = 19
	OpResetWatches       Op = 21
	OpDirectoryPart      Op = 22
)

var opNames = map[Op]string{
	OpControl: "CONTROL", OpDirectory: "DIRECTORY", OpRead: "READ", OpGetPerms: "GET_PERMS",
	OpWatch: "WATCH", OpUnwatch: "UNWATCH", OpTransactionStart: "TRANSACTION_START",
	OpTransactionEnd: "TRANSACTION_END", OpIntroduce: "INTRODUCE", OpRelease: "RELEASE",
	OpGetDomainPath: "GET_DOMAIN_PATH", OpWrite: "WRITE", OpMkdir: "MKDIR", OpRm: "RM",
	OpSetPerms: "SET_PERMS", OpWatchEvent: "WATCH_EVENT", OpError: "ERROR",
	OpIsDomainIntroduced: "IS_DOMAIN_INTRODUCED", OpResume: "RESUME", OpSetTarget: "SET_TARGET",
	OpResetWatches: "RESET_WATCHES", OpDirectoryPart: "DIRECTORY_PART",
}

// String returns the protocol name of the operation, e.g. "READ".
func (o Op) String() string {
	if n, ok := opNames[o]; ok {
		return n
	}
	return fmt.Sprintf("OP(%d)", uint32(o))
}

const (
	// HeaderSize is the size of struct xsd_sockmsg.
	HeaderSize = 16
	// PayloadMax is XENSTORE_PAYLOAD_MAX. xenstored kills a connection
	// that sends more, which a guest cannot recover from, so the client
	// refuses to build such a request rather than letting it reach the wire.
	PayloadMax = 4096
	// AbsPathMax is XENSTORE_ABS_PATH_MAX: the longest absolute path.
	AbsPathMax = 3072
	// RelPathMax is XENSTORE_REL_PATH_MAX: the longest relative path.
	RelPathMax = 2048
)

// Header is the fixed part of every message.
type Header struct {
	Op    Op
	ReqID uint32
	TxID  uint32
	Len   uint32
}

// ErrProtocol marks a message that does not follow the wire protocol: an
// oversized length, a reply of the wrong type or a payload that cannot be
// parsed. Test with errors.Is.
var ErrProtocol = errors.New("xenstore protocol error")

// ReadMessage reads one whole message. A length above PayloadMax is a
// protocol error; the stream cannot be trusted after it.
func ReadMessage(r io.Reader) (Header, []byte, error) {
	var b [HeaderSize]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return Header{}, nil, err
	}
	h := Header{
		Op:    Op(binary.LittleEndian.Uint32(b[0:])),
		ReqID: binary.LittleEndian.Uint32(b[4:]),
		TxID:  binary.LittleEndian.Uint32(b[8:]),
		Len:   binary.LittleEndian.Uint32(b[12:]),
	}
	if h.Len > PayloadMax {
		return h, nil, fmt.Errorf("%w: %s message announces %d payload bytes, limit is %d", ErrProtocol, h.Op, h.Len, PayloadMax)
	}
	p := make([]byte, h.Len)
	if _, err := io.ReadFull(r, p); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return h, nil, fmt.Errorf("reading %d-byte %s payload: %w", h.Len, h.Op, err)
	}
	return h, p, nil
}

// AppendMessage appends the encoding of a message (header with Len set
// from payload, then payload) to dst.
func AppendMessage(dst []byte, h Header, payload []byte) []byte {
	dst = binary.LittleEndian.AppendUint32(dst, uint32(h.Op))
	dst = binary.LittleEndian.AppendUint32(dst, h.ReqID)
	dst = binary.LittleEndian.AppendUint32(dst, h.TxID)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(payload)))
	return append(dst, payload...)
}

// WriteMessage writes one message with a single Write call: the Linux
// xenbus device accepts partial writes, but a single call keeps messages
// from different goroutines from interleaving even without a lock around
// the writer.
func WriteMessage(w io.Writer, h Header, payload []byte) error {
	if len(payload) > PayloadMax {
		return fmt.Errorf("%w: %s payload of %d bytes exceeds the %d-byte limit", ErrProtocol, h.Op, len(payload), PayloadMax)
	}
	_, err := w.Write(AppendMessage(make([]byte, 0, HeaderSize+len(payload)), h, payload))
	return err
}

// joinNul builds a payload of strings each followed by a NUL byte.
func joinNul(parts ...string) []byte {
	n := 0
	for _, p := range parts {
		n += len(p) + 1
	}
	b := make([]byte, 0, n)
	for _, p := range parts {
		b = append(b, p...)
		b = append(b, 0)
	}
	return b
}

// SplitNul splits a payload of NUL-terminated strings ("a\0b\0"). An empty
// payload is an empty list; a payload whose last string lacks its NUL is a
// protocol error, because it means the message was cut short.
func SplitNul(p []byte) ([]string, error) {
	if len(p) == 0 {
		return nil, nil
	}
	if p[len(p)-1] != 0 {
		return nil, fmt.Errorf("%w: string list %q is not NUL-terminated", ErrProtocol, truncate(p))
	}
	var out []string
	start := 0
	for i, c := range p {
		if c == 0 {
			out = append(out, string(p[start:i]))
			start = i + 1
		}
	}
	return out, nil
}

func truncate(p []byte) string {
	if len(p) > 64 {
		return string(p[:64]) + "..."
	}
	return string(p)
}
