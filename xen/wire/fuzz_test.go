package wire

import (
	"bufio"
	"bytes"
	"io"
	"reflect"
	"runtime/metrics"
	"testing"
)

// The fuzz targets here reach the record decoders directly (one target per
// decoder, fed the body) and behind a valid CRC (FuzzRecord frames the
// fuzzed body with the package's own Writer), where FuzzDecode's mutated
// streams rarely get past the checksum. Each target checks what the
// decoder accepts, not only that it does not panic: an accepted body
// re-encodes to the same bytes, counts and ranges are within their bounds,
// and a decoder allocates no more than a small multiple of its input.
//
// The targets keep one Writer and one reader buffer across executions:
// NewWriter and NewReader each allocate 256 KiB, which would cost more than
// the decoding itself.

// seedRecords are real records as the Writer frames them, of every kind
// the decoders read, with small pages so that the seeds stay short.
func seedRecords(tb testing.TB) []Record {
	tb.Helper()
	var buf bytes.Buffer
	w := NewWriter(&buf)
	must := func(err error) {
		tb.Helper()
		if err != nil {
			tb.Fatal(err)
		}
	}
	must(w.WriteDomainHeader(&DomainHeader{Mode: ModePostcopy, PageSize: 4096, NumPages: 64, VCPUs: 2, Name: "vm1",
		Backend: "xen", Config: []byte(`{"name":"vm1"}`), Absent: []Range{{First: 3, Count: 2}, {First: 9, Count: 1}, {First: 63, Count: 1}}}))
	must(w.WriteDomainHeader(&DomainHeader{Mode: ModeHybrid, PageSize: 512, NumPages: 1, Backend: "lab"}))
	must(w.WriteBlob(TypeCoreState, []byte(`{"tsc":{},"hvm":"AQ=="}`)))
	must(w.WritePageBatch(PhasePush, 512, []uint64{1, 2 | ZeroFlag, 1 << 40}, append(bytes.Repeat([]byte{7}, 512), bytes.Repeat([]byte{9}, 512)...)))
	must(w.WritePageBatch(PhaseFault, 4096, []uint64{5 | ZeroFlag}, nil))
	must(w.WritePFNs(TypeFaultRequest, []uint64{3, 4}))
	must(w.WritePFNs(TypeDiscard, []uint64{PFNMask}))
	must(w.WritePageSet(PageSet{Dropped: []uint64{7, 8}, Added: []uint64{4}}))
	must(w.WritePageSet(PageSet{Added: []uint64{1}}))
	must(w.WriteSwitchover(Switchover{PausedUnixNano: 42, PagesSent: 7}))
	must(w.WriteDone(Checksums{FirstPFN: 10, CRCs: []uint32{1, 2}}, false))
	must(w.WriteDone(Checksums{FirstPFN: PFNMask}, true))
	must(w.WriteAck(Ack{PagesReceived: 9, Mismatched: 1, FirstMismatch: 3}))
	must(w.WriteU64(TypeCredit, 1234))
	must(w.WriteBlob(TypeStats, []byte("{}")))
	must(w.WriteBlob(TypeError, []byte("no")))
	must(w.WriteBlob(TypeResumed, nil))
	must(w.WriteRecord(TypeKeepalive))
	must(w.WriteRecord(TypeBye))
	must(w.WriteResume(Resume{Name: "vm1", NumPages: 64}))
	must(w.WriteResumeAck(ResumeAck{Stage: 2, Held: []Range{{First: 0, Count: 3}, {First: 5, Count: 59}}}))
	must(w.WriteResumeAck(ResumeAck{Stage: 1, Final: true}))
	must(w.Flush())
	r := NewReader(&buf)
	var recs []Record
	for {
		rec, err := r.Next()
		if err == io.EOF {
			return recs
		}
		must(err)
		recs = append(recs, Record{Type: rec.Type, Body: bytes.Clone(rec.Body)})
	}
}

