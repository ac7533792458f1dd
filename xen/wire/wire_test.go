package wire

import (
	"bytes"
	"encoding/binary"
	"io"
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"
)

func page(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	require.NoError(t, WriteHeader(&buf, ChannelBulk))
	w := NewWriter(&buf)
	hdr := &DomainHeader{Mode: ModeHybrid, PageSize: 4096, NumPages: 65536, VCPUs: 2, Name: "dom", Backend: "lab", Config: []byte("cfg")}
	require.NoError(t, w.WriteDomainHeader(hdr))
	require.NoError(t, w.WriteBlob(TypeCoreState, []byte{1, 2, 3}))
	data := append(page(7), page(9)...)
	entries := []uint64{5, 6 | ZeroFlag, 1 << 40}
	require.NoError(t, w.WritePageBatch(PhasePush, 4096, entries, data))
	require.NoError(t, w.WritePFNs(TypeFaultRequest, []uint64{3, 4}))
	require.NoError(t, w.WriteSwitchover(Switchover{PausedUnixNano: 42, PagesSent: 7}))
	require.NoError(t, w.WriteDone(Checksums{FirstPFN: 10, CRCs: []uint32{1, 2}}, true))
	require.NoError(t, w.WriteAck(Ack{PagesReceived: 9, Mismatched: 1, FirstMismatch: 3}))
	require.NoError(t, w.WriteU64(TypeCredit, 1234))
	require.NoError(t, w.Flush())
	require.Zero(t, w.Written()%8)
	require.Equal(t, uint64(buf.Len()-HeaderSize), w.Written())

	ch, err := ReadHeader(&buf)
	require.NoError(t, err)
	require.Equal(t, ChannelBulk, ch)
	r := NewReader(&buf)
	next := func(want Type) []byte {
		rec, err := r.Next()
		require.NoError(t, err)
		require.Equal(t, want, rec.Type)
		return rec.Body
	}
	got, err := DecodeDomainHeader(next(TypeDomainHeader))
	require.NoError(t, err)
	require.Equal(t, hdr, got)
	blob, err := DecodeBlob(next(TypeCoreState))
	require.NoError(t, err)
	require.Equal(t, []byte{1, 2, 3}, blob)
	var pb PageBatch
	require.NoError(t, DecodePageBatch(next(TypePageBatch), &pb))
	require.Equal(t, entries, pb.Entries)
	require.Equal(t, data, pb.Data)
	require.Equal(t, PhasePush, pb.Phase)
	pfns, err := DecodePFNs(next(TypeFaultRequest), nil)
	require.NoError(t, err)
	require.Equal(t, []uint64{3, 4}, pfns)
	sw, err := DecodeSwitchover(next(TypeSwitchover))
	require.NoError(t, err)
	require.Equal(t, Switchover{42, 7}, sw)
	c, final, err := DecodeDone(next(TypeDone))
	require.NoError(t, err)
	require.True(t, final)
	require.Equal(t, Checksums{FirstPFN: 10, CRCs: []uint32{1, 2}}, c)
	a, err := DecodeAck(next(TypeAck))
	require.NoError(t, err)
	require.Equal(t, Ack{9, 1, 3}, a)
	v, err := DecodeU64(next(TypeCredit))
	require.NoError(t, err)
	require.Equal(t, uint64(1234), v)
	_, err = r.Next()
	require.Equal(t, io.EOF, err)
}

func encoded(t *testing.T) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	require.NoError(t, w.WritePageBatch(PhaseFault, 4096, []uint64{1}, page(3)))
	require.NoError(t, w.Flush())
	return buf.Bytes()
}

func TestCorruptionDetected(t *testing.T) {
	b := encoded(t)
	for _, off := range []int{0, 4, 9, 100, len(b) - 8} {
		c := bytes.Clone(b)
		c[off] ^= 0x40
		_, err := NewReader(bytes.NewReader(c)).Next()
		require.Error(t, err, "flip at %d", off)
	}
	c := bytes.Clone(b)
	c[200] ^= 1
	_, err := NewReader(bytes.NewReader(c)).Next()
	require.ErrorIs(t, err, ErrChecksum)
}

