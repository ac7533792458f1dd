package link

import (
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestParseRate(t *testing.T) {
	good := []struct {
		in   string
		want uint64
	}{
		{"1gbit", 1_000_000_000},
		{"1g", 1_000_000_000},
		{"1G", 1_000_000_000},
		{"10gbit", 10_000_000_000},
		{"100mbit", 100_000_000},
		{"100m", 100_000_000},
		{"500kbit", 500_000},
		{"500k", 500_000},
		{"2.5gbit", 2_500_000_000},
		{" 1gbit ", 1_000_000_000},
		{"1000", 1000},
		{"1000bit", 1000},
		{"1kibit", 1024},
		{"1mibit", 1 << 20},
		{"125mbps", 1_000_000_000}, // bytes per second, as in tc
		{"1kbps", 8000},
		{"1tbit", 1_000_000_000_000},
	}
	for _, tc := range good {
		got, err := ParseRate(tc.in)
		if assert.NoError(t, err, tc.in) {
			assert.Equal(t, tc.want, got, tc.in)
		}
	}
	bad := []struct{ in, msg string }{
		{"", "empty"},
		{"   ", "empty"},
		{"gbit", "no number"},
		{"1xbit", "unknown unit"},
		{"1 gbit", "unknown unit"},
		{"fast", "unknown unit"},
		{"-1gbit", "unknown unit"},
		{"0", "below 1 bit/s"},
		{"0gbit", "below 1 bit/s"},
		{"0.1bit", "below 1 bit/s"},
		{"1.2.3gbit", "not a number"},
		{"99999999999tbit", "too large"},
	}
	for _, tc := range bad {
		_, err := ParseRate(tc.in)
		if assert.Error(t, err, tc.in) {
			assert.Contains(t, err.Error(), tc.msg, tc.in)
		}
	}
}

func TestFormatRateRoundTrips(t *testing.T) {
	for _, r := range []uint64{1, 500_000, 1_000_000_000, 12_345_678_901} {
		got, err := ParseRate(formatRate(r))
		require.NoError(t, err)
		assert.Equal(t, r, got)
	}
}

func TestLoopback(t *testing.T) {
	l := Loopback()
	assert.Zero(t, l.RateBps)
	ln, err := l.ListenDst(0)
	require.NoError(t, err)
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(c, c)
	}()
	c, err := l.DialSrc(ln.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, SetUrgent(c))
	prio, err := sockoptInt(c, unix.SOL_SOCKET, unix.SO_PRIORITY)
	require.NoError(t, err)
	assert.Equal(t, urgentPriority, prio)
	tos, err := sockoptInt(c, unix.IPPROTO_IP, unix.IP_TOS)
	require.NoError(t, err)
	assert.Equal(t, urgentTOS, tos&0xfc)
	nodelay, err := sockoptInt(c, unix.IPPROTO_TCP, unix.TCP_NODELAY)
	require.NoError(t, err)
	assert.NotZero(t, nodelay)
	_, err = c.Write([]byte("ping"))
	require.NoError(t, err)
	buf := make([]byte, 4)
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)
	assert.Equal(t, "ping", string(buf))
	assert.NoError(t, l.Close())
	assert.NoError(t, l.Close())
}

func TestSetUrgentRejectsNonSocket(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	assert.Error(t, SetUrgent(a))
}

func sockoptInt(c net.Conn, level, opt int) (int, error) {
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var v int
	var serr error
	if err := raw.Control(func(fd uintptr) { v, serr = unix.GetsockoptInt(int(fd), level, opt) }); err != nil {
		return 0, err
	}
	return v, serr
}

// requireNetAdmin skips when the hard precondition of the namespace tests
// is missing: CAP_NET_ADMIN and the iproute2 commands.
func requireNetAdmin(t *testing.T) {
	t.Helper()
	if err := Available(); err != nil {
		t.Skipf("needs root (CAP_NET_ADMIN) and iproute2 to create network namespaces: %v", err)
	}
}

func netnsList(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	require.NoError(t, err, string(out))
	return string(out)
}

func setupGbit(t *testing.T) *Link {
	t.Helper()
	l, err := Setup(1_000_000_000)
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, l.Close()) })
	return l
}

func TestSetupAndCloseRemovesNamespaces(t *testing.T) {
	requireNetAdmin(t)
	l, err := Setup(100_000_000)
	require.NoError(t, err)
	list := netnsList(t)
	assert.Contains(t, list, l.SrcNetns)
	assert.Contains(t, list, l.DstNetns)
	assert.Regexp(t, `^xlpc-`+strconv.Itoa(os.Getpid())+`-[0-9]+-src$`, l.SrcNetns)
	assert.Regexp(t, `^10\.213\.[0-9]+\.1$`, l.SrcAddr)

	// The shaping is really installed, at the requested rate, on both ends.
	for _, e := range []struct{ ns, dev string }{{l.SrcNetns, srcDev}, {l.DstNetns, dstDev}} {
		out, err := exec.Command("tc", "-n", e.ns, "qdisc", "show", "dev", e.dev).CombinedOutput()
		require.NoError(t, err, string(out))
		assert.Regexp(t, `qdisc tbf 1: root .*rate 100Mbit`, string(out))
		assert.Contains(t, string(out), "qdisc htb 10: parent 1:1")
	}
	// Nothing leaked into the host namespace.
	out, err := exec.Command("ip", "link", "show").CombinedOutput()
	require.NoError(t, err)
	assert.NotContains(t, string(out), "xlpc-")

	require.NoError(t, l.Close())
	list = netnsList(t)
	assert.NotContains(t, list, l.SrcNetns)
	assert.NotContains(t, list, l.DstNetns)
	assert.NoError(t, l.Close(), "Close must be idempotent")
	_, err = l.ListenDst(0)
	assert.Error(t, err, "the namespace is gone")
}

