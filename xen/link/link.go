// Package link builds the emulated network link used by the lab and the
// benchmarks (DESIGN.md §5): two network namespaces joined by a veth pair,
// each end shaped by a tbf qdisc to a given rate, with a strict-priority
// band inside the tbf so that urgent traffic (post-copy demand faults) does
// not queue behind bulk page streaming.
//
// The link is built with the ip and tc commands from iproute2 and needs
// CAP_NET_ADMIN. Runs without --link use Loopback instead, which needs no
// privileges and does not shape.
//
// Queueing layout on each veth end (this kernel has no prio or netem qdisc,
// so the priority band is built from htb and a u32 filter, both of which it
// has):
//
//	tbf 1: rate R burst B latency L         shapes the link
//	└─ htb 10: default 2                    strict priority, never shapes
//	   ├─ class 10:1 prio 0 → pfifo 11:     urgent: IP TOS LOWDELAY (SetUrgent)
//	   └─ class 10:2 prio 1 → bfifo 12:     bulk: everything else,
//	                                        bounded to R·L + B bytes
//
// The htb classes are given twice the link rate so that htb only orders
// packets and the tbf alone decides the rate.
package link

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Names of the veth ends inside their namespaces. They may be equal across
// links because each lives in its own namespace.
const (
	srcDev = "xlpc-src"
	dstDev = "xlpc-dst"
)

// nsPrefix starts the name of every namespace this package creates;
// CleanupStale relies on it and on the owner pid that follows it.
const nsPrefix = "xlpc-"

// dialTimeout bounds DialSrc: a local veth answers in microseconds, so a
// connect that takes longer means nobody is listening.
const dialTimeout = 10 * time.Second

// linkSeq numbers the links of this process; with the pid it makes the
// namespace names unique on the host.
var linkSeq atomic.Uint64

// Link is one emulated link, or the loopback stand-in from Loopback.
// Traffic goes from the src namespace to the dst namespace: the
// destination host of a migration listens with ListenDst, the source dials
// with DialSrc.
type Link struct {
	// RateBps is the shaped rate of each direction in bits per second, 0
	// for the unshaped loopback.
	RateBps uint64
	// SrcAddr and DstAddr are the IP addresses of the two ends.
	SrcAddr, DstAddr string
	// SrcNetns and DstNetns name the namespaces (as `ip netns` knows
	// them) so that a lab script can run tools such as iperf3 inside them
	// with `ip netns exec`. Empty for loopback.
	SrcNetns, DstNetns string

	// BurstBytes and LatencyBound are the tbf parameters in force,
	// recorded so that benchmark reports can state them.
	BurstBytes   uint64
	LatencyBound time.Duration

	loopback bool
	mu       sync.Mutex
	closed   bool
}

// shaping holds the tbf parameters. They are a struct rather than constants
// so the tests can show why the defaults are what they are.
type shaping struct {
	burst   uint64        // bytes
	latency time.Duration // tbf latency, also the bulk queue bound
}

// defaultShaping picks tbf parameters for a rate.
//
// Burst: veth hands tbf GSO super-packets of up to 64 KiB (gso_max_size
// 65536), and tbf must be able to pass one whole, or it segments it in
// software. A bucket of just one such packet leaves the link idle while it
// refills between hrtimer wake-ups: BenchmarkShaping at 1 gbit measured
// 0.70–0.92× rate with 64 KiB, 0.93–0.96× with 128 KiB and 0.956–0.960×
// with 256 KiB or more, for both bbr and cubic (0.956 is the TCP goodput
// of a full 1514-byte frame, the ceiling). Faster links get 2 ms worth of
// bytes so that timer slack does not cost rate.
//
// Latency: 2 ms bounds the bulk queue to R·2ms + B bytes. 1 ms cost cubic
// rate with the smaller bursts; a longer bound only delays bulk traffic,
// since urgent traffic does not wait in that queue.
func defaultShaping(rate uint64) shaping {
	burst := uint64(256 << 10)
	if b := rate / 8 * 2 / 1000; b > burst {
		burst = b
	}
	return shaping{burst: burst, latency: 2 * time.Millisecond}
}

