// Package wire is the xl-postcopy migration stream: a versioned header
// followed by 8-byte aligned records, each {type u32, length u32, body,
// padding, crc32c u32, zero u32}, all little-endian.
//
// The framing follows Xen's libxc stream v3 (docs/specs/libxc-migration-
// stream) so that the two read alike, but our record types live in their own
// range (0x5850xxxx, "XP") so that they can never be mistaken for libxc's
// (0x00-0x12, optional bit 31) or libxl's. Unlike libxc, every record
// carries a CRC-32C: the stream crosses a network during post-copy, when a
// corrupted page would be silently wrong in a running guest.
//
// The decoder never trusts a length field: a body larger than the reader's
// bound is refused before anything is allocated for it.
package wire

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sync/atomic"
)

// Magic opens every xl-postcopy stream.
const Magic = "XLPCSTRM"

// Version is the stream version this package writes and reads. Version 2
// added the absent pages of the domain header and TypePageSet.
const Version = 2

// Channel says which of a migration's connections a stream is.
type Channel uint32

// The two connections of a migration: control+bulk carries the domain
// header, core state, pushed pages and the end-of-migration handshake;
// urgent carries only demand-fault requests and their replies, so that a
// fault never waits behind bulk push (QEMU's postcopy-preempt idea).
const (
	ChannelBulk   Channel = 1
	ChannelUrgent Channel = 2
)

func (c Channel) String() string {
	switch c {
	case ChannelBulk:
		return "bulk"
	case ChannelUrgent:
		return "urgent"
	}
	return fmt.Sprintf("channel(%d)", uint32(c))
}

// Type is a record type.
type Type uint32

// Record types. TypeBase keeps them clear of libxc (0x00-0x12, bit 31
// optional) and libxl stream types.
const (
	TypeBase         Type = 0x58500000
	TypeDomainHeader Type = TypeBase + 0x01 // DomainHeader
	TypeCoreState    Type = TypeBase + 0x02 // CoreState: opaque vCPU/platform state
	TypePageBatch    Type = TypeBase + 0x03 // PageBatch
	TypeFaultRequest Type = TypeBase + 0x04 // PFNList: pages the destination needs now
	TypeDiscard      Type = TypeBase + 0x05 // PFNList: pages re-dirtied after being sent (hybrid)
	TypeSwitchover   Type = TypeBase + 0x06 // Switchover: source paused, destination may resume
	TypeDone         Type = TypeBase + 0x07 // Done: source has sent every page
	TypeAck          Type = TypeBase + 0x08 // Ack: destination has every page
	TypeError        Type = TypeBase + 0x09 // Error: the sender gives up
	TypeCredit       Type = TypeBase + 0x0A // Credit: destination consumed bulk bytes
	TypeStats        Type = TypeBase + 0x0B // Stats: JSON statistics blob
	TypeResumed      Type = TypeBase + 0x0C // Resumed: destination domain is running
	TypeReady        Type = TypeBase + 0x0D // Ready: destination holds the core state, may resume
	TypeGo           Type = TypeBase + 0x0E // Go: source has given the domain up; resume it
	TypeCreated      Type = TypeBase + 0x0F // Created: destination domain exists, send memory
	TypePageSet      Type = TypeBase + 0x10 // PageSet: pages that left or joined the domain (paused)
	TypeNotResumed   Type = TypeBase + 0x11 // Error: the destination got GO but never ran the domain
	TypeKeepalive    Type = TypeBase + 0x12 // empty: the sender is alive (progress timeouts)
	TypeBye          Type = TypeBase + 0x13 // empty: the source has the ACK; the migration is over for both
	TypeResume       Type = TypeBase + 0x14 // Resume: the source is back on a new link after a broken one
	TypeResumeAck    Type = TypeBase + 0x15 // ResumeAck: the destination's stage and the pages it holds
	typeLast              = TypeResumeAck
)

