package engine

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// memSource is a unit-test double of a source domain: pages in memory,
// an optional writer goroutine standing in for a running vCPU.
type memSource struct {
	mu        sync.Mutex
	pages     [][]byte
	dirty     map[uint64]bool
	logging   bool
	paused    bool
	resumed   bool
	destroyed bool
	stopW     chan struct{}
	wg        sync.WaitGroup
}

const ps = 4096

func newMemSource(n int, zeroEvery int) *memSource {
	s := &memSource{pages: make([][]byte, n), dirty: map[uint64]bool{}, stopW: make(chan struct{})}
	for i := range s.pages {
		s.pages[i] = make([]byte, ps)
		if zeroEvery == 0 || i%zeroEvery != 0 {
			binary.LittleEndian.PutUint64(s.pages[i], uint64(i)+1)
		}
	}
	return s
}

// run writes random pages until paused, like a vCPU dirtying memory.
func (s *memSource) run(seed int64) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		rng := rand.New(rand.NewSource(seed))
		for v := uint64(1); ; v++ {
			select {
			case <-s.stopW:
				return
			default:
			}
			s.mu.Lock()
			if !s.paused {
				p := uint64(rng.Intn(len(s.pages)))
				binary.LittleEndian.PutUint64(s.pages[p][8:], v)
				if s.logging {
					s.dirty[p] = true
				}
			}
			s.mu.Unlock()
			time.Sleep(20 * time.Microsecond)
		}
	}()
}

func (s *memSource) Info() Info {
	return Info{Name: "mem", NumPages: uint64(len(s.pages)), PageSize: ps, VCPUs: 1, Backend: "mem"}
}
func (s *memSource) ReadPages(pfns []uint64, buf []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, p := range pfns {
		copy(buf[i*ps:], s.pages[p])
	}
	return nil
}
func (s *memSource) StartDirtyLog() error { s.mu.Lock(); s.logging = true; s.mu.Unlock(); return nil }
func (s *memSource) StopDirtyLog() error  { s.mu.Lock(); s.logging = false; s.mu.Unlock(); return nil }
func (s *memSource) DirtyPages(dst []uint64) ([]uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	dst = dst[:0]
	for p := range s.dirty {
		dst = append(dst, p)
	}
	s.dirty = map[uint64]bool{}
	return dst, nil
}
func (s *memSource) Pause() error               { s.mu.Lock(); s.paused = true; s.mu.Unlock(); return nil }
func (s *memSource) CoreState() ([]byte, error) { return []byte("core"), nil }
func (s *memSource) CorePFNs() ([]uint64, error) {
	return []uint64{3, 5}, nil
}
func (s *memSource) Resume() error {
	s.mu.Lock()
	s.paused = false
	s.resumed = true
	s.mu.Unlock()
	return nil
}
func (s *memSource) Destroy() error { close(s.stopW); s.wg.Wait(); s.destroyed = true; return nil }

// memDest is a unit-test double of a destination: a guest goroutine
// touches pages; a touch of an absent page raises a fault and waits.
type memDest struct {
	mu      sync.Mutex
	cond    *sync.Cond
	pages   map[uint64][]byte
	faults  chan uint64
	closed  chan struct{}
	core    []byte
	touches []uint64
	once    sync.Once
}

func newMemDest(touches []uint64) *memDest {
	d := &memDest{pages: map[uint64][]byte{}, faults: make(chan uint64, 64), closed: make(chan struct{}), touches: touches}
	d.cond = sync.NewCond(&d.mu)
	return d
}

