package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// runPair runs one migration of src to the destination the factory makes,
// with the source's context under the test's control.
func runPair(t *testing.T, ctx context.Context, src Source, factory Factory, dopt DestOptions, opt ...Options) (st *Stats, serr error, ds *DestStats, derr error) {
	t.Helper()
	a1, a2, b1, b2 := conns(t)
	done := make(chan struct{})
	dctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	go func() {
		defer close(done)
		ds, derr = RunDest(dctx, b1, b2, factory, dopt)
	}()
	o := Options{Mode: wire.ModePostcopy, BatchPages: 8, WindowBytes: 64 << 10}
	if len(opt) > 0 {
		o = opt[0]
	}
	st, serr = RunSource(ctx, src, a1, a2, o)
	<-done
	return
}

// resumeFailDest cannot start the domain (Xen refused the vCPU state).
type resumeFailDest struct{ *memDest }

func (d *resumeFailDest) Resume([]byte) error {
	return errors.New("set the HVM context: invalid argument")
}

// If the destination cannot resume after GO, the domain never ran there:
// the source must resume it, not leave it paused on both sides.
func TestResumeFailureAfterGoResumesSource(t *testing.T) {
	src := newMemSource(64, 0)
	_, err, _, derr := runPair(t, context.Background(), src, func(*wire.DomainHeader) (Dest, error) {
		return &resumeFailDest{newMemDest(nil)}, nil
	}, DestOptions{})
	requireWhere(t, err, RunsAtSource)
	require.Contains(t, err.Error(), "invalid argument")
	require.True(t, src.resumed)
	require.False(t, src.destroyed)
	require.ErrorContains(t, derr, "the source resumes it")
}

// relinqSource cancels the migration from inside Relinquish, which runs
// after READY and before GO: the last moment a cancel can be honoured.
type relinqSource struct {
	*memSource
	cancel context.CancelFunc
}

func (s *relinqSource) Relinquish() error { s.cancel(); time.Sleep(10 * time.Millisecond); return nil }

func TestCancelBetweenReadyAndGoResumesSource(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	src := &relinqSource{newMemSource(64, 0), cancel}
	dst := newMemDest(nil)
	_, err, _, _ := runPair(t, ctx, src, func(*wire.DomainHeader) (Dest, error) { return dst, nil }, DestOptions{})
	requireWhere(t, err, RunsAtSource)
	require.ErrorIs(t, err, context.Canceled)
	require.True(t, src.resumed)
	require.Nil(t, dst.core, "the destination resumed although GO was not to be sent")
}

// A cancel (the tool got SIGINT) after GO must not end the migration: the
// guest runs at the destination and its memory is still at the source.
func TestCancelAfterGoDoesNotStopTheMigration(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	src := newMemSource(2048, 0)
	dst := newMemDest([]uint64{1000, 5, 1500})
	st, err, _, derr := runPair(t, ctx, src, func(*wire.DomainHeader) (Dest, error) { return dst, nil },
		DestOptions{OnResume: cancel})
	require.NoError(t, err)
	require.NoError(t, derr)
	require.True(t, st.Verified)
	checkSame(t, src, dst)
}

// A factory that fails and returns a typed nil (as Xen's does) must not
// crash the receiver.
func TestFactoryFailureWithTypedNil(t *testing.T) {
	src := newMemSource(64, 0)
	_, err, _, derr := runPair(t, context.Background(), src, func(*wire.DomainHeader) (Dest, error) {
		var d *memDest
		return d, errors.New("xl create: killed after 2m0s")
	}, DestOptions{})
	requireWhere(t, err, RunsAtSource)
	require.ErrorContains(t, derr, "killed after")
	require.False(t, src.paused)
}

