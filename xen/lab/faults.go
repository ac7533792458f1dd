package lab

import (
	"encoding/binary"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// FaultPoint names a point of the protocol at which a lab migration's
// link is reset (RunConfig.ResetAt): a TCP reset of both connections, the
// first time the source passes the point.
type FaultPoint string

// The fault points, in protocol order. Before GO a reset must leave the
// domain running at the source; from GO on it must be recovered.
const (
	AtSetup       FaultPoint = "setup"           // the source writes DOMAIN_HEADER
	AtCreated     FaultPoint = "after-created"   // the source reads CREATED (the destination domain exists)
	AtPrecopy     FaultPoint = "precopy-round"   // the source writes its first page batch of a pre-copy round (hybrid)
	AtPause       FaultPoint = "pause"           // the source writes SWITCHOVER (paused, core state sent)
	AtReady       FaultPoint = "after-ready"     // the source reads READY (a reset loses it: GO is never sent)
	AtGo          FaultPoint = "right-after-go"  // the source writes GO
	AtResumed     FaultPoint = "after-resumed"   // the source reads RESUMED
	AtFaultReply  FaultPoint = "mid-fault-reply" // the source writes a page batch on the urgent stream (a demand fault's reply)
	AtDone        FaultPoint = "done"            // the source writes DONE (every page sent)
	AtAck         FaultPoint = "ack"             // the source reads ACK (the destination holds and checked every page)
	AtMidPushByte FaultPoint = "mid-push"        // 256 KiB of bulk after GO (RunConfig.ResetAfterGo)
)

// FaultPoints lists the points RunConfig.ResetAt takes, in protocol order.
var FaultPoints = []FaultPoint{AtSetup, AtCreated, AtPrecopy, AtPause, AtReady, AtGo, AtResumed, AtFaultReply, AtMidPushByte, AtDone, AtAck}

// Demand is what a run reset at a point must come to.
type Demand string

// What a reset must come to.
const (
	// DemandRanOn: before GO, the migration fails and the guest runs on
	// at the source.
	DemandRanOn Demand = "runs on at source"
	// DemandRecovered: from GO on, the migration recovers and completes.
	DemandRecovered Demand = "recovered"
	// DemandEither: a reset as SWITCHOVER leaves races
	// the destination's READY and the source's GO: whether the source
	// notices the break before or after it sent GO decides (both are
	// right, and exactly one copy runs either way).
	DemandEither Demand = "either"
	// DemandSurvived: an outage shorter than the timeouts passes
	// unnoticed: the migration completes with no recovery.
	DemandSurvived Demand = "survived"
)

// Fault is what is done to the link at a point.
type Fault struct {
	// Outage is how long the link is down (silent: no FIN, no RST); 0
	// is a TCP reset of both connections instead.
	Outage time.Duration
}

func (f Fault) String() string {
	if f.Outage <= 0 {
		return "reset"
	}
	return "down " + f.Outage.String()
}

// Short says the outage is shorter than linkTimeout, the silence either
// side takes as a broken link: it must pass unnoticed.
func (f Fault) Short(linkTimeout time.Duration) bool {
	return f.Outage > 0 && f.Outage < linkTimeout/2
}

// ParseFaults reads a comma-separated list of faults: "reset" or an
// outage's length ("2s", "60s").
func ParseFaults(s string) ([]Fault, error) {
	var out []Fault
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "reset" {
			out = append(out, Fault{})
			continue
		}
		d, err := time.ParseDuration(f)
		if err != nil || d <= 0 {
			return nil, fmt.Errorf("fault %q: want reset or an outage's length such as 2s or 60s", f)
		}
		out = append(out, Fault{Outage: d})
	}
	return out, nil
}

// DemandFor says what fault f at p must come to, where linkTimeout is
// the silence either side takes as a broken link.
func (p FaultPoint) DemandFor(f Fault, linkTimeout time.Duration) Demand {
	if f.Short(linkTimeout) {
		return DemandSurvived
	}
	return p.Demand()
}

// Demand says what a reset (or an outage long enough to be noticed) at
// p must come to.
func (p FaultPoint) Demand() Demand {
	switch p {
	case AtGo, AtResumed, AtFaultReply, AtDone, AtAck, AtMidPushByte:
		return DemandRecovered
	case AtPause:
		return DemandEither
	}
	return DemandRanOn
}

// ParseFaultPoints reads a comma-separated list of points ("all": every
// one).
func ParseFaultPoints(s string) ([]FaultPoint, error) {
	if s == "all" {
		return append([]FaultPoint(nil), FaultPoints...), nil
	}
	var out []FaultPoint
	for _, f := range strings.Split(s, ",") {
		p := FaultPoint(strings.TrimSpace(f))
		ok := false
		for _, q := range FaultPoints {
			ok = ok || p == q
		}
		if !ok {
			names := make([]string, 0, len(FaultPoints))
			for _, q := range FaultPoints {
				names = append(names, string(q))
			}
			sort.Strings(names)
			return nil, fmt.Errorf("fault point %q: want one of %s or all", p, strings.Join(names, ", "))
		}
		out = append(out, p)
	}
	return out, nil
}

// pointOf maps a record the source writes (out) or reads on the bulk or
// urgent stream to the point it marks; afterGo says GO was sent.
func pointOf(urgent, out bool, t wire.Type, afterGo bool) (FaultPoint, bool) {
	switch {
	case urgent && out && t == wire.TypePageBatch && afterGo:
		return AtFaultReply, true
	case urgent:
		return "", false
	case out && t == wire.TypeDomainHeader:
		return AtSetup, true
	case !out && t == wire.TypeCreated:
		return AtCreated, true
	case out && t == wire.TypePageBatch && !afterGo:
		return AtPrecopy, true
	case out && t == wire.TypeSwitchover:
		return AtPause, true
	case !out && t == wire.TypeReady:
		return AtReady, true
	case out && t == wire.TypeGo:
		return AtGo, true
	case !out && t == wire.TypeResumed:
		return AtResumed, true
	case out && t == wire.TypeDone:
		return AtDone, true
	case !out && t == wire.TypeAck:
		return AtAck, true
	}
	return "", false
}

// recTap follows the record boundaries of one direction of a stream (the
// 16-byte stream header, then records of an 8-byte header, a body padded
// to 8 bytes and an 8-byte trailer) from the bytes as they pass, without
// buffering them.
type recTap struct {
	skip int // bytes of the stream header or of the current record left
	hdr  [8]byte
	hn   int
}

func newRecTap() *recTap { return &recTap{skip: wire.HeaderSize} }

// feed passes b through the tap, calling f with the type of each record
// whose header is complete.
func (p *recTap) feed(b []byte, f func(wire.Type)) {
	for len(b) > 0 {
		if p.skip > 0 {
			n := min(p.skip, len(b))
			p.skip -= n
			b = b[n:]
			continue
		}
		n := copy(p.hdr[p.hn:], b)
		p.hn += n
		b = b[n:]
		if p.hn < len(p.hdr) {
			return
		}
		p.hn = 0
		body := int(binary.LittleEndian.Uint32(p.hdr[4:]))
		p.skip = body + (-body)&7 + 8
		f(wire.Type(binary.LittleEndian.Uint32(p.hdr[0:])))
	}
}