func (d *memDest) Place(pages []Page) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, p := range pages {
		b := make([]byte, ps)
		copy(b, p.Data)
		d.pages[p.PFN] = b
	}
	d.cond.Broadcast()
	return nil
}
func (d *memDest) Discard(pfns []uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, p := range pfns {
		delete(d.pages, p)
	}
	return nil
}
func (d *memDest) ReadFaults(dst []uint64) ([]uint64, error) {
	select {
	case p := <-d.faults:
		return append(dst[:0], p), nil
	case <-d.closed:
		return nil, ErrClosed
	}
}
func (d *memDest) Resume(core []byte) error {
	d.core = core
	go func() {
		for _, p := range d.touches {
			d.mu.Lock()
			if _, ok := d.pages[p]; !ok {
				d.mu.Unlock()
				select {
				case d.faults <- p:
				case <-d.closed:
					return
				}
				d.mu.Lock()
				for d.pages[p] == nil {
					d.cond.Wait()
				}
			}
			d.mu.Unlock()
		}
	}()
	return nil
}
func (d *memDest) Destroy() error { return nil }
func (d *memDest) Close() error   { d.once.Do(func() { close(d.closed) }); return nil }

func conns(t *testing.T) (a1, a2, b1, b2 net.Conn) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	a1, err = net.Dial("tcp", l.Addr().String())
	require.NoError(t, err)
	b1, err = l.Accept()
	require.NoError(t, err)
	a2, err = net.Dial("tcp", l.Addr().String())
	require.NoError(t, err)
	b2, err = l.Accept()
	require.NoError(t, err)
	return
}

func migrate(t *testing.T, mode wire.Mode, policy string, src *memSource, dst *memDest) (*Stats, *DestStats) {
	t.Helper()
	a1, a2, b1, b2 := conns(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var ds *DestStats
	var derr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Swapped order: the destination must sort them by header.
		ds, derr = RunDest(ctx, b2, b1, func(h *wire.DomainHeader) (Dest, error) {
			if h.Backend != "mem" {
				return nil, fmt.Errorf("backend %q", h.Backend)
			}
			return dst, nil
		}, DestOptions{})
	}()
	st, err := RunSource(ctx, src, a1, a2, Options{Mode: mode, Prepaging: policy, BatchPages: 16, WindowBytes: 128 << 10, MaxRounds: 5})
	<-done
	require.NoError(t, err)
	require.NoError(t, derr)
	return st, ds
}

func checkSame(t *testing.T, src *memSource, dst *memDest) {
	t.Helper()
	for i, p := range src.pages {
		require.Equal(t, p, dst.pages[uint64(i)], "pfn %d", i)
	}
}

func TestPostcopyEveryPageOnce(t *testing.T) {
	for _, policy := range []string{"none", "forward", "dual", "multi"} {
		t.Run(policy, func(t *testing.T) {
			src := newMemSource(600, 7)
			rng := rand.New(rand.NewSource(3))
			var touches []uint64
			for i := 0; i < 300; i++ {
				touches = append(touches, uint64(200+rng.Intn(300)))
			}
			dst := newMemDest(touches)
			st, ds := migrate(t, wire.ModePostcopy, policy, src, dst)
			require.True(t, st.Verified)
			require.Zero(t, st.RedundantPages)
			require.Zero(t, st.ResentPages)
			require.Equal(t, uint64(600), st.PagesSent, "every page exactly once")
			require.Equal(t, uint64(600/7+1), st.ZeroPages)
			require.Equal(t, uint64(2), st.CorePages)
			require.Equal(t, uint64(600), ds.PagesReceived)
			require.Equal(t, []byte("core"), dst.core)
			require.True(t, src.destroyed)
			require.False(t, src.resumed)
			checkSame(t, src, dst)
		})
	}
}

func TestPrecopyAndHybridWithDirtying(t *testing.T) {
	for _, mode := range []wire.Mode{wire.ModePrecopy, wire.ModeHybrid} {
		t.Run(mode.String(), func(t *testing.T) {
			src := newMemSource(2000, 0)
			src.run(int64(mode))
			dst := newMemDest([]uint64{1, 2, 3, 1999})
			st, _ := migrate(t, mode, "dual", src, dst)
			require.True(t, st.Verified)
			require.Zero(t, st.RedundantPages)
			// Every transmission after a page's first is a re-send, in
			// every phase (pre-copy rounds, stop-and-copy, hybrid's
			// discarded pages sent again in post-copy).
			require.Equal(t, st.PagesSent-2000, st.ResentPages)
			require.NotZero(t, st.ResentPages, "the guest dirtied pages while pre-copy ran")
			require.GreaterOrEqual(t, st.PrecopyRounds, 1)
			checkSame(t, src, dst)
			if mode == wire.ModeHybrid {
				require.Equal(t, 1, st.PrecopyRounds)
				// Round 0 sent every page; only discarded pages go again
				// (core pages are sent only when not already sent).
				require.Equal(t, 2000+st.DiscardedPages, st.PagesSent)
			}
		})
	}
}

