package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Up-front checks of the size, duration and count flags of the lab
// commands (`lab migrate`, `bench`, `lab trace`). Every check ends in the
// same kind of usage error, which names the flag, the value as given and
// the accepted range (and, for memory, where the limit comes from), and is
// raised before anything starts: no namespace, no child process.

// labPageSize is the lab domain's page size; memory sizes must be whole
// pages of it.
const labPageSize = 4096

// labMinPages is the smallest lab domain (lab.Config.Validate).
const labMinPages = 16

// plainSize is what a size flag may look like: a plain decimal number and
// an optional binary unit. parseSize alone (strconv.ParseFloat) would also
// take "NaN", "Inf", "0x10" and "1e3".
var plainSize = regexp.MustCompile(`^\s*[0-9]+(\.[0-9]+)?[kKmMgGtT]?[iI]?[bB]?\s*$`)

// rangeError is the one message every failed check prints:
//
//	--FLAG VALUE: PROBLEM: want LO to HI[; WHY]
func rangeError(flag, value, problem, lo, hi, why string) error {
	msg := fmt.Sprintf("--%s %s: %s: want %s to %s", flag, value, problem, lo, hi)
	if why != "" {
		msg += "; " + why
	}
	return usagef("%s", msg)
}

// checkRange checks lo <= v <= hi for one flag; show renders a value the
// way the user would type it, why (if not empty) says where a limit comes
// from.
func checkRange[T int | int64 | uint64 | time.Duration](flag string, v, lo, hi T, show func(T) string, why string) error {
	switch {
	case v < lo:
		return rangeError(flag, show(v), "too small", show(lo), show(hi), why)
	case v > hi:
		return rangeError(flag, show(v), "too large", show(lo), show(hi), why)
	}
	return nil
}

// checkCount checks an integer flag.
func checkCount(flag string, v, lo, hi int) error {
	return checkRange(flag, v, lo, hi, strconv.Itoa, "")
}

// checkDuration checks a duration flag.
func checkDuration(flag string, v, lo, hi time.Duration) error {
	return checkRange(flag, v, lo, hi, time.Duration.String, "")
}

// checkSize parses a size flag and checks it lies in lo..hi (why says
// where hi comes from). With pages set the size must also be a whole
// number of lab pages; the message then gives the two nearest sizes that
// are, rather than rounding behind the user's back.
func checkSize(flag, value string, lo, hi uint64, pages bool, why string) (uint64, error) {
	if !plainSize.MatchString(value) {
		return 0, rangeError(flag, strconv.Quote(value), "not a size (a plain number with an optional K/M/G/T suffix, e.g. 256M)",
			showSize(lo), showSize(hi), why)
	}
	v, err := parseSize(value)
	if err != nil || v > hi {
		// parseSize fails only beyond its 64 TiB ceiling.
		return 0, rangeError(flag, value, "too large", showSize(lo), showSize(hi), why)
	}
	if v < lo {
		return 0, rangeError(flag, value, "too small", showSize(lo), showSize(hi), why)
	}
	if pages && v%labPageSize != 0 {
		down, up := v/labPageSize*labPageSize, (v/labPageSize+1)*labPageSize
		return 0, usagef("--%s %s: %d bytes is not a whole number of %d KiB pages: use %s or %s",
			flag, value, v, labPageSize>>10, showSize(down), showSize(up))
	}
	return v, nil
}

// showSize renders a size so that it can be typed back as a size flag
// (with the largest unit that divides it), followed by a rounded reading
// in GiB when that unit is smaller.
func showSize(v uint64) string {
	if v == 0 {
		return "0"
	}
	for _, u := range []struct {
		suffix string
		size   uint64
	}{{"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}} {
		if v%u.size == 0 {
			s := strconv.FormatUint(v/u.size, 10) + u.suffix
			if v >= 1<<30 && u.size < 1<<30 {
				s += " (" + fmtBytes(v) + ")"
			}
			return s
		}
	}
	return strconv.FormatUint(v, 10) + " bytes"
}

// hostMemory is what the lab may use on this host: MemAvailable from
// /proc/meminfo, or the room left under this process's cgroup memory
// limit if that is less. It is a variable so that tests can pose as a
// smaller host.
var hostMemory = readHostMemory

// memHeadroom is what the lab leaves to everything else on the host: a
// tenth of what is available, at least 256 MiB.
func memHeadroom(avail uint64) uint64 { return max(avail/10, 256<<20) }

// maxLabMem is the largest --mem this host can give, and why. The source
// and the destination lab guests each hold a full copy of the guest
// memory (until the source is destroyed at the end), so the lab needs
// about twice --mem.
func maxLabMem() (uint64, string) {
	avail, from, err := hostMemory()
	if err != nil {
		// Not knowing is no reason to refuse; the guests' own mmap then
		// fails if the memory is not there.
		return 1 << 46, "the most the lab supports; this host's free memory is unknown: " + err.Error()
	}
	head := memHeadroom(avail)
	var limit uint64
	if avail > head {
		limit = (avail - head) / 2 &^ (1<<20 - 1) // whole MiB
	}
	return limit, fmt.Sprintf("%s is the most this host can give: the lab needs about 2× --mem, because the source and the destination each hold a full copy of the guest memory, "+
		"and this host has %s available (%s), less %s of headroom", strings.Fields(showSize(limit))[0], fmtBytes(avail), from, fmtBytes(head))
}

// readHostMemory reads MemAvailable and the cgroup limit.
func readHostMemory() (uint64, string, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		var si unix.Sysinfo_t
		if serr := unix.Sysinfo(&si); serr != nil {
			return 0, "", fmt.Errorf("reading /proc/meminfo: %v; sysinfo: %v", err, serr)
		}
		return (uint64(si.Freeram) + uint64(si.Bufferram)) * uint64(si.Unit), "free and buffer RAM from sysinfo", nil
	}
	defer f.Close()
	avail, err := parseMemAvailable(f)
	if err != nil {
		return 0, "", err
	}
	from := "MemAvailable in /proc/meminfo"
	if room, ok := cgroupRoom(); ok && room < avail {
		avail, from = room, "left under this process's cgroup memory limit"
	}
	return avail, from, nil
}

// parseMemAvailable returns the MemAvailable line of /proc/meminfo in bytes.
func parseMemAvailable(r io.Reader) (uint64, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || k != "MemAvailable" {
			continue
		}
		kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/meminfo: bad MemAvailable line %q", sc.Text())
		}
		return kb << 10, nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("reading /proc/meminfo: %w", err)
	}
	return 0, fmt.Errorf("/proc/meminfo has no MemAvailable line")
}

// cgroupRoom is limit minus usage of the cgroup this process is in, as seen
// at the root of its cgroup namespace (v2, then v1); ok is false without a
// limit.
func cgroupRoom() (uint64, bool) {
	for _, p := range [][2]string{
		{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"},
		{"/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"},
	} {
		limit, err1 := readUintFile(p[0])
		used, err2 := readUintFile(p[1])
		if err1 != nil || err2 != nil || limit >= 1<<60 { // "max", or v1's "unlimited"
			continue
		}
		if used >= limit {
			return 0, true
		}
		return limit - used, true
	}
	return 0, false
}

func readUintFile(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
}