// Setup creates an emulated link shaped to rate bits per second in each
// direction: namespaces xlpc-<pid>-<n>-src and -dst, a veth pair with
// 10.213.<n>.1/30 on the src end and .2 on the dst end, and the queueing
// layout described in the package comment on both ends.
//
// Leftover namespaces of dead processes are removed first (CleanupStale).
// On any error everything created so far is removed again.
func Setup(rate uint64) (*Link, error) {
	return setup(rate, defaultShaping(rate))
}

func setup(rate uint64, sh shaping) (*Link, error) {
	if rate == 0 {
		return nil, errors.New("link rate is 0: give a positive rate such as 1gbit")
	}
	if !hasNetAdmin() {
		return nil, errNeedRoot
	}
	// Stale namespaces have other names than ours and do not disturb this
	// link, so failing to remove them is no reason to refuse the run; the
	// next Setup or an explicit CleanupStale tries again.
	_ = CleanupStale()

	seq := linkSeq.Add(1)
	id := fmt.Sprintf("%d-%d", os.Getpid(), seq)
	n := seq % 256
	l := &Link{
		RateBps:      rate,
		SrcAddr:      fmt.Sprintf("10.213.%d.1", n),
		DstAddr:      fmt.Sprintf("10.213.%d.2", n),
		SrcNetns:     nsPrefix + id + "-src",
		DstNetns:     nsPrefix + id + "-dst",
		BurstBytes:   sh.burst,
		LatencyBound: sh.latency,
	}
	if err := l.build(sh); err != nil {
		if cerr := l.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("removing the half-built link: %w", cerr))
		}
		return nil, fmt.Errorf("setting up the emulated link at %s: %w", formatRate(rate), err)
	}
	return l, nil
}

func (l *Link) build(sh shaping) error {
	for _, ns := range []string{l.SrcNetns, l.DstNetns} {
		if err := run("ip", "netns", "add", ns); err != nil {
			if msg := err.Error(); strings.Contains(msg, "Operation not permitted") ||
				strings.Contains(msg, "Permission denied") {
				return fmt.Errorf("%w: %v", errNeedRoot, err)
			}
			return fmt.Errorf("creating namespace: %w", err)
		}
	}
	// Create each veth end directly inside its namespace so that nothing
	// ever appears in the host's namespace, even for a moment.
	if err := run("ip", "link", "add", srcDev, "netns", l.SrcNetns, "type", "veth",
		"peer", "name", dstDev, "netns", l.DstNetns); err != nil {
		return fmt.Errorf("creating the veth pair: %w", err)
	}
	ends := []struct{ ns, dev, addr string }{
		{l.SrcNetns, srcDev, l.SrcAddr},
		{l.DstNetns, dstDev, l.DstAddr},
	}
	for _, e := range ends {
		cmds := [][]string{
			{"-n", e.ns, "addr", "add", e.addr + "/30", "dev", e.dev},
			{"-n", e.ns, "link", "set", "lo", "up"},
			{"-n", e.ns, "link", "set", e.dev, "up"},
		}
		for _, c := range cmds {
			if err := run("ip", c...); err != nil {
				return fmt.Errorf("configuring %s in %s: %w", e.dev, e.ns, err)
			}
		}
		if err := shape(e.ns, e.dev, l.RateBps, sh); err != nil {
			return fmt.Errorf("shaping %s in %s: %w", e.dev, e.ns, err)
		}
	}
	return nil
}

// urgentPriority is TC_PRIO_INTERACTIVE, the socket priority SetUrgent
// sets.
const urgentPriority = 6

// urgentTOS is IPTOS_LOWDELAY. The urgent band is selected by this TOS value
// rather than by skb->priority because no classifier this kernel has can
// read the priority: there is no prio qdisc (whose priomap would), classic
// BPF has no ancillary load for it, and eBPF would need a program loader
// and a bpffs mount. LOWDELAY is what the kernel itself maps to
// TC_PRIO_INTERACTIVE (rt_tos2priority), so SetUrgent sets both.
const urgentTOS = 0x10