// addSeeds adds the bodies of the seed records of the given types.
func addSeeds(f *testing.F, types ...Type) {
	for _, rec := range seedRecords(f) {
		for _, t := range types {
			if rec.Type == t {
				f.Add(rec.Body)
			}
		}
	}
	f.Add([]byte{})
}

// framer writes records with one Writer and reads them back with one
// reader buffer, for the whole of a fuzz target.
type framer struct {
	buf bytes.Buffer
	w   *Writer
	br  *bufio.Reader
}

func newFramer() *framer {
	f := &framer{br: bufio.NewReaderSize(nil, 256<<10)}
	f.w = NewWriter(&f.buf)
	return f
}

// frame calls write on the Writer and returns the one record it wrote, as
// a Reader (NewReader's, with the shared buffer) reads it back.
func (fr *framer) frame(t *testing.T, write func(w *Writer) error) (Record, error) {
	t.Helper()
	fr.buf.Reset()
	if err := write(fr.w); err != nil {
		return Record{}, err
	}
	if err := fr.w.Flush(); err != nil {
		t.Fatal(err)
	}
	fr.br.Reset(&fr.buf)
	r := &Reader{r: fr.br, maxBody: MaxBody}
	rec, err := r.Next()
	if err != nil {
		t.Fatalf("reading back a record the Writer framed: %v", err)
	}
	if _, err := r.Next(); err != io.EOF {
		t.Fatalf("the Writer framed more than one record: %v", err)
	}
	return rec, nil
}

// reencode writes a record with write and fails unless its body is body.
func (fr *framer) reencode(t *testing.T, what string, body []byte, write func(w *Writer) error) {
	t.Helper()
	rec, err := fr.frame(t, write)
	if err != nil {
		t.Fatalf("%s: an accepted body does not re-encode: %v", what, err)
	}
	if !bytes.Equal(rec.Body, body) {
		t.Fatalf("%s: re-encoded as\n%x\nfrom\n%x", what, rec.Body, body)
	}
}

var allocSample = []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}

func heapAllocated() uint64 {
	metrics.Read(allocSample)
	return allocSample[0].Value.Uint64()
}

// allocSlack covers what the allocator accounts beyond the decoder's own
// objects: the error message, and the runtime counts a small-object span
// as allocated whole when it takes one (up to 80 KiB).
const allocSlack = 64 << 10

// bounded runs decode and fails if it allocated more than per bytes for
// each byte of body, besides allocSlack: a length field must never make a
// decoder allocate what the body does not hold. The count is the runtime's
// (per span for small objects), so decode runs up to three times and one
// run within the bound is enough; an allocation a length field asks for
// happens every time.
func bounded(t *testing.T, what string, body []byte, per int, decode func()) {
	t.Helper()
	limit := uint64(allocSlack + per*len(body))
	var n uint64
	for try := 0; try < 3; try++ {
		before := heapAllocated()
		decode()
		if n = heapAllocated() - before; n <= limit {
			return
		}
	}
	t.Fatalf("%s: allocated %d bytes for a %d-byte body (at most %d)", what, n, len(body), limit)
}

// The checks, one per decoder: each decodes body and checks what it
// accepted. FuzzRecord runs them behind the reader.

func checkDomainHeader(t *testing.T, fr *framer, body []byte) {
	var h *DomainHeader
	var err error
	// Name and Backend are copied; Absent takes 16 bytes per 16 of body.
	bounded(t, "domain header", body, 3, func() { h, err = DecodeDomainHeader(body) })
	if err != nil {
		return
	}
	if h.Mode < ModePrecopy || h.Mode > ModeHybrid || checkPageSize(h.PageSize) != nil || h.NumPages == 0 || h.NumPages > PFNMask ||
		len(h.Name) > 256 || len(h.Backend) > 64 || len(h.Config) > MaxBlob || cap(h.Absent)*16 > len(body) {
		t.Fatalf("domain header: accepted %+v", h)
	}
	var next uint64
	for i, r := range h.Absent {
		if r.Count == 0 || r.First < next || r.First >= h.NumPages || r.First+r.Count > h.NumPages || r.First+r.Count < r.First {
			t.Fatalf("domain header: accepted absent range %d %+v of %d pages", i, r, h.NumPages)
		}
		next = r.First + r.Count
	}
	fr.reencode(t, "domain header", body, func(w *Writer) error { return w.WriteDomainHeader(h) })
	again, err := DecodeDomainHeader(body)
	if err != nil || !reflect.DeepEqual(again, h) {
		t.Fatalf("domain header: decodes as %+v then %+v (%v)", h, again, err)
	}
}

