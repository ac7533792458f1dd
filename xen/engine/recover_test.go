package engine

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/xl-postcopy/xl-postcopy/xen/engine/protocol"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// linkLab is a link that tests can cut: every connection between the two
// sides goes through its listener, cut closes them all (a reset, as
// `ss -K` does), and the sides' Reconnect and Reattach make new ones.
type linkLab struct {
	t        *testing.T
	l        net.Listener
	accepted chan net.Conn
	mu       sync.Mutex
	live     []net.Conn
	refuse   atomic.Bool // Reconnect fails (the destination is unreachable)
	cuts     atomic.Int32
	dials    atomic.Int32
	attempts atomic.Int32 // Reconnect calls
}

func newLinkLab(t *testing.T) *linkLab {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	k := &linkLab{t: t, l: l, accepted: make(chan net.Conn, 16)}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			k.track(c)
			k.accepted <- c
		}
	}()
	t.Cleanup(func() {
		l.Close()
		k.cut()
	})
	return k
}

func (k *linkLab) track(c net.Conn) {
	k.mu.Lock()
	k.live = append(k.live, c)
	k.mu.Unlock()
}

// cut closes every connection of the link, at both ends.
func (k *linkLab) cut() {
	k.mu.Lock()
	live := k.live
	k.live = nil
	k.mu.Unlock()
	for _, c := range live {
		c.Close()
	}
	k.cuts.Add(1)
}

func (k *linkLab) dial() (io.ReadWriteCloser, io.ReadWriteCloser, error) {
	k.dials.Add(1)
	a, err := net.Dial("tcp", k.l.Addr().String())
	if err != nil {
		return nil, nil, err
	}
	k.track(a)
	b, err := net.Dial("tcp", k.l.Addr().String())
	if err != nil {
		a.Close()
		return nil, nil, err
	}
	k.track(b)
	return a, b, nil
}

func (k *linkLab) reconnect(ctx context.Context) (io.ReadWriteCloser, io.ReadWriteCloser, error) {
	k.attempts.Add(1)
	if k.refuse.Load() {
		return nil, nil, errors.New("connection refused")
	}
	return k.dial()
}

func (k *linkLab) reattach(ctx context.Context) (io.ReadWriteCloser, io.ReadWriteCloser, error) {
	var cs [2]io.ReadWriteCloser
	for i := range cs {
		select {
		case c := <-k.accepted:
			cs[i] = c
		case <-ctx.Done():
			if cs[0] != nil {
				cs[0].Close()
			}
			return nil, nil, ctx.Err()
		}
	}
	return cs[0], cs[1], nil
}

// cutDest cuts the link when the destination has placed after pages
// after its resume (once per entry of after), or as its read-back starts.
type cutDest struct {
	*memDest
	k       *linkLab
	mu      sync.Mutex
	placed  int
	after   []int
	resumed bool
	cutBack bool
	early   int    // pages placed before the resume
	before  int    // cut once this many pages are placed before the resume (0: never)
	onCut   func() // called before each cut after the resume
}

func (d *cutDest) Resume(core []byte) error {
	d.mu.Lock()
	d.resumed = true
	d.mu.Unlock()
	return d.memDest.Resume(core)
}

func (d *cutDest) Place(pages []Page) error {
	if err := d.memDest.Place(pages); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.resumed {
		d.early += len(pages)
		if d.before > 0 && d.early >= d.before {
			d.before = 0
			d.k.cut()
		}
		return nil
	}
	d.placed += len(pages)
	if len(d.after) > 0 && d.placed >= d.after[0] {
		d.after = d.after[1:]
		if d.onCut != nil {
			d.onCut()
		}
		d.k.cut()
	}
	return nil
}

// ReadBack makes the destination verify from its memory; with cutBack the
// link is cut as the read-back starts, so that the ACK cannot go out.
func (d *cutDest) ReadBack(pfns []uint64, buf []byte) ([]uint64, error) {
	d.mu.Lock()
	if d.cutBack {
		d.cutBack = false
		d.mu.Unlock()
		d.k.cut()
		time.Sleep(20 * time.Millisecond)
	} else {
		d.mu.Unlock()
	}
	d.memDest.mu.Lock()
	defer d.memDest.mu.Unlock()
	for i, p := range pfns {
		copy(buf[i*ps:(i+1)*ps], d.pages[p])
	}
	return nil, nil
}

