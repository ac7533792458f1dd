package wire

import (
	"fmt"
	"math/bits"
)

// Phase says why a page batch was sent; the destination counts bytes per
// phase (QEMU's precopy / downtime / postcopy split).
type Phase uint8

// Page batch phases.
const (
	PhasePrecopy Phase = 1 // an iterative pre-copy round, domain running at the source
	PhaseStop    Phase = 2 // stop-and-copy or core pages: domain paused, not yet resumed
	PhasePush    Phase = 3 // post-copy background push (pre-paging)
	PhaseFault   Phase = 4 // reply to a demand fault (urgent channel)
)

func (p Phase) String() string {
	switch p {
	case PhasePrecopy:
		return "precopy"
	case PhaseStop:
		return "stop"
	case PhasePush:
		return "push"
	case PhaseFault:
		return "fault"
	}
	return fmt.Sprintf("phase(%d)", uint8(p))
}

// ZeroFlag marks a page batch entry whose page is all zeroes: no data
// follows for it in the batch.
const ZeroFlag = uint64(1) << 63

// PFNMask is the pfn part of a batch entry. 52 bits cover every x86
// physical address (4 KiB pages, 64-bit addresses).
const PFNMask = (uint64(1) << 52) - 1

const pageBatchFixed = 16

// PageBatch is a decoded TypePageBatch record. Entries hold a pfn and
// ZeroFlag; Data holds the pages of the non-zero entries, in order.
type PageBatch struct {
	Phase    Phase
	PageSize uint32
	Entries  []uint64
	Data     []byte
}

// WritePageBatch writes a batch without copying data. data must hold
// exactly one page for every entry without ZeroFlag.
func (w *Writer) WritePageBatch(phase Phase, pageSize uint32, entries []uint64, data []byte) error {
	if err := checkPageSize(pageSize); err != nil {
		return fmt.Errorf("write page batch: %w", err)
	}
	if len(entries) == 0 || len(entries) > MaxBatchPages {
		return fmt.Errorf("write page batch: %d entries (1..%d): %w", len(entries), MaxBatchPages, ErrMalformed)
	}
	nonzero := 0
	for _, e := range entries {
		if e&^(ZeroFlag|PFNMask) != 0 {
			return fmt.Errorf("write page batch: entry %#x has reserved bits: %w", e, ErrMalformed)
		}
		if e&ZeroFlag == 0 {
			nonzero++
		}
	}
	if len(data) != nonzero*int(pageSize) {
		return fmt.Errorf("write page batch: %d data bytes for %d non-zero pages: %w", len(data), nonzero, ErrMalformed)
	}
	fixed := make([]byte, pageBatchFixed+8*len(entries))
	fixed[0] = byte(phase)
	le.PutUint32(fixed[4:], pageSize)
	le.PutUint32(fixed[8:], uint32(len(entries)))
	for i, e := range entries {
		le.PutUint64(fixed[pageBatchFixed+8*i:], e)
	}
	return w.WriteRecord(TypePageBatch, fixed, data)
}

// DecodePageBatch decodes body into b, reusing b.Entries. b.Data aliases
// body.
func DecodePageBatch(body []byte, b *PageBatch) error {
	if len(body) < pageBatchFixed {
		return fmt.Errorf("page batch: %d bytes: %w", len(body), ErrMalformed)
	}
	b.Phase = Phase(body[0])
	if b.Phase < PhasePrecopy || b.Phase > PhaseFault || body[1] != 0 || body[2] != 0 || body[3] != 0 || le.Uint32(body[12:]) != 0 {
		return fmt.Errorf("page batch: bad phase or reserved bytes: %w", ErrMalformed)
	}
	b.PageSize = le.Uint32(body[4:])
	if err := checkPageSize(b.PageSize); err != nil {
		return fmt.Errorf("page batch: %w", err)
	}
	n := le.Uint32(body[8:])
	if n == 0 || n > MaxBatchPages {
		return fmt.Errorf("page batch: %d entries (1..%d): %w", n, MaxBatchPages, ErrMalformed)
	}
	end := pageBatchFixed + 8*int(n)
	if len(body) < end {
		return fmt.Errorf("page batch: %d entries need %d bytes, have %d: %w", n, end, len(body), ErrMalformed)
	}
	b.Entries = b.Entries[:0]
	nonzero := 0
	for i := 0; i < int(n); i++ {
		e := le.Uint64(body[pageBatchFixed+8*i:])
		if e&^(ZeroFlag|PFNMask) != 0 {
			return fmt.Errorf("page batch: entry %d %#x has reserved bits: %w", i, e, ErrMalformed)
		}
		if e&ZeroFlag == 0 {
			nonzero++
		}
		b.Entries = append(b.Entries, e)
	}
	if want := end + nonzero*int(b.PageSize); len(body) != want {
		return fmt.Errorf("page batch: %d bytes, want %d for %d non-zero pages: %w", len(body), want, nonzero, ErrMalformed)
	}
	b.Data = body[end:]
	return nil
}