// TestSetupNeedsNetAdmin drops CAP_NET_ADMIN from the effective set of the
// test's own thread (capabilities are per thread) and checks the message.
func TestSetupNeedsNetAdmin(t *testing.T) {
	requireNetAdmin(t)
	runtime.LockOSThread()
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var saved [2]unix.CapUserData
	require.NoError(t, unix.Capget(&hdr, &saved[0]))
	dropped := saved
	dropped[0].Effective &^= 1 << capNetAdmin
	require.NoError(t, unix.Capset(&hdr, &dropped[0]))
	_, err := Setup(1_000_000_000)
	aerr := Available()
	if rerr := unix.Capset(&hdr, &saved[0]); rerr != nil {
		// Leave the thread locked: the runtime discards it with the goroutine.
		t.Fatalf("restoring capabilities: %v", rerr)
	}
	runtime.UnlockOSThread()
	require.Error(t, err)
	assert.Equal(t, "creating the emulated link needs root (CAP_NET_ADMIN): run as root or drop --link", err.Error())
	assert.Equal(t, err, aerr, "Available says the same before trying")
	assert.NoError(t, Available(), "with the capability back")
}

func TestCleanupStale(t *testing.T) {
	requireNetAdmin(t)
	// A pid that certainly belonged to a process that has exited.
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	dead := cmd.Process.Pid
	require.False(t, pidAlive(dead))

	staleNS := "xlpc-" + strconv.Itoa(dead) + "-1-src"
	mineNS := "xlpc-" + strconv.Itoa(os.Getpid()) + "-999999-dst"
	otherNS := "xlpc-notours"
	for _, ns := range []string{staleNS, mineNS, otherNS} {
		require.NoError(t, run("ip", "netns", "add", ns))
		t.Cleanup(func() { _ = deleteNetns(ns) })
	}
	require.NoError(t, CleanupStale())
	list := netnsList(t)
	assert.NotContains(t, list, staleNS, "dead owner: removed")
	assert.Contains(t, list, mineNS, "live owner: kept")
	assert.Contains(t, list, otherNS, "not our naming scheme: kept")
}

// transfer sends n bytes from src to dst over l and returns the rate seen
// by the receiver in bits per second. cc names the sender's TCP congestion
// control; "" keeps the system default.
func transfer(t testing.TB, l *Link, n int64, cc string) float64 {
	t.Helper()
	ln, err := l.ListenDst(0)
	require.NoError(t, err)
	defer ln.Close()
	type result struct {
		n   int64
		end time.Time
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		got, err := io.Copy(io.Discard, c)
		done <- result{n: got, end: time.Now(), err: err}
	}()
	c, err := l.DialSrc(ln.Addr().String())
	require.NoError(t, err)
	setCongestion(t, c, cc)
	buf := make([]byte, 1<<20)
	start := time.Now()
	for sent := int64(0); sent < n; sent += int64(len(buf)) {
		_, err := c.Write(buf)
		require.NoError(t, err)
	}
	require.NoError(t, c.Close())
	r := <-done
	require.NoError(t, r.err)
	require.Equal(t, n, r.n)
	return float64(n*8) / r.end.Sub(start).Seconds()
}

func TestThroughput1Gbit(t *testing.T) {
	requireNetAdmin(t)
	l := setupGbit(t)
	bps := transfer(t, l, 64<<20, "")
	ratio := bps / float64(l.RateBps)
	t.Logf("64 MiB src→dst: %.1f Mbit/s = %.3f × rate (burst %d B, latency %v)",
		bps/1e6, ratio, l.BurstBytes, l.LatencyBound)
	assert.GreaterOrEqual(t, ratio, 0.80)
	assert.LessOrEqual(t, ratio, 1.05)
}

// TestUrgentLatencyUnderLoad saturates the link with a bulk stream and
// measures small request/response round trips on an urgent and on a plain
// connection, interleaved so both see the same load. It runs with the
// system's congestion control (bbr here, which keeps the queue short) and
// with cubic, which keeps the bulk queue full and so is the harder case.
func TestUrgentLatencyUnderLoad(t *testing.T) {
	requireNetAdmin(t)
	for _, cc := range []string{"", "cubic"} {
		name := "cc=" + cc
		if cc == "" {
			name = "cc=default"
		}
		t.Run(name, func(t *testing.T) { urgentLatency(t, cc) })
	}
}

