package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"os"
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
	"github.com/xl-postcopy/xl-postcopy/xen/xenstore/xenstoretest"
)

const domid = 7

// guestTree is a temp dir standing in for a guest's /proc and /sys.
type guestTree struct {
	t          *testing.T
	proc, sys  string
	opt        options
	driverStop chan struct{}
	driverDone chan struct{}
}

func newGuestTree(t *testing.T, targetKB, freeKB, availKB uint64) *guestTree {
	root := t.TempDir()
	g := &guestTree{t: t, proc: filepath.Join(root, "proc"), sys: filepath.Join(root, "sys")}
	require.NoError(t, os.MkdirAll(filepath.Join(g.proc, "pressure"), 0o755))
	g.opt = options{
		period: 20 * time.Millisecond, heartbeat: time.Hour, settleTimeout: 2 * time.Second,
		procRoot: g.proc, sysRoot: g.sys, reserveFrac: -1, floorFrac: -1,
	}
	require.NoError(t, os.MkdirAll(filepath.Dir(g.opt.currentPath()), 0o755))
	g.setMem(freeKB, availKB)
	g.write(filepath.Join(g.proc, "pressure", "memory"),
		"some avg10=0.00 avg60=0.00 avg300=0.00 total=1000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=100\n")
	g.write(g.opt.targetPath(), fmt.Sprintf("%d\n", targetKB))
	g.write(g.opt.currentPath(), fmt.Sprintf("%d\n", targetKB))
	return g
}

func (g *guestTree) write(path, s string) {
	require.NoError(g.t, os.WriteFile(path, []byte(s), 0o644))
}

func (g *guestTree) setMem(freeKB, availKB uint64) {
	g.write(filepath.Join(g.proc, "meminfo"), fmt.Sprintf(
		"MemTotal:         104300 kB\nMemFree:        %8d kB\nMemAvailable:   %8d kB\nCached:            20000 kB\n", freeKB, availKB))
}

// target reads target_kb. A regular file standing in for the sysfs one can
// be caught empty between the daemon's truncate and write: read again.
func (g *guestTree) target() uint64 {
	var err error
	for i := 0; i < 100; i++ {
		var v uint64
		if v, err = readKB(g.opt.targetPath()); err == nil {
			return v
		}
		time.Sleep(time.Millisecond)
	}
	require.NoError(g.t, err)
	return 0
}

// startDriver plays the balloon driver: after a short delay the memory
// held (current_kb) follows target_kb.
func (g *guestTree) startDriver() {
	g.driverStop, g.driverDone = make(chan struct{}), make(chan struct{})
	targetPath, currentPath := g.opt.targetPath(), g.opt.currentPath()
	go func() {
		defer close(g.driverDone)
		for {
			select {
			case <-g.driverStop:
				return
			case <-time.After(30 * time.Millisecond):
			}
			if t, err := readKB(targetPath); err == nil {
				os.WriteFile(currentPath, []byte(strconv.FormatUint(t, 10)+"\n"), 0o644)
			}
		}
	}()
	g.t.Cleanup(func() { close(g.driverStop); <-g.driverDone })
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func newXenstore(t *testing.T) (*xenstoretest.Server, string) {
	s := xenstoretest.New(t.TempDir())
	t.Cleanup(func() { s.Close() })
	s.AddDomain(domid, "guest")
	path, err := s.Listen(domid)
	require.NoError(t, err)
	return s, path
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestDaemonShrinksAnswersRequestAndRestores(t *testing.T) {
	const maxKB = 131072
	g := newGuestTree(t, maxKB, 61000, 81500)
	g.startDriver()
	xs, sock := newXenstore(t)
	g.opt.xenstorePath = sock

	var logs syncBuf
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, g.opt, slog.New(slog.NewTextHandler(&logs, nil)), &logs) }()

	cfg := dsb.DefaultConfig(maxKB)
	// Idle: the first period gives back one step, and publishes it.
	waitFor(t, "a shrink step", func() bool { return g.target() < maxKB })
	assert.Equal(t, uint64(maxKB)-cfg.ShrinkStepKB(), g.target(), "one bounded step")
	waitFor(t, "published state", func() bool {
		v, _ := xs.Get(control.Path(domid, control.KeyState))
		return v == "running"
	})
	v, _ := xs.Get(control.Path(domid, control.KeyReserve))
	assert.Equal(t, strconv.FormatUint(cfg.ReserveKB(), 10), v)
	v, _ = xs.Get(control.Path(domid, control.KeyMax))
	assert.Equal(t, "131072", v)

	// dom0 asks for a balloon now, through the real dom0 helper.
	dom0, err := xs.Dial(0)
	require.NoError(t, err)
	defer dom0.Close()
	ack, err := control.RequestBalloon(context.Background(), dom0, domid, 5*time.Second)
	require.NoError(t, err, "logs:\n%s", logs.String())
	require.True(t, ack.OK, "ack error %q", ack.Err)
	// Everything available above the reserve, at once, not above the floor.
	assert.Equal(t, cfg.FloorKB(), ack.TargetKB)
	assert.Equal(t, ack.TargetKB, g.target(), "target_kb written")
	assert.Greater(t, ack.ReleasedKB, uint64(0))
	v, _ = xs.Get(control.Path(domid, control.KeyAck))
	assert.Equal(t, ack.String(), v)

	// Memory pressure: the next period takes memory back at once.
	g.setMem(3000, 9000)
	waitFor(t, "growth under pressure", func() bool { return g.target() > cfg.FloorKB() })
	// At least the deficit plus a reserve in one period (a second period
	// under the same pressure may already have grown it further).
	assert.GreaterOrEqual(t, g.target(), min(cfg.FloorKB()+cfg.ReserveKB()-9000+cfg.ReserveKB(), maxKB))

	cancel()
	require.NoError(t, <-done)
	assert.Equal(t, uint64(maxKB), g.target(), "stopping restores the original target")
	v, _ = xs.Get(control.Path(domid, control.KeyState))
	assert.Equal(t, "stopped", v)
}