type recoverCase struct {
	after   []int // cut after this many pages placed since the resume
	onGo    bool  // cut as GO leaves
	cutBack bool  // cut as the destination reads its memory back (ACK lost)
}

// migrateCut migrates a guest that keeps faulting, with the link cut as
// c says, and recovery on at both sides.
type cutRun struct {
	st   *Stats
	serr error
	ds   *DestStats
	derr error
	src  *memSource
	dst  *cutDest
	k    *linkLab
}

func migrateCut(t *testing.T, c recoverCase) cutRun {
	t.Helper()
	k := newLinkLab(t)
	src := newMemSource(800, 9)
	rng := rand.New(rand.NewSource(5))
	var touches []uint64
	for range 400 {
		touches = append(touches, uint64(rng.Intn(800)))
	}
	dst := &cutDest{memDest: newMemDest(touches), k: k, after: c.after, cutBack: c.cutBack}
	a1, a2, err := k.dial()
	require.NoError(t, err)
	b1, b2, err := k.reattach(context.Background())
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var ds *DestStats
	var derr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		ds, derr = RunDest(ctx, b1, b2, func(*wire.DomainHeader) (Dest, error) { return dst, nil },
			DestOptions{Reattach: k.reattach, RecoverTimeout: 20 * time.Second, ProgressTimeout: 5 * time.Second})
	}()
	opt := Options{Mode: wire.ModePostcopy, Prepaging: "dual", BatchPages: 8, WindowBytes: 32 << 10,
		Reconnect: k.reconnect, RecoverTimeout: 15 * time.Second, ProgressTimeout: 5 * time.Second}
	if c.onGo {
		opt.OnGo = k.cut
	}
	st, serr := RunSource(ctx, src, a1, a2, opt)
	<-done
	return cutRun{st, serr, ds, derr, src, dst, k}
}

// A link cut once GO may have left — as GO leaves, mid push (once and
// three times), or as the destination reads back and acknowledges — is
// recovered: the domain completes at the destination with every page
// right, verified from its memory, and the figures count the recoveries.
func TestCutLinkAfterGoIsRecovered(t *testing.T) {
	for name, c := range map[string]recoverCase{
		"at-go":        {onGo: true},
		"mid-push":     {after: []int{150}},
		"three-times":  {after: []int{100, 300, 500}},
		"at-read-back": {cutBack: true},
	} {
		t.Run(name, func(t *testing.T) {
			r := migrateCut(t, c)
			st, serr, ds, derr, src, dst, k := r.st, r.serr, r.ds, r.derr, r.src, r.dst, r.k
			require.NoError(t, serr)
			require.NoError(t, derr)
			require.True(t, st.Verified)
			require.Equal(t, "memory", st.VerifiedFrom)
			require.True(t, src.destroyed)
			require.False(t, src.resumed, "the source copy never runs again after GO")
			checkSame(t, src, dst.memDest)
			cuts := int(k.cuts.Load())
			require.GreaterOrEqual(t, cuts, 1, "the link was never cut: the test shows nothing")
			require.Equal(t, cuts, st.Recoveries, "one recovery per cut")
			require.Equal(t, cuts, ds.Recoveries)
			require.Positive(t, st.PostcopyPausedMs)
			require.Zero(t, st.RedundantPages, "a recovery sends only what the destination lacks")
			require.LessOrEqual(t, st.LostPages, st.ResentPages)
		})
	}
}