func checkPageSize(ps uint32) error {
	if ps < 512 || ps > MaxPageSize || bits.OnesCount32(ps) != 1 {
		return fmt.Errorf("page size %d: %w", ps, ErrMalformed)
	}
	return nil
}

// WritePFNs writes a TypeFaultRequest or TypeDiscard record. Callers split
// lists longer than MaxPFNs.
func (w *Writer) WritePFNs(t Type, pfns []uint64) error {
	if t != TypeFaultRequest && t != TypeDiscard {
		return fmt.Errorf("write pfn list: %v is not a pfn list: %w", t, ErrMalformed)
	}
	if len(pfns) == 0 || len(pfns) > MaxPFNs {
		return fmt.Errorf("write %v: %d pfns (1..%d): %w", t, len(pfns), MaxPFNs, ErrMalformed)
	}
	b := make([]byte, 8+8*len(pfns))
	le.PutUint32(b, uint32(len(pfns)))
	for i, p := range pfns {
		if p&^PFNMask != 0 {
			return fmt.Errorf("write %v: pfn %#x out of range: %w", t, p, ErrMalformed)
		}
		le.PutUint64(b[8+8*i:], p)
	}
	return w.WriteRecord(t, b)
}

// DecodePFNs decodes a pfn list record body, appending to dst[:0].
func DecodePFNs(body []byte, dst []uint64) ([]uint64, error) {
	if len(body) < 8 {
		return nil, fmt.Errorf("pfn list: %d bytes: %w", len(body), ErrMalformed)
	}
	n := le.Uint32(body)
	if n == 0 || n > MaxPFNs || le.Uint32(body[4:]) != 0 {
		return nil, fmt.Errorf("pfn list: count %d (1..%d) or reserved bytes: %w", n, MaxPFNs, ErrMalformed)
	}
	if len(body) != 8+8*int(n) {
		return nil, fmt.Errorf("pfn list: %d bytes for %d pfns: %w", len(body), n, ErrMalformed)
	}
	dst = dst[:0]
	for i := 0; i < int(n); i++ {
		p := le.Uint64(body[8+8*i:])
		if p&^PFNMask != 0 {
			return nil, fmt.Errorf("pfn list: pfn %#x out of range: %w", p, ErrMalformed)
		}
		dst = append(dst, p)
	}
	return dst, nil
}

// Mode is the migration mode announced in the domain header.
type Mode uint8

// Migration modes.
const (
	ModePrecopy  Mode = 1
	ModePostcopy Mode = 2
	ModeHybrid   Mode = 3
)

func (m Mode) String() string {
	switch m {
	case ModePrecopy:
		return "precopy"
	case ModePostcopy:
		return "postcopy"
	case ModeHybrid:
		return "hybrid"
	}
	return fmt.Sprintf("mode(%d)", uint8(m))
}

// ParseMode parses a --mode value.
func ParseMode(s string) (Mode, error) {
	for _, m := range []Mode{ModePrecopy, ModePostcopy, ModeHybrid} {
		if m.String() == s {
			return m, nil
		}
	}
	return 0, fmt.Errorf("unknown mode %q (want precopy, postcopy or hybrid)", s)
}