// A header that claims more pages than a receiver can hold is refused
// before anything is sized by it.
func TestHugePageCountRefused(t *testing.T) {
	a1, a2, b1, b2 := conns(t)
	go func() {
		_ = wire.WriteHeader(a1, wire.ChannelBulk)
		_ = wire.WriteHeader(a2, wire.ChannelUrgent)
		w := wire.NewWriter(a1)
		_ = w.WriteDomainHeader(&wire.DomainHeader{Mode: wire.ModePostcopy, PageSize: 4096, NumPages: 1 << 34, Name: "x", Backend: "mem"})
		_ = w.Flush()
	}()
	called := false
	_, err := RunDest(context.Background(), b1, b2, func(*wire.DomainHeader) (Dest, error) { called = true; return nil, nil }, DestOptions{})
	require.ErrorContains(t, err, "more than this receiver hosts")
	require.False(t, called)
}

// balloonSource is a memSource whose guest gave pages back before the
// migration (absent), gives more back and takes some again before the
// pause.
type balloonSource struct {
	*memSource
	absent         []uint64
	dropped, added []uint64
	unreadable     map[uint64]bool // ReadPages fails on these
	reads          map[uint64]int
}

func (s *balloonSource) Info() Info {
	i := s.memSource.Info()
	i.Absent = slices.Clone(s.absent)
	return i
}
func (s *balloonSource) ReadPages(pfns []uint64, buf []byte) error {
	s.mu.Lock()
	var bad []uint64
	for _, p := range pfns {
		s.reads[p]++
		if s.unreadable[p] || slices.Contains(s.absent, p) {
			bad = append(bad, p)
		}
	}
	s.mu.Unlock()
	if err := s.memSource.ReadPages(pfns, buf); err != nil {
		return err
	}
	if bad != nil {
		return &UnreadableError{PFNs: bad, Err: errors.New("errno -22")}
	}
	return nil
}
func (s *balloonSource) PageSetChange() ([]uint64, []uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.absent = slices.DeleteFunc(s.absent, func(p uint64) bool { return slices.Contains(s.added, p) })
	s.absent = append(s.absent, s.dropped...)
	return s.dropped, s.added, nil
}

// setDest follows page-set changes and records them.
type setDest struct {
	*memDest
	dropped, added []uint64
}

func (d *setDest) ChangePageSet(dropped, added []uint64) error {
	d.dropped, d.added = append(d.dropped, dropped...), append(d.added, added...)
	d.memDest.Discard(dropped)
	return nil
}

func TestPageSetChangesInThePause(t *testing.T) {
	for _, mode := range []wire.Mode{wire.ModePostcopy, wire.ModeHybrid, wire.ModePrecopy} {
		t.Run(mode.String(), func(t *testing.T) {
			src := &balloonSource{memSource: newMemSource(512, 0), absent: []uint64{10, 11, 12, 300},
				dropped: []uint64{40, 41, 200}, added: []uint64{11, 300}, reads: map[uint64]int{}}
			// The guest gave 40, 41, 200 back while pre-copy ran: unreadable.
			src.unreadable = map[uint64]bool{40: true, 41: true, 200: true}
			dst := &setDest{memDest: newMemDest([]uint64{100, 300, 11})}
			st, err, ds, derr := runPair(t, context.Background(), src, func(*wire.DomainHeader) (Dest, error) { return dst, nil },
				DestOptions{}, Options{Mode: mode, BatchPages: 8, WindowBytes: 64 << 10, MaxRounds: 2})
			require.NoError(t, err)
			require.NoError(t, derr)
			require.NotNil(t, ds)
			require.True(t, st.Verified)
			require.Equal(t, uint64(3), st.DroppedPages)
			require.Equal(t, uint64(2), st.AddedPages)
			require.Equal(t, []uint64{40, 41, 200}, dst.dropped)
			require.Equal(t, []uint64{11, 300}, dst.added)
			for p, page := range src.pages {
				pfn := uint64(p)
				got, ok := dst.pages[pfn]
				switch {
				case pfn == 10 || pfn == 12 || pfn == 40 || pfn == 41 || pfn == 200:
					require.False(t, ok, "pfn %d holds no memory: nothing may be placed there", pfn)
				default:
					require.True(t, ok, "pfn %d missing", pfn)
					require.Equal(t, page, got, "pfn %d", pfn)
				}
			}
			if mode != wire.ModePostcopy {
				require.Equal(t, uint64(3), st.UnreadableReads)
			}
		})
	}
}