func checkPageBatch(t *testing.T, fr *framer, body []byte) {
	// A batch decoded over a reused one must not keep its old entries.
	pb := PageBatch{Entries: []uint64{1, 2, 3, 4, 5, 6, 7, 8}}
	var err error
	bounded(t, "page batch", body, 2, func() { err = DecodePageBatch(body, &pb) })
	if err != nil {
		return
	}
	if pb.Phase < PhasePrecopy || pb.Phase > PhaseFault || checkPageSize(pb.PageSize) != nil ||
		len(pb.Entries) == 0 || len(pb.Entries) > MaxBatchPages {
		t.Fatalf("page batch: accepted phase %d page size %d, %d entries", pb.Phase, pb.PageSize, len(pb.Entries))
	}
	nonzero := 0
	for _, e := range pb.Entries {
		if e&^(ZeroFlag|PFNMask) != 0 {
			t.Fatalf("page batch: accepted entry %#x", e)
		}
		if e&ZeroFlag == 0 {
			nonzero++
		}
	}
	if len(pb.Data) != nonzero*int(pb.PageSize) {
		t.Fatalf("page batch: accepted %d data bytes for %d non-zero %d-byte pages", len(pb.Data), nonzero, pb.PageSize)
	}
	if end := pageBatchFixed + 8*len(pb.Entries); len(body) != end+len(pb.Data) || (len(pb.Data) > 0 && &pb.Data[0] != &body[end]) {
		t.Fatalf("page batch: data is not the %d bytes after the entries of a %d-byte body", len(pb.Data), len(body))
	}
	if len(body) <= MaxBody { // a batch of 64 KiB pages can exceed what one record carries
		fr.reencode(t, "page batch", body, func(w *Writer) error {
			return w.WritePageBatch(pb.Phase, pb.PageSize, pb.Entries, pb.Data)
		})
	}
}

func checkPFNs(t *testing.T, fr *framer, body []byte) {
	// The engine decodes every list into the buffer of the one before.
	dst := []uint64{9, 9, 9}
	var pfns []uint64
	var err error
	bounded(t, "pfn list", body, 4, func() { pfns, err = DecodePFNs(body, dst) })
	if err != nil {
		return
	}
	if len(pfns) == 0 || len(pfns) > MaxPFNs || len(body) != 8+8*len(pfns) {
		t.Fatalf("pfn list: accepted %d pfns in %d bytes", len(pfns), len(body))
	}
	for _, p := range pfns {
		if p > PFNMask {
			t.Fatalf("pfn list: accepted pfn %#x", p)
		}
	}
	fr.reencode(t, "pfn list", body, func(w *Writer) error { return w.WritePFNs(TypeDiscard, pfns) })
}

func checkDone(t *testing.T, fr *framer, body []byte) {
	var c Checksums
	var final bool
	var err error
	bounded(t, "done", body, 2, func() { c, final, err = DecodeDone(body) })
	if cap(c.CRCs)*4 > len(body) {
		t.Fatalf("done: %d checksums allocated for a %d-byte body", cap(c.CRCs), len(body))
	}
	if err != nil {
		return
	}
	if len(c.CRCs) > MaxChecksums || c.FirstPFN > PFNMask || len(body) != 13+4*len(c.CRCs) {
		t.Fatalf("done: accepted %d checksums from %#x in %d bytes", len(c.CRCs), c.FirstPFN, len(body))
	}
	fr.reencode(t, "done", body, func(w *Writer) error { return w.WriteDone(c, final) })
}