// DomainHeader opens the bulk stream: what is being migrated and how.
type DomainHeader struct {
	Mode     Mode
	PageSize uint32
	NumPages uint64 // pfn range [0, NumPages)
	VCPUs    uint32
	Name     string
	Backend  string // "lab", "xen-pvh", ...: the destination refuses a backend it cannot host
	Config   []byte // backend-specific configuration (e.g. the xl config file)
	// Absent are the pfns of [0, NumPages) that hold no memory when the
	// migration starts (a balloon driver gave them back): never sent, and
	// the destination holds none there. Ascending, not overlapping.
	Absent []Range
}

// Range is a run of Count consecutive pfns from First.
type Range struct {
	First, Count uint64
}

// MaxRanges bounds the absent ranges of a domain header (16 bytes each).
const MaxRanges = (MaxBlob - 4096) / 16

// RangesOf returns the runs of an ascending pfn list.
func RangesOf(pfns []uint64) []Range {
	var r []Range
	for _, p := range pfns {
		if n := len(r); n > 0 && r[n-1].First+r[n-1].Count == p {
			r[n-1].Count++
			continue
		}
		r = append(r, Range{First: p, Count: 1})
	}
	return r
}

// checkRanges holds ranges to being ascending, disjoint, non-empty and
// inside [0, n); it returns the pfns they cover.
func checkRanges(r []Range, n uint64) (uint64, error) {
	var next, total uint64
	for i, x := range r {
		if x.Count == 0 || x.First < next || x.First >= n || x.Count > n-x.First {
			return 0, fmt.Errorf("range %d (%#x+%d) is empty, out of order or beyond %d pages: %w", i, x.First, x.Count, n, ErrMalformed)
		}
		next = x.First + x.Count
		total += x.Count
	}
	return total, nil
}

// Write writes h as a TypeDomainHeader record.
func (w *Writer) WriteDomainHeader(h *DomainHeader) error {
	if err := checkPageSize(h.PageSize); err != nil {
		return fmt.Errorf("write domain header: %w", err)
	}
	if h.NumPages == 0 || h.NumPages > PFNMask {
		return fmt.Errorf("write domain header: %d pages: %w", h.NumPages, ErrMalformed)
	}
	var e enc
	e.u8(uint8(h.Mode))
	e.u32(h.PageSize)
	e.u64(h.NumPages)
	e.u32(h.VCPUs)
	e.bytes([]byte(h.Name))
	e.bytes([]byte(h.Backend))
	e.bytes(h.Config)
	if len(h.Absent) > MaxRanges {
		return fmt.Errorf("write domain header: %d absent ranges (at most %d): %w", len(h.Absent), MaxRanges, ErrTooLarge)
	}
	if _, err := checkRanges(h.Absent, h.NumPages); err != nil {
		return fmt.Errorf("write domain header: absent pages: %w", err)
	}
	e.u32(uint32(len(h.Absent)))
	for _, x := range h.Absent {
		e.u64(x.First)
		e.u64(x.Count)
	}
	return w.WriteRecord(TypeDomainHeader, e.b)
}

// DecodeDomainHeader decodes a TypeDomainHeader body.
func DecodeDomainHeader(body []byte) (*DomainHeader, error) {
	d := dec{b: body}
	h := &DomainHeader{
		Mode:     Mode(d.u8()),
		PageSize: d.u32(),
		NumPages: d.u64(),
		VCPUs:    d.u32(),
		Name:     string(d.bytes(256)),
		Backend:  string(d.bytes(64)),
		Config:   d.bytes(MaxBlob),
	}
	if n := d.u32(); d.err == nil {
		if n > MaxRanges || uint64(n)*16 > uint64(len(d.b)) {
			return nil, fmt.Errorf("domain header: %d absent ranges in %d bytes: %w", n, len(d.b), ErrMalformed)
		}
		if n > 0 {
			h.Absent = make([]Range, n)
		}
		for i := range h.Absent {
			h.Absent[i] = Range{First: d.u64(), Count: d.u64()}
		}
	}
	if err := d.finish("domain header"); err != nil {
		return nil, err
	}
	if h.Mode < ModePrecopy || h.Mode > ModeHybrid {
		return nil, fmt.Errorf("domain header: %v: %w", h.Mode, ErrMalformed)
	}
	if err := checkPageSize(h.PageSize); err != nil {
		return nil, fmt.Errorf("domain header: %w", err)
	}
	if h.NumPages == 0 || h.NumPages > PFNMask {
		return nil, fmt.Errorf("domain header: %d pages: %w", h.NumPages, ErrMalformed)
	}
	if _, err := checkRanges(h.Absent, h.NumPages); err != nil {
		return nil, fmt.Errorf("domain header: absent pages: %w", err)
	}
	return h, nil
}

