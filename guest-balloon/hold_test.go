package main

import (
	"context"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/dsb"
	"github.com/xl-postcopy/xl-postcopy/xen/dsb/control"
	"github.com/xl-postcopy/xl-postcopy/xen/xenstore"
	"github.com/xl-postcopy/xl-postcopy/xen/xenstore/xenstoretest"
)

// holdMaxKB and the memory below make balloon-now stop above the floor
// (it counts MemAvailable) while the periodic policy, which counts
// MemFree, would go on giving memory back: a hold is visible.
const (
	holdMaxKB   = 131072
	holdFreeKB  = 61000
	holdAvailKB = 40000
)

type holdRig struct {
	t      *testing.T
	g      *guestTree
	xs     *xenstoretest.Server
	logs   *syncBuf
	cancel context.CancelFunc
	done   chan error
}

// startHoldRig runs the daemon of a guest whose memory/target is
// holdMaxKB, after adjust has changed its options (sock is the xenstore
// the daemon dials, "" for the test server's domid socket).
func startHoldRig(t *testing.T, adjust func(g *guestTree, xs *xenstoretest.Server, sock string) string) *holdRig {
	g := newGuestTree(t, holdMaxKB, holdFreeKB, holdAvailKB)
	g.startDriver()
	xs, sock := newXenstore(t)
	xs.Set(control.HomePath(domid)+"/"+domainTargetKey, strconv.Itoa(holdMaxKB))
	g.opt.reassertDelay = time.Hour // what happens, happens at once
	if adjust != nil {
		sock = adjust(g, xs, sock)
	}
	g.opt.xenstorePath = sock
	r := &holdRig{t: t, g: g, xs: xs, logs: &syncBuf{}, done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- run(ctx, g.opt, slog.New(slog.NewTextHandler(r.logs, nil)), r.logs) }()
	t.Cleanup(r.stop)
	waitFor(t, "published state", func() bool { return r.get(domid, control.KeyState) == "running" })
	return r
}

func (r *holdRig) stop() {
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	assert.NoError(r.t, <-r.done)
}

func (r *holdRig) get(dom uint32, key string) string {
	v, _ := r.xs.Get(control.Path(dom, key))
	return v
}

func (r *holdRig) dom0() *xenstore.Client {
	c, err := r.xs.Dial(0)
	require.NoError(r.t, err)
	r.t.Cleanup(func() { c.Close() })
	return c
}

// requestHold asks for a hold through the real dom0 helper and checks
// the ack and the hold key.
func (r *holdRig) requestHold(hold time.Duration) control.Ack {
	t := r.t
	ack, err := control.RequestHold(context.Background(), r.dom0(), domid, 5*time.Second, hold)
	require.NoError(t, err, "logs:\n%s", r.logs.String())
	require.True(t, ack.OK, "ack error %q", ack.Err)
	assert.Equal(t, ack.TargetKB, r.g.target(), "ballooned down before the ack")
	cfg := dsb.DefaultConfig(holdMaxKB)
	require.Greater(t, ack.TargetKB, cfg.FloorKB(), "the test needs room for the policy to shrink further")
	assert.Greater(t, ack.ReleasedKB, uint64(0))
	assert.WithinDuration(t, time.Now().Add(hold), ack.HoldUntil, 2*time.Second)
	assert.Equal(t, "held "+ack.Nonce+" until "+strconv.FormatInt(ack.HoldUntil.Unix(), 10), r.get(domid, control.KeyHold))
	return ack
}

// still checks that the target stays at kb for a few policy periods.
func (r *holdRig) still(kb uint64, what string) {
	for i := 0; i < 10; i++ {
		time.Sleep(r.g.opt.period)
		require.Equal(r.t, kb, r.g.target(), "%s (logs:\n%s)", what, r.logs.String())
	}
}