// urgentMatch is the u32 selector for urgentTOS; the mask leaves out the
// two ECN bits, which TCP manages on its own.
var urgentMatch = []string{"u32", "match", "ip", "tos", fmt.Sprintf("%#x", urgentTOS), "0xfc"}

// shape installs the tbf + htb priority layout on one veth end.
func shape(ns, dev string, rate uint64, sh shaping) error {
	r := formatRate(rate)
	htbRate := formatRate(2 * rate)
	latUs := strconv.FormatInt(sh.latency.Microseconds(), 10) + "us"
	bulkLimit := rate/8*uint64(sh.latency.Microseconds())/1e6 + sh.burst
	cmds := [][]string{
		{"qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf",
			"rate", r, "burst", strconv.FormatUint(sh.burst, 10), "latency", latUs},
		{"qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "htb", "default", "2"},
		// quantum is given so htb does not derive a huge one from the
		// rate (and log a warning); with one class per priority it does
		// not otherwise matter.
		{"class", "add", "dev", dev, "parent", "10:", "classid", "10:1", "htb",
			"rate", htbRate, "ceil", htbRate, "prio", "0", "quantum", "200000"},
		{"class", "add", "dev", dev, "parent", "10:", "classid", "10:2", "htb",
			"rate", htbRate, "ceil", htbRate, "prio", "1", "quantum", "200000"},
		{"qdisc", "add", "dev", dev, "parent", "10:1", "handle", "11:", "pfifo", "limit", "1000"},
		{"qdisc", "add", "dev", dev, "parent", "10:2", "handle", "12:", "bfifo",
			"limit", strconv.FormatUint(bulkLimit, 10)},
		append([]string{"filter", "add", "dev", dev, "parent", "10:", "protocol", "ip", "prio", "1"},
			append(urgentMatch, "flowid", "10:1")...),
	}
	for _, c := range cmds {
		if err := run("tc", append([]string{"-n", ns}, c...)...); err != nil {
			return err
		}
	}
	return nil
}

// Close deletes both namespaces; the veth pair goes with them. It is
// idempotent, and safe on a half-built link. Sockets still open in a
// namespace keep the kernel object alive until they are closed, but the
// name is gone at once.
func (l *Link) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || l.loopback {
		l.closed = true
		return nil
	}
	l.closed = true
	var errs []error
	for _, ns := range []string{l.SrcNetns, l.DstNetns} {
		if err := deleteNetns(ns); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// deleteNetns removes a named namespace if it exists.
func deleteNetns(ns string) error {
	if _, err := os.Stat(filepath.Join(netnsDir, ns)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := run("ip", "netns", "del", ns); err != nil {
		return fmt.Errorf("deleting namespace %s (remove it by hand with `ip netns del %s`): %w", ns, ns, err)
	}
	return nil
}

// ListenDst opens a TCP listener on DstAddr:port inside the dst namespace.
// Port 0 picks a free port; the listener's Addr reports it.
func (l *Link) ListenDst(port int) (net.Listener, error) {
	addr := net.JoinHostPort(l.DstAddr, strconv.Itoa(port))
	if l.loopback {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("listening on %s: %w", addr, err)
		}
		return ln, nil
	}
	var ln net.Listener
	err := inNetns(l.DstNetns, func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listening on %s in namespace %s: %w", addr, l.DstNetns, err)
	}
	return ln, nil
}

// DialSrc opens a TCP connection to addr ("host:port") from inside the src
// namespace, typically to the address of a ListenDst listener.
func (l *Link) DialSrc(addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: dialTimeout}
	if l.loopback {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("dialling %s: %w", addr, err)
		}
		return c, nil
	}
	var c net.Conn
	err := inNetns(l.SrcNetns, func() error {
		var err error
		c, err = d.Dial("tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dialling %s from namespace %s: %w", addr, l.SrcNetns, err)
	}
	return c, nil
}

// Loopback returns an unshaped stand-in for runs without --link: ListenDst
// and DialSrc use 127.0.0.1 in the current namespace, Close does nothing
// and RateBps is 0. It needs no privileges.
func Loopback() *Link {
	return &Link{SrcAddr: "127.0.0.1", DstAddr: "127.0.0.1", loopback: true}
}