// PageSet is the change of a paused domain's page set since the domain
// header: pfns that left it (Dropped: the guest gave them back, none is
// sent) and pfns that joined it (Added: absent before, sent in the pause).
type PageSet struct {
	Dropped, Added []uint64
}

// WritePageSet writes a TypePageSet record. Callers split changes of more
// than MaxPFNs pfns over several records.
func (w *Writer) WritePageSet(ps PageSet) error {
	n := len(ps.Dropped) + len(ps.Added)
	if n == 0 || n > MaxPFNs {
		return fmt.Errorf("write page set: %d pfns (1..%d): %w", n, MaxPFNs, ErrMalformed)
	}
	var e enc
	e.u32(uint32(len(ps.Dropped)))
	e.u32(uint32(len(ps.Added)))
	for _, l := range [][]uint64{ps.Dropped, ps.Added} {
		for _, p := range l {
			if p&^PFNMask != 0 {
				return fmt.Errorf("write page set: pfn %#x out of range: %w", p, ErrMalformed)
			}
			e.u64(p)
		}
	}
	return w.WriteRecord(TypePageSet, e.b)
}

// DecodePageSet decodes a TypePageSet body.
func DecodePageSet(body []byte) (PageSet, error) {
	d := dec{b: body}
	nd, na := d.u32(), d.u32()
	if d.err != nil || nd+na == 0 || uint64(nd)+uint64(na) > MaxPFNs || len(d.b) != 8*(int(nd)+int(na)) {
		return PageSet{}, fmt.Errorf("page set: %d dropped + %d added pfns in %d bytes: %w", nd, na, len(body), ErrMalformed)
	}
	var ps PageSet
	for i := uint32(0); i < nd+na; i++ {
		p := d.u64()
		if p&^PFNMask != 0 {
			return PageSet{}, fmt.Errorf("page set: pfn %#x out of range: %w", p, ErrMalformed)
		}
		if i < nd {
			ps.Dropped = append(ps.Dropped, p)
		} else {
			ps.Added = append(ps.Added, p)
		}
	}
	return ps, d.finish("page set")
}

// Switchover tells the destination that the source domain is paused and
// that the core state has been sent.
type Switchover struct {
	PausedUnixNano int64  // source clock when the domain was paused
	PagesSent      uint64 // pages sent before switchover (pre-copy rounds, stop-and-copy, core pages)
}

// WriteSwitchover writes a TypeSwitchover record.
func (w *Writer) WriteSwitchover(s Switchover) error {
	var e enc
	e.u64(uint64(s.PausedUnixNano))
	e.u64(s.PagesSent)
	return w.WriteRecord(TypeSwitchover, e.b)
}

// DecodeSwitchover decodes a TypeSwitchover body.
func DecodeSwitchover(body []byte) (Switchover, error) {
	d := dec{b: body}
	s := Switchover{PausedUnixNano: int64(d.u64()), PagesSent: d.u64()}
	return s, d.finish("switchover")
}

// Checksums carries the source's CRC-32C of every page of the paused
// domain from FirstPFN on. The destination compares them with what it
// placed, so every migration verifies its result page by page.
type Checksums struct {
	FirstPFN uint64
	CRCs     []uint32
}

// MaxChecksums bounds the CRCs in one record.
const MaxChecksums = 1 << 18

// WriteChecksums writes a TypeDone record carrying checksums; the last one
// has Final set. Callers split the CRC table into chunks of MaxChecksums.
func (w *Writer) WriteDone(c Checksums, final bool) error {
	if len(c.CRCs) > MaxChecksums {
		return fmt.Errorf("write done: %d checksums: %w", len(c.CRCs), ErrTooLarge)
	}
	var e enc
	if final {
		e.u8(1)
	} else {
		e.u8(0)
	}
	e.u64(c.FirstPFN)
	e.u32(uint32(len(c.CRCs)))
	for _, x := range c.CRCs {
		e.u32(x)
	}
	return w.WriteRecord(TypeDone, e.b)
}