func TestDaemonIgnoresAnsweredRequestAfterRestart(t *testing.T) {
	g := newGuestTree(t, 131072, 15000, 16384) // available exactly the reserve: nothing to give
	xs, sock := newXenstore(t)
	g.opt.xenstorePath = sock
	xs.Set(control.Path(domid, control.KeyRequest), control.FormatRequest("old"))
	xs.Set(control.Path(domid, control.KeyAck), "old 100000 ok")

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	var logs syncBuf
	go func() { done <- run(ctx, g.opt, slog.New(slog.NewTextHandler(&logs, nil)), &logs) }()
	waitFor(t, "state", func() bool { v, _ := xs.Get(control.Path(domid, control.KeyState)); return v == "running" })
	time.Sleep(50 * time.Millisecond)
	v, _ := xs.Get(control.Path(domid, control.KeyAck))
	assert.Equal(t, "old 100000 ok", v, "an answered request is not answered twice")

	// A pending one written before the daemon's watch fires is answered.
	xs.Set(control.Path(domid, control.KeyRequest), control.FormatRequest("new1"))
	waitFor(t, "ack", func() bool { v, _ := xs.Get(control.Path(domid, control.KeyAck)); return strings.HasPrefix(v, "new1 ") })
	v, _ = xs.Get(control.Path(domid, control.KeyAck))
	a, err := control.ParseAck(v)
	require.NoError(t, err)
	assert.True(t, a.OK)
	assert.Equal(t, uint64(131072), a.TargetKB, "free memory within the reserve: nothing given")
	cancel()
	require.NoError(t, <-done)
}

func TestDaemonSettleTimeoutIsReported(t *testing.T) {
	g := newGuestTree(t, 131072, 61000, 81500) // no driver: current_kb never moves
	g.opt.settleTimeout = 100 * time.Millisecond
	g.opt.period = time.Hour
	xs, sock := newXenstore(t)
	g.opt.xenstorePath = sock
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	var logs syncBuf
	go func() { done <- run(ctx, g.opt, slog.New(slog.NewTextHandler(&logs, nil)), &logs) }()
	dom0, err := xs.Dial(0)
	require.NoError(t, err)
	defer dom0.Close()
	ack, err := control.RequestBalloon(context.Background(), dom0, domid, 5*time.Second)
	require.NoError(t, err)
	assert.False(t, ack.OK)
	assert.Contains(t, ack.Err, "has not reached its")
	cancel()
	require.NoError(t, <-done)
}

func TestOnceDryRun(t *testing.T) {
	g := newGuestTree(t, 131072, 61000, 81500)
	g.opt.once, g.opt.dryRun = true, true
	var out syncBuf
	require.NoError(t, run(context.Background(), g.opt, slog.New(slog.NewTextHandler(&out, nil)), &out))
	assert.Equal(t, uint64(131072), g.target(), "dry run writes nothing")
	assert.Contains(t, out.String(), "shrink target 131072 -> 122880 kB")
}