// A destination that never comes back: the source gives up after its
// recovery time with its copy paused (never resumed, never destroyed),
// and says so; the destination keeps the domain it runs.
func TestUnrecoveredLinkKeepsTheSourcePaused(t *testing.T) {
	k := newLinkLab(t)
	src := newMemSource(400, 0)
	var touches []uint64
	for i := range 200 {
		touches = append(touches, uint64(399-i))
	}
	dst := &cutDest{memDest: newMemDest(touches), k: k, after: []int{60}}
	a1, a2, err := k.dial()
	require.NoError(t, err)
	b1, b2, err := k.reattach(context.Background())
	require.NoError(t, err)
	k.refuse.Store(true) // every reconnect fails
	var derr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, derr = RunDest(context.Background(), b1, b2, func(*wire.DomainHeader) (Dest, error) { return dst, nil },
			DestOptions{Reattach: k.reattach, RecoverTimeout: 2 * time.Second, ProgressTimeout: 5 * time.Second})
	}()
	start := time.Now()
	_, serr := RunSource(context.Background(), src, a1, a2, Options{Mode: wire.ModePostcopy, BatchPages: 8,
		WindowBytes: 32 << 10, Reconnect: k.reconnect, RecoverTimeout: time.Second, ProgressTimeout: 5 * time.Second})
	<-done
	requireWhere(t, serr, AfterGo)
	require.ErrorContains(t, serr, "no new link")
	require.Less(t, time.Since(start), 20*time.Second)
	require.Greater(t, int(k.attempts.Load()), 1, "the source tried again")
	require.False(t, src.resumed)
	require.False(t, src.destroyed)
	var de *DestError
	require.ErrorAs(t, derr, &de)
	require.Equal(t, protocol.RunsHere, de.Where)
	require.Positive(t, de.Missing)
}

// Before GO nothing changes with recovery on: a cut link resumes the
// domain at the source, and the destination destroys what it made.
func TestCutLinkBeforeGoResumesTheSource(t *testing.T) {
	k := newLinkLab(t)
	src := newMemSource(400, 0)
	dst := &cutDest{memDest: newMemDest(nil), k: k, before: 100}
	a1, a2, err := k.dial()
	require.NoError(t, err)
	b1, b2, err := k.reattach(context.Background())
	require.NoError(t, err)
	var derr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, derr = RunDest(context.Background(), b1, b2, func(*wire.DomainHeader) (Dest, error) { return dst, nil },
			DestOptions{Reattach: k.reattach, RecoverTimeout: 2 * time.Second})
	}()
	_, serr := RunSource(context.Background(), src, a1, a2, Options{Mode: wire.ModeHybrid, BatchPages: 8,
		WindowBytes: 32 << 10, Reconnect: k.reconnect, RecoverTimeout: time.Second})
	<-done
	requireWhere(t, serr, RunsAtSource)
	require.Zero(t, k.attempts.Load(), "no reconnect before GO")
	require.False(t, src.paused, "the domain runs at the source")
	require.False(t, src.destroyed)
	var de *DestError
	require.ErrorAs(t, derr, &de)
	require.Equal(t, protocol.DestroyedHere, de.Where)
}

// Pause times summed to the microsecond print as such.
func TestAddMs(t *testing.T) {
	sum := 0.0
	for _, us := range []int64{1234567, 2915118, 333} {
		sum = addMs(sum, time.Duration(us)*time.Microsecond)
	}
	require.Equal(t, 4150.018, sum)
	b, err := json.Marshal(sum)
	require.NoError(t, err)
	require.Equal(t, "4150.018", string(b))
}