// DecodeDone decodes a TypeDone body.
func DecodeDone(body []byte) (c Checksums, final bool, err error) {
	d := dec{b: body}
	f := d.u8()
	c.FirstPFN = d.u64()
	n := d.u32()
	if d.err == nil && (n > MaxChecksums || int(n)*4 > len(d.b)) {
		return c, false, fmt.Errorf("done: %d checksums in %d bytes: %w", n, len(d.b), ErrMalformed)
	}
	c.CRCs = make([]uint32, 0, n)
	for i := uint32(0); i < n && d.err == nil; i++ {
		c.CRCs = append(c.CRCs, d.u32())
	}
	if err := d.finish("done"); err != nil {
		return c, false, err
	}
	if f > 1 || c.FirstPFN > PFNMask {
		return c, false, fmt.Errorf("done: flags %d pfn %#x: %w", f, c.FirstPFN, ErrMalformed)
	}
	return c, f == 1, nil
}

// Ack is the destination's final word: it has every page, and how many of
// them differ from the source's checksums.
type Ack struct {
	PagesReceived uint64
	Mismatched    uint64
	FirstMismatch uint64 // valid when Mismatched > 0
}

// WriteAck writes a TypeAck record.
func (w *Writer) WriteAck(a Ack) error {
	var e enc
	e.u64(a.PagesReceived)
	e.u64(a.Mismatched)
	e.u64(a.FirstMismatch)
	return w.WriteRecord(TypeAck, e.b)
}

// DecodeAck decodes a TypeAck body.
func DecodeAck(body []byte) (Ack, error) {
	d := dec{b: body}
	a := Ack{PagesReceived: d.u64(), Mismatched: d.u64(), FirstMismatch: d.u64()}
	return a, d.finish("ack")
}

// WriteU64 writes a record whose body is one u64 (TypeCredit: bytes the
// destination consumed from the bulk channel).
func (w *Writer) WriteU64(t Type, v uint64) error {
	var e enc
	e.u64(v)
	return w.WriteRecord(t, e.b)
}

// DecodeU64 decodes a one-u64 body.
func DecodeU64(body []byte) (uint64, error) {
	d := dec{b: body}
	v := d.u64()
	return v, d.finish("u64 record")
}

// WriteBlob writes a record carrying one opaque blob (TypeCoreState,
// TypeStats, TypeError message, TypeResumed with an empty blob).
func (w *Writer) WriteBlob(t Type, blob []byte) error {
	var e enc
	e.bytes(blob)
	return w.WriteRecord(t, e.b)
}

// DecodeBlob decodes a blob body. The result aliases body.
func DecodeBlob(body []byte) ([]byte, error) {
	d := dec{b: body}
	v := d.bytes(MaxBlob)
	return v, d.finish("blob record")
}

// enc appends little-endian fields.
type enc struct{ b []byte }

func (e *enc) u8(v uint8)   { e.b = append(e.b, v) }
func (e *enc) u32(v uint32) { e.b = le.AppendUint32(e.b, v) }
func (e *enc) u64(v uint64) { e.b = le.AppendUint64(e.b, v) }
func (e *enc) bytes(v []byte) {
	e.u32(uint32(len(v)))
	e.b = append(e.b, v...)
}

// dec consumes little-endian fields; the first short read sticks as err.
type dec struct {
	b   []byte
	err error
}

func (d *dec) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || len(d.b) < n {
		d.err = fmt.Errorf("need %d bytes, have %d: %w", n, len(d.b), ErrMalformed)
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *dec) u8() uint8 {
	if v := d.take(1); v != nil {
		return v[0]
	}
	return 0
}

func (d *dec) u32() uint32 {
	if v := d.take(4); v != nil {
		return le.Uint32(v)
	}
	return 0
}

func (d *dec) u64() uint64 {
	if v := d.take(8); v != nil {
		return le.Uint64(v)
	}
	return 0
}

func (d *dec) bytes(max int) []byte {
	n := d.u32()
	if d.err == nil && uint64(n) > uint64(max) {
		d.err = fmt.Errorf("field of %d bytes > %d: %w", n, max, ErrTooLarge)
		return nil
	}
	return d.take(int(n))
}