// A page that cannot be read and did not leave the domain is never sent
// as zeroes: the migration stops before GO and the domain runs on.
func TestUnreadableRAMStopsBeforeGo(t *testing.T) {
	src := &balloonSource{memSource: newMemSource(256, 0), unreadable: map[uint64]bool{77: true}, reads: map[uint64]int{}}
	dst := &setDest{memDest: newMemDest(nil)}
	_, err, _, _ := runPair(t, context.Background(), src, func(*wire.DomainHeader) (Dest, error) { return dst, nil },
		DestOptions{}, Options{Mode: wire.ModeHybrid, BatchPages: 8, WindowBytes: 64 << 10})
	requireWhere(t, err, RunsAtSource)
	require.ErrorContains(t, err, "page 77")
	require.True(t, src.resumed)
	_, placed := dst.pages[77]
	require.False(t, placed, "an unreadable page reached the destination")
}

// flakyDest fails its first placements after the resume, as a backend
// whose hypercall hit a transient error.
type flakyDest struct {
	*memDest
	resumed atomic.Bool
	fails   atomic.Int32
}

func (d *flakyDest) Resume(c []byte) error { d.resumed.Store(true); return d.memDest.Resume(c) }
func (d *flakyDest) Place(p []Page) error {
	if d.resumed.Load() && d.fails.Add(-1) >= 0 {
		return errors.New("xc_mem_paging_load: device or resource busy")
	}
	return d.memDest.Place(p)
}

// After GO a failed placement is not fatal: the receiver keeps the pages
// and places them again.
func TestPlaceFailureAfterResumeIsRetried(t *testing.T) {
	src := newMemSource(1024, 0)
	dst := &flakyDest{memDest: newMemDest([]uint64{700, 3})}
	dst.fails.Store(3)
	st, err, ds, derr := runPair(t, context.Background(), src, func(*wire.DomainHeader) (Dest, error) { return dst, nil }, DestOptions{})
	require.NoError(t, err)
	require.NoError(t, derr)
	require.True(t, st.Verified)
	require.GreaterOrEqual(t, ds.PlaceRetries, uint64(3))
	checkSame(t, src, dst.memDest)
}

// corruptConn flips one byte of what is read after `after` bytes.
type corruptConn struct {
	net.Conn
	mu    sync.Mutex
	after int
	done  bool
}

func (c *corruptConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.done && n > 0 {
		if c.after < n {
			b[c.after] ^= 0xff
			c.done = true
		} else {
			c.after -= n
		}
	}
	return n, err
}

// The destination reports what failed first (a bad checksum on the
// urgent stream), not what that failure caused on the other stream.
func TestDestReportsTheRootCause(t *testing.T) {
	src := newMemSource(4096, 0)
	dst := newMemDest([]uint64{4000, 4001, 17, 3000})
	a1, a2, b1, b2 := conns(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// The urgent stream: its header, then the first fault reply, whose
	// page data gets a flipped byte.
	bad := &corruptConn{Conn: b2, after: wire.HeaderSize + 100}
	var derr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, derr = RunDest(ctx, b1, bad, func(*wire.DomainHeader) (Dest, error) { return dst, nil }, DestOptions{})
	}()
	_, err := RunSource(ctx, src, a1, a2, Options{Mode: wire.ModePostcopy, BatchPages: 8, WindowBytes: 64 << 10})
	<-done
	require.Error(t, err)
	require.ErrorIs(t, derr, wire.ErrChecksum, "%v", derr)
	require.True(t, bytes.HasPrefix([]byte(derr.Error()), []byte("urgent connection")), "first cause first: %v", derr)
}

// The receiver's own signal (its context) after the resume must not end
// the migration either: it holds the only running copy.
func TestDestCancelAfterResumeDoesNotStopTheMigration(t *testing.T) {
	src := newMemSource(2048, 0)
	dst := newMemDest([]uint64{1000, 5, 1500})
	a1, a2, b1, b2 := conns(t)
	dctx, dcancel := context.WithCancel(context.Background())
	defer dcancel()
	var derr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, derr = RunDest(dctx, b1, b2, func(*wire.DomainHeader) (Dest, error) { return dst, nil }, DestOptions{OnResume: dcancel})
	}()
	st, err := RunSource(context.Background(), src, a1, a2, Options{Mode: wire.ModePostcopy, BatchPages: 8, WindowBytes: 64 << 10})
	<-done
	require.NoError(t, err)
	require.NoError(t, derr)
	require.True(t, st.Verified)
}