// A destination that refuses the domain leaves it running at the source,
// never paused.
func TestRefusedDomainKeepsSourceRunning(t *testing.T) {
	src := newMemSource(64, 0)
	a1, a2, b1, b2 := conns(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() {
		_, _ = RunDest(ctx, b1, b2, func(h *wire.DomainHeader) (Dest, error) {
			return nil, fmt.Errorf("no room for %q", h.Name)
		}, DestOptions{})
	}()
	_, err := RunSource(ctx, src, a1, a2, Options{Mode: wire.ModePostcopy})
	require.Error(t, err)
	requireWhere(t, err, RunsAtSource)
	require.Contains(t, err.Error(), "no room")
	require.False(t, src.paused)
	require.False(t, src.destroyed)
}

// A failure after the pause but before GO resumes the domain at the source.
func TestFailureBeforeGoResumesSource(t *testing.T) {
	src := newMemSource(64, 0)
	a1, a2, b1, b2 := conns(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dst := newMemDest(nil)
	go func() {
		_, _ = RunDest(ctx, b1, b2, func(h *wire.DomainHeader) (Dest, error) {
			return &failPlaceDest{memDest: dst}, nil
		}, DestOptions{})
	}()
	_, err := RunSource(ctx, src, a1, a2, Options{Mode: wire.ModePostcopy})
	require.Error(t, err)
	requireWhere(t, err, RunsAtSource)
	require.Contains(t, err.Error(), "disk full")
	require.True(t, src.resumed)
	require.False(t, src.paused)
	require.False(t, src.destroyed)
}

type failPlaceDest struct{ *memDest }

func (d *failPlaceDest) Place([]Page) error { return fmt.Errorf("disk full") }

// A connection lost after GO leaves the source paused, never resumed.
func TestFailureAfterGoKeepsSourcePaused(t *testing.T) {
	src := newMemSource(4096, 0)
	dst := newMemDest([]uint64{100})
	a1, a2, b1, b2 := conns(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() {
		_, _ = RunDest(ctx, b1, b2, func(h *wire.DomainHeader) (Dest, error) {
			return &dyingDest{memDest: dst, conn: b1}, nil
		}, DestOptions{})
	}()
	_, err := RunSource(ctx, src, a1, a2, Options{Mode: wire.ModePostcopy, BatchPages: 8, WindowBytes: 64 << 10})
	require.Error(t, err)
	requireWhere(t, err, AfterGo)
	require.False(t, src.resumed)
	require.False(t, src.destroyed)
}

// dyingDest cuts the connection after a few placements post-resume.
// (Place runs on both streams' goroutines: the counts are locked.)
type dyingDest struct {
	*memDest
	conn    net.Conn
	mu      sync.Mutex
	resumed bool
	n       int
}

func (d *dyingDest) Resume(core []byte) error {
	d.mu.Lock()
	d.resumed = true
	d.mu.Unlock()
	return d.memDest.Resume(core)
}

func (d *dyingDest) Place(p []Page) error {
	d.mu.Lock()
	if d.resumed {
		d.n++
		if d.n == 3 {
			d.conn.Close()
		}
	}
	d.mu.Unlock()
	return d.memDest.Place(p)
}

func requireWhere(t *testing.T, err error, want Where) {
	t.Helper()
	got, ok := WhereOf(err)
	require.True(t, ok, "not a migration outcome: %v", err)
	require.Equal(t, want, got, "%v", err)
}