func checkPageSet(t *testing.T, fr *framer, body []byte) {
	var ps PageSet
	var err error
	bounded(t, "page set", body, 4, func() { ps, err = DecodePageSet(body) })
	if err != nil {
		return
	}
	n := len(ps.Dropped) + len(ps.Added)
	if n == 0 || n > MaxPFNs || len(body) != 8+8*n {
		t.Fatalf("page set: accepted %d+%d pfns in %d bytes", len(ps.Dropped), len(ps.Added), len(body))
	}
	for _, l := range [][]uint64{ps.Dropped, ps.Added} {
		for _, p := range l {
			if p > PFNMask {
				t.Fatalf("page set: accepted pfn %#x", p)
			}
		}
	}
	fr.reencode(t, "page set", body, func(w *Writer) error { return w.WritePageSet(ps) })
}

func checkSwitchover(t *testing.T, fr *framer, body []byte) {
	s, err := DecodeSwitchover(body)
	if err != nil {
		return
	}
	fr.reencode(t, "switchover", body, func(w *Writer) error { return w.WriteSwitchover(s) })
}

func checkAck(t *testing.T, fr *framer, body []byte) {
	a, err := DecodeAck(body)
	if err != nil {
		return
	}
	fr.reencode(t, "ack", body, func(w *Writer) error { return w.WriteAck(a) })
}

func checkU64(t *testing.T, fr *framer, body []byte) {
	v, err := DecodeU64(body)
	if err != nil {
		return
	}
	fr.reencode(t, "u64 record", body, func(w *Writer) error { return w.WriteU64(TypeCredit, v) })
}

func checkBlob(t *testing.T, fr *framer, body []byte) {
	var blob []byte
	var err error
	bounded(t, "blob", body, 0, func() { blob, err = DecodeBlob(body) })
	if err != nil {
		return
	}
	if len(blob) > MaxBlob || len(body) != 4+len(blob) || (len(blob) > 0 && &blob[0] != &body[4]) {
		t.Fatalf("blob: accepted %d bytes that are not the rest of a %d-byte body", len(blob), len(body))
	}
	fr.reencode(t, "blob", body, func(w *Writer) error { return w.WriteBlob(TypeStats, blob) })
}

func checkResume(t *testing.T, fr *framer, body []byte) {
	r, err := DecodeResume(body)
	if err != nil {
		return
	}
	if r.NumPages == 0 || r.NumPages > PFNMask || len(r.Name) > 256 {
		t.Fatalf("resume: accepted %d pages, a name of %d bytes", r.NumPages, len(r.Name))
	}
	fr.reencode(t, "resume", body, func(w *Writer) error { return w.WriteResume(r) })
}

func checkResumeAck(t *testing.T, fr *framer, body []byte) {
	var a ResumeAck
	var err error
	bounded(t, "resume ack", body, 2, func() { a, err = DecodeResumeAck(body) })
	if err != nil {
		return
	}
	if a.Stage == 0 || len(a.Held) > MaxResumeRanges || len(body) != 6+16*len(a.Held) {
		t.Fatalf("resume ack: accepted stage %d, %d ranges in %d bytes", a.Stage, len(a.Held), len(body))
	}
	if end, err := CheckHeld(a.Held, 0, PFNMask); err == nil && end > PFNMask {
		t.Fatalf("resume ack: held ranges end at %#x, beyond the pfn space", end)
	}
	fr.reencode(t, "resume ack", body, func(w *Writer) error { return w.WriteResumeAck(a) })
}