func (d *dec) finish(what string) error {
	if d.err != nil {
		return fmt.Errorf("%s: %w", what, d.err)
	}
	if len(d.b) != 0 {
		return fmt.Errorf("%s: %d trailing bytes: %w", what, len(d.b), ErrMalformed)
	}
	return nil
}

// Resume opens the bulk stream of a new link after a broken one, in place
// of the stream's DOMAIN_HEADER: the migration it continues.
type Resume struct {
	Name     string
	NumPages uint64
}

// WriteResume writes a TypeResume record.
func (w *Writer) WriteResume(r Resume) error {
	if len(r.Name) > 256 || r.NumPages == 0 || r.NumPages > PFNMask {
		return fmt.Errorf("write resume: name of %d bytes, %d pages: %w", len(r.Name), r.NumPages, ErrMalformed)
	}
	var e enc
	e.u64(r.NumPages)
	e.bytes([]byte(r.Name))
	return w.WriteRecord(TypeResume, e.b)
}

// DecodeResume decodes a TypeResume body.
func DecodeResume(body []byte) (Resume, error) {
	d := dec{b: body}
	r := Resume{NumPages: d.u64()}
	r.Name = string(d.bytes(256))
	if err := d.finish("resume"); err != nil {
		return Resume{}, err
	}
	if r.NumPages == 0 || r.NumPages > PFNMask {
		return Resume{}, fmt.Errorf("resume: %d pages: %w", r.NumPages, ErrMalformed)
	}
	return r, nil
}

// ResumeAck answers a Resume: the destination's stage (the protocol's
// Stage) and, over one or more records, the pages it holds; the last
// record has Final set.
type ResumeAck struct {
	Stage uint8
	Final bool
	Held  []Range
}

// MaxResumeRanges bounds the ranges of one RESUME_ACK record.
const MaxResumeRanges = MaxPFNs

// WriteResumeAck writes a TypeResumeAck record. Callers split more than
// MaxResumeRanges ranges over several records.
func (w *Writer) WriteResumeAck(a ResumeAck) error {
	if len(a.Held) > MaxResumeRanges || a.Stage == 0 {
		return fmt.Errorf("write resume ack: stage %d, %d ranges: %w", a.Stage, len(a.Held), ErrMalformed)
	}
	var e enc
	e.u8(a.Stage)
	f := uint8(0)
	if a.Final {
		f = 1
	}
	e.u8(f)
	e.u32(uint32(len(a.Held)))
	for _, r := range a.Held {
		e.u64(r.First)
		e.u64(r.Count)
	}
	return w.WriteRecord(TypeResumeAck, e.b)
}

// DecodeResumeAck decodes a TypeResumeAck body. The ranges are checked
// against the domain (CheckHeld) by the caller, which knows its size.
func DecodeResumeAck(body []byte) (ResumeAck, error) {
	d := dec{b: body}
	a := ResumeAck{Stage: d.u8()}
	f := d.u8()
	n := d.u32()
	if d.err != nil || a.Stage == 0 || f > 1 || n > MaxResumeRanges || uint64(n)*16 != uint64(len(d.b)) {
		return ResumeAck{}, fmt.Errorf("resume ack: stage %d, final %d, %d ranges in %d bytes: %w", a.Stage, f, n, len(body), ErrMalformed)
	}
	a.Final = f == 1
	if n > 0 {
		a.Held = make([]Range, n)
	}
	for i := range a.Held {
		a.Held[i] = Range{First: d.u64(), Count: d.u64()}
	}
	return a, d.finish("resume ack")
}

// CheckHeld holds ranges to being ascending, disjoint, non-empty and
// inside a domain of n pages, after the ranges before them (which end at
// after); it returns where they end.
func CheckHeld(r []Range, after, n uint64) (uint64, error) {
	for i, x := range r {
		if x.Count == 0 || x.First < after || x.First >= n || x.Count > n-x.First {
			return 0, fmt.Errorf("held range %d (%#x+%d) is empty, out of order or beyond %d pages: %w", i, x.First, x.Count, n, ErrMalformed)
		}
		after = x.First + x.Count
	}
	return after, nil
}