func setCongestion(t testing.TB, c net.Conn, cc string) {
	t.Helper()
	if cc == "" {
		return
	}
	raw, err := c.(*net.TCPConn).SyscallConn()
	require.NoError(t, err)
	var serr error
	require.NoError(t, raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION, cc)
	}))
	require.NoError(t, serr, "setting congestion control %s", cc)
}

func urgentLatency(t *testing.T, cc string) {
	l := setupGbit(t)
	ln, err := l.ListenDst(0)
	require.NoError(t, err)
	defer ln.Close()

	const msg = 64
	var bulkBytes atomic.Int64
	var wg sync.WaitGroup
	defer wg.Wait()
	// Client connections are closed before wg.Wait (defers run last in,
	// first out) so the server goroutines see EOF and finish.
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// The server: the first byte says what the connection is for.
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				kind := make([]byte, 1)
				if _, err := io.ReadFull(c, kind); err != nil {
					return
				}
				switch kind[0] {
				case 'B':
					buf := make([]byte, 1<<20)
					for {
						n, err := c.Read(buf)
						bulkBytes.Add(int64(n))
						if err != nil {
							return
						}
					}
				case 'U':
					if err := SetUrgent(c); err != nil {
						t.Error(err)
						return
					}
					fallthrough
				case 'P':
					buf := make([]byte, msg)
					for {
						if _, err := io.ReadFull(c, buf); err != nil {
							return
						}
						if _, err := c.Write(buf); err != nil {
							return
						}
					}
				}
			}()
		}
	}()

	dial := func(kind byte) net.Conn {
		c, err := l.DialSrc(ln.Addr().String())
		require.NoError(t, err)
		conns = append(conns, c)
		switch kind {
		case 'U':
			require.NoError(t, SetUrgent(c))
		case 'B':
			setCongestion(t, c, cc)
		}
		_, err = c.Write([]byte{kind})
		require.NoError(t, err)
		return c
	}
	urgent, plain := dial('U'), dial('P')
	bulk := dial('B')
	stop := make(chan struct{})
	bulkDone := make(chan error, 1)
	go func() {
		buf := make([]byte, 1<<20)
		for {
			select {
			case <-stop:
				bulkDone <- nil
				return
			default:
			}
			if _, err := bulk.Write(buf); err != nil {
				bulkDone <- err
				return
			}
		}
	}()
	time.Sleep(300 * time.Millisecond) // let the bulk stream fill the queue

	rtt := func(c net.Conn) time.Duration {
		buf := make([]byte, msg)
		start := time.Now()
		_, err := c.Write(buf)
		require.NoError(t, err)
		_, err = io.ReadFull(c, buf)
		require.NoError(t, err)
		return time.Since(start)
	}
	const rounds = 200
	var u, p []time.Duration
	b0, t0 := bulkBytes.Load(), time.Now()
	for range rounds {
		u = append(u, rtt(urgent))
		p = append(p, rtt(plain))
	}
	bulkBps := float64(bulkBytes.Load()-b0) * 8 / time.Since(t0).Seconds()
	close(stop)
	require.NoError(t, <-bulkDone)
	bulk.Close()

	slices.Sort(u)
	slices.Sort(p)
	pct := func(d []time.Duration, q float64) time.Duration { return d[int(q*float64(len(d)-1))] }
	t.Logf("bulk during measurement: %.1f Mbit/s", bulkBps/1e6)
	t.Logf("urgent RTT p50 %v p99 %v; plain RTT p50 %v p99 %v (%d rounds each)",
		pct(u, 0.5), pct(u, 0.99), pct(p, 0.5), pct(p, 0.99), rounds)
	// Without a saturated link the latency claim would prove nothing.
	assert.Greater(t, bulkBps, 0.7*float64(l.RateBps), "bulk stream did not saturate the link")
	assert.Less(t, pct(u, 0.5), 2*time.Millisecond, "urgent p50 round trip")

	// The urgent packets really went through the urgent band on both ends.
	for _, e := range []struct{ ns, dev string }{{l.SrcNetns, srcDev}, {l.DstNetns, dstDev}} {
		sent := classSentBytes(t, e.ns, e.dev, "10:1")
		assert.GreaterOrEqual(t, sent, int64(rounds*msg), "bytes through the urgent class on %s", e.dev)
	}
}

var classSent = regexp.MustCompile(`Sent ([0-9]+) bytes`)

func classSentBytes(t *testing.T, ns, dev, classid string) int64 {
	t.Helper()
	out, err := exec.Command("tc", "-n", ns, "-s", "class", "show", "dev", dev, "classid", classid).CombinedOutput()
	require.NoError(t, err, string(out))
	m := classSent.FindStringSubmatch(string(out))
	require.NotNil(t, m, "no statistics for class %s on %s: %s", classid, dev, out)
	n, err := strconv.ParseInt(m[1], 10, 64)
	require.NoError(t, err)
	return n
}