func TestOnceWritesTarget(t *testing.T) {
	g := newGuestTree(t, 131072, 61000, 81500)
	_, sock := newXenstore(t)
	g.opt.xenstorePath, g.opt.once = sock, true
	var out syncBuf
	require.NoError(t, run(context.Background(), g.opt, slog.New(slog.NewTextHandler(&out, nil)), &out))
	assert.Equal(t, uint64(122880), g.target())
}

func TestKpageflagsPublished(t *testing.T) {
	g := newGuestTree(t, 131072, 61000, 81500)
	xs, sock := newXenstore(t)
	g.opt.xenstorePath, g.opt.once, g.opt.kpageflags = sock, true, true
	var b []byte
	for _, w := range []uint64{1 << dsb.KPFPgtable, 1 << dsb.KPFBuddy, 0, 1 << dsb.KPFSlab} {
		b = binary.LittleEndian.AppendUint64(b, w)
	}
	g.write(g.opt.kpageflagsPath(), string(b))
	var out syncBuf
	require.NoError(t, run(context.Background(), g.opt, slog.New(slog.NewTextHandler(&out, nil)), &out))
	v, ok := xs.Get(control.Path(domid, control.KeyPages))
	require.True(t, ok)
	assert.Equal(t, "other=1 nopage=0 offline=0 free=1 pagetable=1 slab=1 anon=0 lru=0", v)
}

func TestErrors(t *testing.T) {
	g := newGuestTree(t, 131072, 61000, 81500)
	require.NoError(t, os.Remove(g.opt.targetPath()))
	err := run(context.Background(), g.opt, slog.New(slog.NewTextHandler(&syncBuf{}, nil)), &syncBuf{})
	assert.ErrorContains(t, err, "no xen-balloon driver")

	g = newGuestTree(t, 131072, 61000, 81500)
	g.opt.xenstorePath = filepath.Join(t.TempDir(), "nothing")
	err = run(context.Background(), g.opt, slog.New(slog.NewTextHandler(&syncBuf{}, nil)), &syncBuf{})
	assert.ErrorContains(t, err, "--dry-run")
}

func TestFlags(t *testing.T) {
	assert.Equal(t, 2, realMain([]string{"--period=0"}))
	assert.Equal(t, 2, realMain([]string{"extra"}))
	assert.Equal(t, 0, realMain([]string{"--help"}))
}

// A resume (save/restore or migration) re-fires the memory/target watch
// with the value it had, and the kernel's balloon driver goes back to that
// size: the daemon puts its own target back. A changed value is an
// administrator's, and the daemon leaves it alone from then on.
func TestDaemonReassertsTargetAfterResume(t *testing.T) {
	const maxKB = 131072
	g := newGuestTree(t, maxKB, 61000, 81500)
	g.opt.period = time.Hour // only the first step at start
	xs, sock := newXenstore(t)
	g.opt.xenstorePath = sock
	domTarget := control.HomePath(domid) + "/" + domainTargetKey
	xs.Set(domTarget, strconv.Itoa(maxKB))

	var logs syncBuf
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, g.opt, slog.New(slog.NewTextHandler(&logs, nil)), &logs) }()
	waitFor(t, "a shrink step", func() bool { return g.target() < maxKB })
	own := g.target()
	waitFor(t, "published state", func() bool { v, _ := xs.Get(control.Path(domid, control.KeyState)); return v == "running" })

	// The guest resumed on a new host: the driver re-read memory/target.
	g.write(g.opt.targetPath(), strconv.Itoa(maxKB)+"\n")
	xs.Set(domTarget, strconv.Itoa(maxKB))
	waitFor(t, "the daemon's target back", func() bool { return g.target() == own })
	assert.Contains(t, logs.String(), "re-announced")

	// xl mem-set: a new value, which the driver applies and the daemon keeps.
	g.write(g.opt.targetPath(), "100000\n")
	xs.Set(domTarget, "100000")
	waitFor(t, "the change logged", func() bool { return strings.Contains(logs.String(), "changed from 131072 to 100000") })
	xs.Set(domTarget, "100000") // and a later re-announcement of it
	time.Sleep(100 * time.Millisecond)
	assert.Equal(t, uint64(100000), g.target(), "the administrator's target stays")

	cancel()
	require.NoError(t, <-done)
}