var typeNames = map[Type]string{
	TypeDomainHeader: "DOMAIN_HEADER", TypeCoreState: "CORE_STATE", TypePageBatch: "PAGE_BATCH",
	TypeFaultRequest: "FAULT_REQUEST", TypeDiscard: "DISCARD", TypeSwitchover: "SWITCHOVER",
	TypeDone: "DONE", TypeAck: "ACK", TypeError: "ERROR", TypeCredit: "CREDIT", TypeStats: "STATS",
	TypeResumed: "RESUMED", TypeReady: "READY", TypeGo: "GO", TypeCreated: "CREATED",
	TypePageSet: "PAGE_SET", TypeNotResumed: "NOT_RESUMED", TypeKeepalive: "KEEPALIVE",
	TypeBye: "BYE", TypeResume: "RESUME", TypeResumeAck: "RESUME_ACK",
}

func (t Type) String() string {
	if n, ok := typeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("type(%#x)", uint32(t))
}

// Known reports whether t is a record type of this stream version.
func (t Type) Known() bool { return t > TypeBase && t <= typeLast }

// Bounds. A page batch of MaxBatchPages 4 KiB pages is the largest record.
const (
	HeaderSize    = 16
	recHeaderSize = 8
	trailerSize   = 8
	MaxBatchPages = 1024
	MaxPageSize   = 64 << 10
	// MaxBody bounds every record body: a full batch of the largest pages
	// plus its pfn array and header.
	MaxBody = pageBatchFixed + MaxBatchPages*8 + MaxBatchPages*4096
	// MaxPFNs bounds a PFN list record.
	MaxPFNs = 1 << 16
	// MaxBlob bounds opaque blobs (core state, config, stats).
	MaxBlob = 8 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Errors returned by the decoder. They are wrapped with the position and
// record type; test with errors.Is.
var (
	ErrBadMagic   = errors.New("not an xl-postcopy stream (bad magic)")
	ErrVersion    = errors.New("unsupported stream version")
	ErrTooLarge   = errors.New("record larger than allowed")
	ErrChecksum   = errors.New("record checksum mismatch")
	ErrUnknown    = errors.New("unknown record type")
	ErrMalformed  = errors.New("malformed record")
	ErrBadChannel = errors.New("unexpected channel")
)

var le = binary.LittleEndian

// WriteHeader writes the stream header for channel c.
func WriteHeader(w io.Writer, c Channel) error {
	var h [HeaderSize]byte
	copy(h[:8], Magic)
	le.PutUint32(h[8:], Version)
	le.PutUint32(h[12:], uint32(c))
	if _, err := w.Write(h[:]); err != nil {
		return fmt.Errorf("write stream header: %w", err)
	}
	return nil
}

// ReadHeader reads and checks a stream header and returns its channel.
func ReadHeader(r io.Reader) (Channel, error) {
	var h [HeaderSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, fmt.Errorf("read stream header: %w", err)
	}
	if string(h[:8]) != Magic {
		return 0, fmt.Errorf("read stream header: %w", ErrBadMagic)
	}
	if v := le.Uint32(h[8:]); v != Version {
		return 0, fmt.Errorf("read stream header: version %d, want %d: %w", v, Version, ErrVersion)
	}
	c := Channel(le.Uint32(h[12:]))
	if c != ChannelBulk && c != ChannelUrgent {
		return 0, fmt.Errorf("read stream header: %v: %w", c, ErrBadChannel)
	}
	return c, nil
}

func pad8(n int) int { return (8 - n%8) % 8 }

// Writer writes records. It is not safe for concurrent use; the engine
// gives each connection one writer goroutine or a lock.
type Writer struct {
	w       *bufio.Writer
	written atomic.Uint64 // read by progress displays while writing
}

// NewWriter returns a Writer over w with a buffer sized for one full batch.
func NewWriter(w io.Writer) *Writer {
	return &Writer{w: bufio.NewWriterSize(w, 256<<10)}
}

// Reset makes w write to nw from now on (a new connection after a broken
// one), dropping what was buffered for the old one; Written goes on
// counting.
func (w *Writer) Reset(nw io.Writer) { w.w.Reset(nw) }

// Written is the number of bytes written so far (headers, padding and
// trailers included): the figure stats report as bytes on the wire.
func (w *Writer) Written() uint64 { return w.written.Load() }

// WriteRecord writes one record whose body is the concatenation of parts.
func (w *Writer) WriteRecord(t Type, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if n > MaxBody {
		return fmt.Errorf("write %v: body %d bytes: %w", t, n, ErrTooLarge)
	}
	var hdr [recHeaderSize]byte
	le.PutUint32(hdr[0:], uint32(t))
	le.PutUint32(hdr[4:], uint32(n))
	crc := crc32.Update(0, castagnoli, hdr[:])
	if _, err := w.w.Write(hdr[:]); err != nil {
		return fmt.Errorf("write %v: %w", t, err)
	}
	for _, p := range parts {
		crc = crc32.Update(crc, castagnoli, p)
		if _, err := w.w.Write(p); err != nil {
			return fmt.Errorf("write %v: %w", t, err)
		}
	}
	var tail [8 + trailerSize]byte
	pn := pad8(n)
	le.PutUint32(tail[pn:], crc)
	if _, err := w.w.Write(tail[:pn+trailerSize]); err != nil {
		return fmt.Errorf("write %v: %w", t, err)
	}
	w.written.Add(uint64(recHeaderSize + n + pn + trailerSize))
	return nil
}

// Flush sends buffered records to the underlying writer.
func (w *Writer) Flush() error {
	if err := w.w.Flush(); err != nil {
		return fmt.Errorf("flush stream: %w", err)
	}
	return nil
}

// Record is one decoded record. Body is only valid until the next call to
// Reader.Next.
type Record struct {
	Type Type
	Body []byte
}

// Reader reads records. It is not safe for concurrent use.
type Reader struct {
	r       *bufio.Reader
	buf     []byte
	maxBody int
	read    uint64
	n       uint64 // records read, for error positions
}

// NewReader returns a Reader over r that refuses bodies over MaxBody.
func NewReader(r io.Reader) *Reader {
	return &Reader{r: bufio.NewReaderSize(r, 256<<10), maxBody: MaxBody}
}

// BytesRead is the number of record bytes consumed so far.
func (r *Reader) BytesRead() uint64 { return r.read }

// Next reads the next record. io.EOF is returned only at a clean record
// boundary; a stream cut inside a record gives io.ErrUnexpectedEOF.
func (r *Reader) Next() (Record, error) {
	var hdr [recHeaderSize]byte
	if _, err := io.ReadFull(r.r, hdr[:]); err != nil {
		if err == io.EOF {
			return Record{}, io.EOF
		}
		return Record{}, fmt.Errorf("record %d header: %w", r.n, err)
	}
	t := Type(le.Uint32(hdr[0:]))
	n := le.Uint32(hdr[4:])
	if !t.Known() {
		return Record{}, fmt.Errorf("record %d: %v: %w", r.n, t, ErrUnknown)
	}
	if uint64(n) > uint64(r.maxBody) {
		return Record{}, fmt.Errorf("record %d %v: body %d > %d bytes: %w", r.n, t, n, r.maxBody, ErrTooLarge)
	}
	total := int(n) + pad8(int(n)) + trailerSize
	if cap(r.buf) < total {
		r.buf = make([]byte, total)
	}
	b := r.buf[:total]
	if _, err := io.ReadFull(r.r, b); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return Record{}, fmt.Errorf("record %d %v body: %w", r.n, t, err)
	}
	body := b[:n]
	trailer := b[total-trailerSize:]
	want := le.Uint32(trailer)
	crc := crc32.Update(crc32.Update(0, castagnoli, hdr[:]), castagnoli, body)
	if crc != want || le.Uint32(trailer[4:]) != 0 {
		return Record{}, fmt.Errorf("record %d %v: %w", r.n, t, ErrChecksum)
	}
	for _, p := range b[n : total-trailerSize] {
		if p != 0 {
			return Record{}, fmt.Errorf("record %d %v: nonzero padding: %w", r.n, t, ErrMalformed)
		}
	}
	r.n++
	r.read += uint64(recHeaderSize + total)
	return Record{Type: t, Body: body}, nil
}