func TestHoldFromAckToHoldEnd(t *testing.T) {
	r := startHoldRig(t, nil)
	// Without a hold the policy gives memory back every period.
	waitFor(t, "a shrink step", func() bool { return r.g.target() < holdMaxKB })
	ack := r.requestHold(time.Minute)
	r.still(ack.TargetKB, "held: the policy would shrink, the target must not move")
	assert.Contains(t, r.logs.String(), "holding the balloon for dom0 ("+ack.Nonce+")")

	// A balloon-hold request read again (a spurious event) is not a second hold.
	r.xs.Set(control.Path(domid, control.KeyRequest), control.FormatHoldRequest(ack.Nonce, time.Minute))
	r.still(ack.TargetKB, "still held")

	// A hold-end for another nonce changes nothing.
	require.NoError(t, control.EndHold(context.Background(), r.dom0(), domid, "other"))
	r.still(ack.TargetKB, "held until its own hold-end")
	assert.True(t, strings.HasPrefix(r.get(domid, control.KeyHold), "held "+ack.Nonce))

	require.NoError(t, control.EndHold(context.Background(), r.dom0(), domid, ack.Nonce))
	waitFor(t, "the hold ended", func() bool { return r.get(domid, control.KeyHold) == "ended "+ack.Nonce+" dom0" })
	waitFor(t, "the policy shrinking again", func() bool { return r.g.target() < ack.TargetKB })
	assert.Contains(t, r.logs.String(), "following the policy again")
}

func TestHoldReassertsAtOnceOnReannounce(t *testing.T) {
	r := startHoldRig(t, nil)
	ack := r.requestHold(time.Minute)
	// A resume: the driver re-read memory/target and grew back, and the
	// watch re-fires with the same value. --reassert-delay is an hour.
	r.g.write(r.g.opt.targetPath(), strconv.Itoa(holdMaxKB)+"\n")
	r.xs.Set(control.HomePath(domid)+"/"+domainTargetKey, strconv.Itoa(holdMaxKB))
	waitFor(t, "the held target back at once", func() bool { return r.g.target() == ack.TargetKB })
	assert.Contains(t, r.logs.String(), "re-announced")
	r.still(ack.TargetKB, "still held after the resume")
}

func TestHoldExpires(t *testing.T) {
	r := startHoldRig(t, nil)
	start := time.Now()
	ack := r.requestHold(time.Second)
	r.still(ack.TargetKB, "held before the timeout")
	waitFor(t, "the hold timed out", func() bool { return r.get(domid, control.KeyHold) == "ended "+ack.Nonce+" timeout" })
	assert.GreaterOrEqual(t, time.Since(start), time.Second)
	waitFor(t, "the policy shrinking again", func() bool { return r.g.target() < ack.TargetKB })
}

func TestHoldBrokenByPressure(t *testing.T) {
	r := startHoldRig(t, nil)
	ack := r.requestHold(time.Minute)
	r.still(ack.TargetKB, "held")
	r.g.setMem(3000, 9000) // MemAvailable below the reserve
	waitFor(t, "memory taken back", func() bool { return r.g.target() > ack.TargetKB })
	waitFor(t, "the hold ended", func() bool { return r.get(domid, control.KeyHold) == "ended "+ack.Nonce+" pressure" })
	assert.Contains(t, r.logs.String(), "ended (pressure)")
	assert.Contains(t, r.logs.String(), "below the")
}