func TestTruncated(t *testing.T) {
	b := encoded(t)
	for n := 1; n < len(b); n += 97 {
		_, err := NewReader(bytes.NewReader(b[:n])).Next()
		require.ErrorIs(t, err, io.ErrUnexpectedEOF, "cut at %d", n)
	}
}

func TestOversizedLengthRefusedBeforeAllocation(t *testing.T) {
	var hdr [8]byte
	binary.LittleEndian.PutUint32(hdr[0:], uint32(TypePageBatch))
	binary.LittleEndian.PutUint32(hdr[4:], 0xFFFFFFF0)
	r := NewReader(bytes.NewReader(hdr[:]))
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := r.Next()
	runtime.ReadMemStats(&after)
	require.ErrorIs(t, err, ErrTooLarge)
	// The claimed 4 GiB body must not have been allocated (the error
	// message itself costs a few hundred bytes).
	require.Less(t, after.TotalAlloc-before.TotalAlloc, uint64(64<<10))
}

func TestUnknownTypeAndLibxcTypesRefused(t *testing.T) {
	for _, typ := range []uint32{0, 0x01, 0x12, 0x80000001, uint32(TypeBase), uint32(typeLast) + 1} {
		var buf bytes.Buffer
		w := NewWriter(&buf)
		require.NoError(t, w.WriteRecord(Type(typ)))
		require.NoError(t, w.Flush())
		_, err := NewReader(&buf).Next()
		require.ErrorIs(t, err, ErrUnknown, "type %#x", typ)
	}
}

func TestHeaderErrors(t *testing.T) {
	_, err := ReadHeader(bytes.NewReader([]byte("XLPCSTRX\x01\x00\x00\x00\x01\x00\x00\x00")))
	require.ErrorIs(t, err, ErrBadMagic)
	_, err = ReadHeader(bytes.NewReader([]byte("XLPCSTRM\x01\x00\x00\x00\x01\x00\x00\x00")))
	require.ErrorIs(t, err, ErrVersion, "version 1 streams lack the absent pages")
	_, err = ReadHeader(bytes.NewReader([]byte("XLPCSTRM\x02\x00\x00\x00\x07\x00\x00\x00")))
	require.ErrorIs(t, err, ErrBadChannel)
	_, err = ReadHeader(bytes.NewReader([]byte("XLPC")))
	require.Error(t, err)
}

func TestPageBatchValidation(t *testing.T) {
	w := NewWriter(io.Discard)
	require.ErrorIs(t, w.WritePageBatch(PhasePush, 4096, []uint64{1, 2}, page(1)), ErrMalformed)
	require.ErrorIs(t, w.WritePageBatch(PhasePush, 4000, []uint64{1}, make([]byte, 4000)), ErrMalformed)
	require.ErrorIs(t, w.WritePageBatch(PhasePush, 4096, nil, nil), ErrMalformed)
	require.ErrorIs(t, w.WritePageBatch(PhasePush, 4096, []uint64{1 << 60}, page(1)), ErrMalformed)
	var pb PageBatch
	// Body claims 2 entries, carries data for 1 non-zero page.
	body := make([]byte, pageBatchFixed+16+4096)
	body[0] = byte(PhasePush)
	binary.LittleEndian.PutUint32(body[4:], 4096)
	binary.LittleEndian.PutUint32(body[8:], 2)
	require.ErrorIs(t, DecodePageBatch(body, &pb), ErrMalformed)
	binary.LittleEndian.PutUint64(body[pageBatchFixed+8:], 1|ZeroFlag)
	require.NoError(t, DecodePageBatch(body, &pb))
	require.Len(t, pb.Data, 4096)
}