// checkBody runs the decoder the engine runs on a record of type t.
func checkBody(tt *testing.T, fr *framer, t Type, body []byte) {
	switch t {
	case TypeDomainHeader:
		checkDomainHeader(tt, fr, body)
	case TypePageBatch:
		checkPageBatch(tt, fr, body)
	case TypeFaultRequest, TypeDiscard:
		checkPFNs(tt, fr, body)
	case TypeDone:
		checkDone(tt, fr, body)
	case TypePageSet:
		checkPageSet(tt, fr, body)
	case TypeSwitchover:
		checkSwitchover(tt, fr, body)
	case TypeAck:
		checkAck(tt, fr, body)
	case TypeCredit:
		checkU64(tt, fr, body)
	case TypeResume:
		checkResume(tt, fr, body)
	case TypeResumeAck:
		checkResumeAck(tt, fr, body)
	case TypeCoreState, TypeStats, TypeError, TypeNotResumed, TypeResumed:
		checkBlob(tt, fr, body)
	}
	// READY, GO, CREATED, KEEPALIVE and BYE carry nothing the engine decodes.
}

func fuzzBody(f *testing.F, check func(*testing.T, *framer, []byte), types ...Type) {
	addSeeds(f, types...)
	fr := newFramer()
	f.Fuzz(func(t *testing.T, body []byte) { check(t, fr, body) })
}

func FuzzDomainHeader(f *testing.F) {
	f.Add(make([]byte, 37)) // every field present, zero
	fuzzBody(f, checkDomainHeader, TypeDomainHeader)
}

func FuzzPageBatch(f *testing.F) { fuzzBody(f, checkPageBatch, TypePageBatch) }

func FuzzPFNs(f *testing.F) { fuzzBody(f, checkPFNs, TypeFaultRequest, TypeDiscard) }

func FuzzDone(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}) // 4 Gi checksums claimed
	fuzzBody(f, checkDone, TypeDone)
}

func FuzzPageSet(f *testing.F) { fuzzBody(f, checkPageSet, TypePageSet) }

func FuzzSwitchover(f *testing.F) { fuzzBody(f, checkSwitchover, TypeSwitchover) }

func FuzzAck(f *testing.F) { fuzzBody(f, checkAck, TypeAck) }

func FuzzU64(f *testing.F) { fuzzBody(f, checkU64, TypeCredit) }

func FuzzResume(f *testing.F) { fuzzBody(f, checkResume, TypeResume) }

func FuzzResumeAck(f *testing.F) {
	f.Add([]byte{2, 1, 0xff, 0xff, 0xff, 0xff}) // 4 Gi ranges claimed
	fuzzBody(f, checkResumeAck, TypeResumeAck)
}

func FuzzBlob(f *testing.F) {
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	fuzzBody(f, checkBlob, TypeCoreState, TypeStats, TypeError, TypeResumed)
}

// FuzzRecord frames a fuzzed body as a record of a known type with a valid
// CRC, reads it back through a Reader and runs the type's decoder on it:
// the decoders see every mutation, which FuzzDecode's checksum stops.
func FuzzRecord(f *testing.F) {
	for _, rec := range seedRecords(f) {
		f.Add(uint8(rec.Type-TypeBase-1), rec.Body)
	}
	fr := newFramer()
	f.Fuzz(func(t *testing.T, typ uint8, body []byte) {
		if len(body) > MaxBody {
			return
		}
		rt := TypeBase + 1 + Type(typ)%Type(typeLast-TypeBase)
		rec, err := fr.frame(t, func(w *Writer) error { return w.WriteRecord(rt, body) })
		if err != nil {
			t.Fatalf("framing a %d-byte %v: %v", len(body), rt, err)
		}
		if rec.Type != rt || !bytes.Equal(rec.Body, body) {
			t.Fatalf("framed %v of %d bytes, read %v of %d", rt, len(body), rec.Type, len(rec.Body))
		}
		if n := fr.w.Written(); n%8 != 0 {
			t.Fatalf("the Writer has written %d bytes, not 8-byte aligned", n)
		}
		checkBody(t, fr, rec.Type, bytes.Clone(rec.Body))
	})
}