func TestHoldBadSecondsRejected(t *testing.T) {
	r := startHoldRig(t, func(g *guestTree, _ *xenstoretest.Server, sock string) string {
		g.opt.period = time.Hour // only the first step: the target moves for no other reason
		return sock
	})
	before := r.g.target()
	for _, c := range []struct{ nonce, v string }{
		{"b1", "balloon-hold:b1:0"},
		{"b2", "balloon-hold:b2:abc"},
		{"b3", "balloon-hold:b3"},
		{"b4", "balloon-hold:b4:-5"},
	} {
		r.xs.Set(control.Path(domid, control.KeyRequest), c.v)
		waitFor(t, "the ack of "+c.v, func() bool { return strings.HasPrefix(r.get(domid, control.KeyAck), c.nonce+" ") })
		a, err := control.ParseAck(r.get(domid, control.KeyAck))
		require.NoError(t, err)
		assert.False(t, a.OK, c.v)
		assert.Contains(t, a.Err, "bad request", c.v)
		assert.Equal(t, before, a.TargetKB, c.v)
		assert.Equal(t, "", r.get(domid, control.KeyHold), "no hold for %s", c.v)
	}
	assert.Equal(t, before, r.g.target(), "a bad request balloons nothing")

	// Too long is cut to an hour.
	r.xs.Set(control.Path(domid, control.KeyRequest), "balloon-hold:c1:99999")
	waitFor(t, "the ack of c1", func() bool { return strings.HasPrefix(r.get(domid, control.KeyAck), "c1 ") })
	h, err := control.ParseHold(r.get(domid, control.KeyHold))
	require.NoError(t, err)
	assert.True(t, h.Held)
	assert.WithinDuration(t, time.Now().Add(time.Hour), h.Until, 5*time.Second)
}

func TestHoldMemSetStillWins(t *testing.T) {
	r := startHoldRig(t, nil)
	ack := r.requestHold(time.Minute)
	domTarget := control.HomePath(domid) + "/" + domainTargetKey
	// xl mem-set: a new value, which the driver applies.
	r.g.write(r.g.opt.targetPath(), "100000\n")
	r.xs.Set(domTarget, "100000")
	waitFor(t, "the change logged", func() bool { return strings.Contains(r.logs.String(), "changed from 131072 to 100000") })
	r.xs.Set(domTarget, "100000") // and a re-announcement of it
	r.still(100000, "the administrator's target stays, and the hold keeps it")
	assert.True(t, strings.HasPrefix(r.get(domid, control.KeyHold), "held "+ack.Nonce), "still holding")
}

// A migration: the domain comes back as domid 12 with a fresh xenstore
// home; the kernel re-registers the daemon's watches there. The hold
// goes on, the resume's re-announced memory/target is undone at once, and
// a hold-end written to the new home — a request the daemon has never
// seen there — ends the hold.
func TestHoldSurvivesMigration(t *testing.T) {
	const newDomid = 12
	var bus *xenbusProxy
	r := startHoldRig(t, func(g *guestTree, xs *xenstoretest.Server, sock string) string {
		bus = newXenbusProxy(t, sock)
		return bus.path
	})
	ack := r.requestHold(time.Minute)
	r.still(ack.TargetKB, "held")

	// The destination: xl create wrote the configured size.
	r.xs.AddDomain(newDomid, "guest")
	r.xs.Set(control.HomePath(newDomid)+"/"+domainTargetKey, strconv.Itoa(holdMaxKB))
	newSock, err := r.xs.Listen(newDomid)
	require.NoError(t, err)
	// On resume the balloon driver grows the guest back first.
	r.g.write(r.g.opt.targetPath(), strconv.Itoa(holdMaxKB)+"\n")
	bus.migrate(newSock)

	waitFor(t, "the held target back at once", func() bool { return r.g.target() == ack.TargetKB })
	waitFor(t, "the hold in the new home", func() bool { return strings.HasPrefix(r.get(newDomid, control.KeyHold), "held "+ack.Nonce) })
	r.still(ack.TargetKB, "held on the destination")
	_, seen := r.xs.Get(control.Path(newDomid, control.KeyRequest))
	require.False(t, seen, "the new home has no request yet")

	require.NoError(t, control.EndHold(context.Background(), r.dom0(), newDomid, ack.Nonce))
	waitFor(t, "the hold ended", func() bool { return r.get(newDomid, control.KeyHold) == "ended "+ack.Nonce+" dom0" })
	waitFor(t, "the policy shrinking again", func() bool { return r.g.target() < ack.TargetKB })
	waitFor(t, "state in the new home", func() bool { return r.get(newDomid, control.KeyState) == "running" })
}

