// Package dsb is the policy of dynamic self-ballooning (Hines & Gopalan,
// VEE'09): a daemon in the guest hands free memory back to Xen through the
// Linux xen-balloon driver, keeping a reserve, and takes memory back at
// once when the guest comes under memory pressure.
//
// Everything here is pure: parsers over the text of /proc files and a
// state machine fed samples, so the policy can be driven from recorded
// sequences in tests. The daemon (guest-balloon/) does the I/O.
package dsb

import (
	"bufio"
	"fmt"
	"strconv"
	"strings"
)

// Meminfo holds the /proc/meminfo fields the policy uses, in kB (KiB, as
// the kernel prints them). Fields keeps every numeric field by name.
type Meminfo struct {
	MemTotal     uint64
	MemFree      uint64
	MemAvailable uint64
	Buffers      uint64
	Cached       uint64
	SwapCached   uint64
	AnonPages    uint64
	Shmem        uint64
	Slab         uint64
	SReclaimable uint64
	PageTables   uint64
	// AvailableEstimated is set when the kernel had no MemAvailable line
	// (before Linux 3.14) and MemAvailable was estimated from the others.
	AvailableEstimated bool
	Fields             map[string]uint64
}

// ParseMeminfo parses the text of /proc/meminfo. MemTotal and MemFree are
// required; a field with an unparsable number is an error rather than a
// silent zero, because a zero MemFree would make the policy grow the guest.
func ParseMeminfo(text string) (Meminfo, error) {
	m := Meminfo{Fields: map[string]uint64{}}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		name, rest, ok := strings.Cut(line, ":")
		if !ok {
			if strings.TrimSpace(line) == "" {
				continue
			}
			return Meminfo{}, fmt.Errorf("meminfo: line %q has no colon", line)
		}
		f := strings.Fields(rest)
		if len(f) == 0 || len(f) > 2 || (len(f) == 2 && f[1] != "kB") {
			return Meminfo{}, fmt.Errorf("meminfo: line %q is not \"Name: <n> [kB]\"", line)
		}
		v, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			return Meminfo{}, fmt.Errorf("meminfo: %s: %w", name, err)
		}
		m.Fields[name] = v
	}
	for _, req := range []string{"MemTotal", "MemFree"} {
		if _, ok := m.Fields[req]; !ok {
			return Meminfo{}, fmt.Errorf("meminfo: no %s line", req)
		}
	}
	g := func(n string) uint64 { return m.Fields[n] }
	m.MemTotal, m.MemFree = g("MemTotal"), g("MemFree")
	m.Buffers, m.Cached, m.SwapCached = g("Buffers"), g("Cached"), g("SwapCached")
	m.AnonPages, m.Shmem, m.Slab = g("AnonPages"), g("Shmem"), g("Slab")
	m.SReclaimable, m.PageTables = g("SReclaimable"), g("PageTables")
	if v, ok := m.Fields["MemAvailable"]; ok {
		m.MemAvailable = v
	} else {
		// The pre-3.14 estimate: free plus page cache and reclaimable
		// slab, minus shared memory that cannot be dropped.
		est := m.MemFree + m.Cached + m.Buffers + m.SReclaimable
		if est > m.Shmem {
			est -= m.Shmem
		}
		m.MemAvailable = min(est, m.MemTotal)
		m.AvailableEstimated = true
	}
	if m.MemFree > m.MemTotal {
		return Meminfo{}, fmt.Errorf("meminfo: MemFree %d kB exceeds MemTotal %d kB", m.MemFree, m.MemTotal)
	}
	return m, nil
}

// PSILine is one line of a /proc/pressure file: the share of wall time
// (percent) tasks were stalled over 10 s, 60 s and 300 s, and the total
// stall time in microseconds since boot.
type PSILine struct {
	Avg10, Avg60, Avg300 float64
	Total                uint64
}

// PSI is /proc/pressure/memory: "some" (at least one task stalled on
// memory) and "full" (all non-idle tasks stalled).
type PSI struct {
	Some, Full PSILine
	// Valid is false when the kernel gave no PSI (CONFIG_PSI off, or
	// a kernel built default-disabled and booted without psi=1): the
	// policy then relies on MemAvailable.
	Valid bool
}

// ParsePSI parses the text of /proc/pressure/memory. The "full" line is
// optional (the CPU file of older kernels lacks it; the memory file has
// it since PSI exists, but being lenient costs nothing).
func ParsePSI(text string) (PSI, error) {
	var p PSI
	seenSome := false
	for _, line := range strings.Split(strings.TrimSpace(text), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		var dst *PSILine
		switch f[0] {
		case "some":
			dst, seenSome = &p.Some, true
		case "full":
			dst = &p.Full
		default:
			return PSI{}, fmt.Errorf("pressure: unknown line %q", line)
		}
		seen := 0
		for _, kv := range f[1:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return PSI{}, fmt.Errorf("pressure: field %q in %q is not key=value", kv, line)
			}
			var err error
			switch k {
			case "avg10":
				dst.Avg10, err = strconv.ParseFloat(v, 64)
			case "avg60":
				dst.Avg60, err = strconv.ParseFloat(v, 64)
			case "avg300":
				dst.Avg300, err = strconv.ParseFloat(v, 64)
			case "total":
				dst.Total, err = strconv.ParseUint(v, 10, 64)
			default:
				continue
			}
			if err != nil {
				return PSI{}, fmt.Errorf("pressure: %s %s: %w", f[0], k, err)
			}
			seen++
		}
		if seen != 4 {
			return PSI{}, fmt.Errorf("pressure: line %q lacks avg10/avg60/avg300/total", line)
		}
	}
	if !seenSome {
		return PSI{}, fmt.Errorf("pressure: no \"some\" line")
	}
	p.Valid = true
	return p, nil
}