// A peer that stops answering (SIGSTOP, a link down for good) is noticed
// within the progress timeout on both sides, not after TCP's minutes.
func TestSilentPeerIsNoticed(t *testing.T) {
	t.Run("destination silent", func(t *testing.T) {
		a1, a2, b1, b2 := conns(t)
		defer b1.Close()
		defer b2.Close()
		go func() { _, _ = io.Copy(io.Discard, b1) }() // reads, never answers
		go func() { _, _ = io.Copy(io.Discard, b2) }()
		src := newMemSource(64, 0)
		start := time.Now()
		_, err := RunSource(context.Background(), src, a1, a2, Options{Mode: wire.ModePostcopy, ProgressTimeout: 400 * time.Millisecond})
		requireWhere(t, err, RunsAtSource)
		require.ErrorContains(t, err, "no record from the peer")
		require.Less(t, time.Since(start), 10*time.Second)
		require.False(t, src.paused)
	})
	t.Run("source silent", func(t *testing.T) {
		a1, a2, b1, b2 := conns(t)
		defer a1.Close()
		defer a2.Close()
		go func() {
			_ = wire.WriteHeader(a1, wire.ChannelBulk)
			_ = wire.WriteHeader(a2, wire.ChannelUrgent)
			w := wire.NewWriter(a1)
			_ = w.WriteDomainHeader(&wire.DomainHeader{Mode: wire.ModePostcopy, PageSize: 4096, NumPages: 16, Name: "x", Backend: "mem"})
			_ = w.Flush()
			_, _ = io.Copy(io.Discard, a1) // then silence
		}()
		dst := newMemDest(nil)
		destroyed := make(chan struct{})
		_, err := RunDest(context.Background(), b1, b2, func(*wire.DomainHeader) (Dest, error) {
			return &destroyDest{memDest: dst, destroyed: destroyed}, nil
		}, DestOptions{ProgressTimeout: 400 * time.Millisecond})
		require.ErrorContains(t, err, "no record from the peer")
		select {
		case <-destroyed:
		default:
			t.Fatal("the half-received domain was not destroyed")
		}
	})
}

type destroyDest struct {
	*memDest
	destroyed chan struct{}
}

func (d *destroyDest) Destroy() error { close(d.destroyed); return nil }

// backDest reads its memory back; corrupt names a page it stores wrongly,
// guestWrote pages the resumed guest changed.
type backDest struct {
	*memDest
	corrupt    uint64
	guestWrote []uint64
}

func (d *backDest) Place(pages []Page) error {
	if err := d.memDest.Place(pages); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if p, ok := d.pages[d.corrupt]; ok && p[100] != 0x5a {
		p[100] = 0x5a // stored wrongly: what arrived was right
	}
	for _, g := range d.guestWrote {
		if p, ok := d.pages[g]; ok {
			p[7] = 0xee
		}
	}
	return nil
}

func (d *backDest) ReadBack(pfns []uint64, buf []byte) ([]uint64, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var w []uint64
	for i, p := range pfns {
		copy(buf[i*ps:(i+1)*ps], d.pages[p])
		if slices.Contains(d.guestWrote, p) {
			w = append(w, p)
		}
	}
	return w, nil
}