// A source that dies after GO (here: gives up, its link refused, which
// leaves the same as a killed process — the source copy paused with every
// page, the destination waiting for a new link) is taken over by a new
// source on the same paused copy: it reconnects, learns where the
// destination stands and what it holds, and completes the migration,
// verified from the destination's memory, with nothing placed twice.
func TestTakeOverAfterTheSourceDied(t *testing.T) {
	for name, c := range map[string]recoverCase{
		"at-go":    {onGo: true},
		"mid-push": {after: []int{150}},
	} {
		t.Run(name, func(t *testing.T) {
			k := newLinkLab(t)
			src := newMemSource(800, 9)
			rng := rand.New(rand.NewSource(7))
			var touches []uint64
			for range 400 {
				touches = append(touches, uint64(rng.Intn(800)))
			}
			dst := &cutDest{memDest: newMemDest(touches), k: k, after: c.after}
			a1, a2, err := k.dial()
			require.NoError(t, err)
			b1, b2, err := k.reattach(context.Background())
			require.NoError(t, err)
			var ds *DestStats
			var derr error
			done := make(chan struct{})
			go func() {
				defer close(done)
				ds, derr = RunDest(context.Background(), b1, b2, func(*wire.DomainHeader) (Dest, error) { return dst, nil },
					DestOptions{Reattach: k.reattach, RecoverTimeout: 30 * time.Second, ProgressTimeout: 5 * time.Second})
			}()
			opt := Options{Mode: wire.ModePostcopy, Prepaging: "dual", BatchPages: 8, WindowBytes: 32 << 10,
				Reconnect: k.reconnect, RecoverTimeout: 500 * time.Millisecond, ProgressTimeout: 5 * time.Second}
			if c.onGo {
				opt.OnGo = func() {
					k.refuse.Store(true)
					k.cut()
				}
			} else {
				dst.onCut = func() { k.refuse.Store(true) }
			}
			_, serr := RunSource(context.Background(), src, a1, a2, opt)
			requireWhere(t, serr, AfterGo)
			require.False(t, src.resumed)
			require.False(t, src.destroyed)

			k.refuse.Store(false)
			opt.OnGo, opt.RecoverTimeout = nil, 10*time.Second
			st, terr := TakeOverSource(context.Background(), src, opt)
			<-done
			require.NoError(t, terr)
			require.NoError(t, derr)
			require.True(t, st.TakenOver)
			require.True(t, st.Verified)
			require.Equal(t, "memory", st.VerifiedFrom)
			require.True(t, src.destroyed)
			require.False(t, src.resumed, "the source copy never runs again after GO")
			checkSame(t, src, dst.memDest)
			require.Equal(t, 1, st.Recoveries)
			require.Equal(t, 1, ds.Recoveries)
			require.Zero(t, st.RedundantPages)
			require.Zero(t, st.DowntimeMs, "the pause was the dead process's to see")
		})
	}
}

// A take-over needs a way to the destination.
func TestTakeOverNeedsReconnect(t *testing.T) {
	_, err := TakeOverSource(context.Background(), newMemSource(10, 0), Options{Mode: wire.ModePostcopy})
	require.ErrorContains(t, err, "Reconnect")
}

// failingSource fails every read of one page once the domain is paused:
// the backend's failure, not the link's.
type failingSource struct {
	*memSource
	bad uint64
}

func (s *failingSource) ReadPages(pfns []uint64, buf []byte) error {
	s.mu.Lock()
	paused := s.paused
	s.mu.Unlock()
	if paused && slices.Contains(pfns, s.bad) {
		return errors.New("mapping refused")
	}
	return s.memSource.ReadPages(pfns, buf)
}

// With recovery on, a page that cannot be read after GO ends the
// migration with the source copy paused (a new link would meet the same
// page): it used to be taken for a broken link, and the recoveries never
// ended.
func TestBackendFailureAfterGoIsNotABrokenLink(t *testing.T) {
	k := newLinkLab(t)
	src := &failingSource{memSource: newMemSource(300, 0), bad: 250}
	dst := &cutDest{memDest: newMemDest(nil), k: k}
	a1, a2, err := k.dial()
	require.NoError(t, err)
	b1, b2, err := k.reattach(context.Background())
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = RunDest(context.Background(), b1, b2, func(*wire.DomainHeader) (Dest, error) { return dst, nil },
			DestOptions{Reattach: k.reattach, RecoverTimeout: 3 * time.Second, ProgressTimeout: 5 * time.Second})
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var st *Stats
	var serr error
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		st, serr = RunSource(ctx, src, a1, a2, Options{Mode: wire.ModePostcopy, BatchPages: 8, WindowBytes: 32 << 10,
			Reconnect: k.reconnect, RecoverTimeout: 20 * time.Second, ProgressTimeout: 5 * time.Second})
	}()
	select {
	case <-ended:
	case <-time.After(45 * time.Second):
		t.Fatalf("the source never ended: %d reconnects for a page that does not read", k.attempts.Load())
	}
	<-done
	requireWhere(t, serr, AfterGo)
	require.ErrorContains(t, serr, "mapping refused")
	require.Zero(t, st.Recoveries, "a backend failure is not a broken link")
	require.Zero(t, k.attempts.Load())
	require.False(t, src.resumed)
}