// xenbusProxy stands between the daemon and the test xenstored like the
// guest kernel's xenbus: migrate waits for requests and transactions in
// flight (as xs_suspend does), switches to a socket of another domid and
// re-registers every watch there (as xs_resume does), each of which fires
// once.
type xenbusProxy struct {
	t    *testing.T
	path string

	mu        sync.Mutex
	cond      *sync.Cond
	front     net.Conn
	fmu       sync.Mutex // writes to front
	back      net.Conn
	migrating bool
	inflight  map[uint32]xenstore.Op // by req id
	txOpen    int
	watches   map[string][]byte // WATCH payloads, by the payload
	swallow   map[uint32]bool   // the proxy's own re-registrations
	nextID    uint32
	wg        sync.WaitGroup
}

func newXenbusProxy(t *testing.T, backend string) *xenbusProxy {
	p := &xenbusProxy{
		t: t, path: filepath.Join(t.TempDir(), "xenbus.sock"),
		inflight: map[uint32]xenstore.Op{}, watches: map[string][]byte{}, swallow: map[uint32]bool{},
		nextID: 0x7fff0000,
	}
	p.cond = sync.NewCond(&p.mu)
	l, err := net.Listen("unix", p.path)
	require.NoError(t, err)
	back, err := net.Dial("unix", backend)
	require.NoError(t, err)
	p.back = back
	wg := &p.wg
	t.Cleanup(func() {
		l.Close()
		p.mu.Lock()
		p.back.Close()
		if p.front != nil {
			p.front.Close()
		}
		p.mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, err := l.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.front = c
		p.mu.Unlock()
		wg.Add(1)
		go func() { defer wg.Done(); p.fromBack(back) }()
		p.fromFront(c)
	}()
	return p
}

func (p *xenbusProxy) fromFront(c net.Conn) {
	for {
		h, payload, err := xenstore.ReadMessage(c)
		if err != nil {
			return
		}
		p.mu.Lock()
		for p.migrating {
			p.cond.Wait()
		}
		switch h.Op {
		case xenstore.OpWatch:
			p.watches[string(payload)] = payload
		case xenstore.OpUnwatch:
			delete(p.watches, string(payload))
		case xenstore.OpTransactionStart:
			p.txOpen++
		}
		p.inflight[h.ReqID] = h.Op
		err = xenstore.WriteMessage(p.back, h, payload)
		p.mu.Unlock()
		if err != nil {
			return
		}
	}
}

func (p *xenbusProxy) fromBack(back net.Conn) {
	for {
		h, payload, err := xenstore.ReadMessage(back)
		if err != nil {
			return
		}
		if h.Op != xenstore.OpWatchEvent {
			p.mu.Lock()
			if p.swallow[h.ReqID] {
				delete(p.swallow, h.ReqID)
				p.mu.Unlock()
				continue
			}
			op := p.inflight[h.ReqID]
			delete(p.inflight, h.ReqID)
			if op == xenstore.OpTransactionEnd || (op == xenstore.OpTransactionStart && h.Op == xenstore.OpError) {
				p.txOpen--
			}
			p.cond.Broadcast()
			p.mu.Unlock()
		}
		p.fmu.Lock()
		err = xenstore.WriteMessage(p.front, h, payload)
		p.fmu.Unlock()
		if err != nil {
			return
		}
	}
}

func (p *xenbusProxy) migrate(backend string) {
	t := p.t
	p.mu.Lock()
	defer p.mu.Unlock()
	p.migrating = true
	for len(p.inflight) > 0 || p.txOpen > 0 {
		p.cond.Wait()
	}
	p.back.Close()
	back, err := net.Dial("unix", backend)
	require.NoError(t, err)
	p.back = back
	for _, w := range p.watches {
		p.nextID++
		p.swallow[p.nextID] = true
		require.NoError(t, xenstore.WriteMessage(back, xenstore.Header{Op: xenstore.OpWatch, ReqID: p.nextID}, w))
	}
	p.wg.Add(1)
	go func() { defer p.wg.Done(); p.fromBack(back) }()
	p.migrating = false
	p.cond.Broadcast()
}