// `verified` is about the destination's memory: one page stored wrongly
// makes it false (with the figures still reported), pages the guest wrote
// are not held against the source, and the rest is compared.
func TestVerifiedReadsTheDestinationBack(t *testing.T) {
	for _, corrupt := range []bool{false, true} {
		t.Run(fmt.Sprintf("corrupt=%v", corrupt), func(t *testing.T) {
			src := newMemSource(512, 0)
			dst := &backDest{memDest: newMemDest([]uint64{10, 400}), corrupt: 1 << 40, guestWrote: []uint64{10, 11}}
			if corrupt {
				dst.corrupt = 300
			}
			st, err, ds, derr := runPair(t, context.Background(), src, func(*wire.DomainHeader) (Dest, error) { return dst, nil }, DestOptions{})
			require.NotNil(t, st)
			require.Equal(t, "memory", st.VerifiedFrom)
			require.Equal(t, uint64(2), st.GuestWrittenPages)
			require.Equal(t, uint64(510), st.VerifiedPages)
			if !corrupt {
				require.NoError(t, err)
				require.NoError(t, derr)
				require.True(t, st.Verified)
				return
			}
			require.Error(t, err)
			require.ErrorContains(t, derr, "1 pages differ")
			require.False(t, st.Verified)
			require.Equal(t, uint64(1), st.MismatchedPages)
			require.NotNil(t, ds)
		})
	}
}

// slowFactory creates its domain for longer than the progress timeout:
// the source is not silent meanwhile, the destination is busy.
func TestSlowDomainCreationIsNotSilence(t *testing.T) {
	src := newMemSource(256, 0)
	dst := newMemDest([]uint64{5})
	a1, a2, b1, b2 := conns(t)
	var derr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, derr = RunDest(context.Background(), b1, b2, func(*wire.DomainHeader) (Dest, error) {
			time.Sleep(1500 * time.Millisecond)
			return &backDest{memDest: dst, corrupt: 1 << 40}, nil
		}, DestOptions{ProgressTimeout: 400 * time.Millisecond})
	}()
	st, err := RunSource(context.Background(), src, a1, a2, Options{Mode: wire.ModePostcopy, ProgressTimeout: 400 * time.Millisecond})
	<-done
	require.NoError(t, err)
	require.NoError(t, derr)
	require.True(t, st.Verified)
}

// rewriteUrgent relays the source's urgent stream to the destination and
// rewrites the first page batch with a valid checksum but a pfn beyond the
// domain: a record that decodes but cannot be placed.
func rewriteUrgent(t *testing.T, fromSource net.Conn) net.Conn {
	t.Helper()
	toDest, relay := net.Pipe()
	go func() { _, _ = io.Copy(fromSource, relay) }() // faults, destination → source
	go func() {
		defer relay.Close()
		var h [wire.HeaderSize]byte
		if _, err := io.ReadFull(fromSource, h[:]); err != nil {
			return
		}
		if _, err := relay.Write(h[:]); err != nil {
			return
		}
		r, w := wire.NewReader(fromSource), wire.NewWriter(relay)
		rewritten := false
		for {
			rec, err := r.Next()
			if err != nil {
				return
			}
			if rec.Type == wire.TypePageBatch && !rewritten {
				var pb wire.PageBatch
				if wire.DecodePageBatch(rec.Body, &pb) == nil {
					rewritten = true
					pb.Entries[0] = pb.Entries[0]&^wire.PFNMask | 1<<40
					err = w.WritePageBatch(pb.Phase, pb.PageSize, pb.Entries, pb.Data)
				}
			} else {
				err = w.WriteRecord(rec.Type, rec.Body)
			}
			if err != nil || w.Flush() != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { toDest.Close() })
	return toDest
}

// A fault reply that decodes but cannot be placed ends the destination's
// side with that reason; it was once dropped (the error was shadowed) and
// the vCPU left waiting on the page.
func TestUnplaceableFaultReplyFailsTheDestination(t *testing.T) {
	src := newMemSource(4096, 0)
	dst := newMemDest([]uint64{4000, 4001, 17, 3000})
	a1, a2, b1, b2 := conns(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var derr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, derr = RunDest(ctx, b1, rewriteUrgent(t, b2), func(*wire.DomainHeader) (Dest, error) { return dst, nil }, DestOptions{})
	}()
	_, _ = RunSource(ctx, src, a1, a2, Options{Mode: wire.ModePostcopy, BatchPages: 8, WindowBytes: 64 << 10})
	<-done
	require.Error(t, derr)
	require.Contains(t, derr.Error(), "urgent connection: page batch: pfn 0x10000000000 beyond the domain")
}