// FuzzDecode feeds arbitrary bytes through the reader and every typed
// decoder: any input must give records or errors, never a panic or an
// allocation beyond the bounds.
func FuzzDecode(f *testing.F) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	_ = w.WriteDomainHeader(&DomainHeader{Mode: ModePostcopy, PageSize: 4096, NumPages: 16, Name: "x", Backend: "lab"})
	_ = w.WritePageBatch(PhasePush, 4096, []uint64{1, 2 | ZeroFlag}, page(1))
	_ = w.WritePFNs(TypeDiscard, []uint64{1, 2, 3})
	_ = w.WriteDone(Checksums{FirstPFN: 0, CRCs: []uint32{9}}, true)
	_ = w.WriteAck(Ack{})
	_ = w.WriteSwitchover(Switchover{})
	_ = w.WriteBlob(TypeStats, []byte("{}"))
	_ = w.Flush()
	f.Add(buf.Bytes())
	f.Add([]byte{})
	f.Add([]byte{1, 0, 0x50, 0x58, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReader(bytes.NewReader(b))
		var pb PageBatch
		for i := 0; i < 64; i++ {
			rec, err := r.Next()
			if err != nil {
				return
			}
			if len(rec.Body) > MaxBody {
				t.Fatalf("body %d over bound", len(rec.Body))
			}
			switch rec.Type {
			case TypeDomainHeader:
				_, _ = DecodeDomainHeader(rec.Body)
			case TypePageBatch:
				if DecodePageBatch(rec.Body, &pb) == nil {
					nz := 0
					for _, e := range pb.Entries {
						if e&ZeroFlag == 0 {
							nz++
						}
					}
					if len(pb.Data) != nz*int(pb.PageSize) {
						t.Fatalf("accepted batch with %d data bytes for %d pages", len(pb.Data), nz)
					}
				}
			case TypeFaultRequest, TypeDiscard:
				_, _ = DecodePFNs(rec.Body, nil)
			case TypeDone:
				_, _, _ = DecodeDone(rec.Body)
			case TypeAck:
				_, _ = DecodeAck(rec.Body)
			case TypeSwitchover:
				_, _ = DecodeSwitchover(rec.Body)
			case TypeCredit:
				_, _ = DecodeU64(rec.Body)
			default:
				_, _ = DecodeBlob(rec.Body)
			}
		}
	})
}

func TestAbsentRangesAndPageSet(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	h := &DomainHeader{Mode: ModePostcopy, PageSize: 4096, NumPages: 100, Name: "x", Backend: "xen",
		Absent: RangesOf([]uint64{3, 4, 5, 9, 99})}
	require.Equal(t, []Range{{3, 3}, {9, 1}, {99, 1}}, h.Absent)
	require.NoError(t, w.WriteDomainHeader(h))
	require.NoError(t, w.WritePageSet(PageSet{Dropped: []uint64{7, 8}, Added: []uint64{4}}))
	require.NoError(t, w.Flush())
	r := NewReader(&buf)
	rec, err := r.Next()
	require.NoError(t, err)
	got, err := DecodeDomainHeader(rec.Body)
	require.NoError(t, err)
	require.Equal(t, h.Absent, got.Absent)
	rec, err = r.Next()
	require.NoError(t, err)
	require.Equal(t, TypePageSet, rec.Type)
	ps, err := DecodePageSet(rec.Body)
	require.NoError(t, err)
	require.Equal(t, PageSet{Dropped: []uint64{7, 8}, Added: []uint64{4}}, ps)

	// Ranges beyond the page space, overlapping or empty are refused on
	// both sides.
	for _, bad := range [][]Range{{{99, 2}}, {{3, 3}, {4, 1}}, {{5, 0}}, {{100, 1}}} {
		h.Absent = bad
		require.ErrorIs(t, w.WriteDomainHeader(h), ErrMalformed, "%v", bad)
	}
	require.Error(t, w.WritePageSet(PageSet{}))
	_, err = DecodePageSet([]byte{1, 0, 0, 0, 0, 0, 0, 0})
	require.ErrorIs(t, err, ErrMalformed)
}
