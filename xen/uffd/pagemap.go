package uffd

import (
	"errors"
	"fmt"
	"strconv"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Region is the byte range [Start, End) of one run of pages.
type Region struct {
	Start, End uint64
}

// Pages returns the number of pages in r.
func (r Region) Pages() int { return int((r.End - r.Start) / uint64(pageSize)) }

// defaultVecLen is how many page_region records one PAGEMAP_SCAN call may
// return (24 bytes each); a scan that finds more just loops.
const defaultVecLen = 1024

// Pagemap is an open /proc/<pid>/pagemap, used for the PAGEMAP_SCAN ioctl.
// The kernel binds the file to the process's address space when it is
// opened, so a Pagemap keeps following that process until Close.
type Pagemap struct {
	mu  sync.Mutex // serialises vec
	fd  int
	pid int
	vec []pageRegion
	// calls counts PAGEMAP_SCAN ioctls, for tests of the continuation loop.
	calls int
}

// OpenPagemap opens /proc/<pid>/pagemap; pid 0 means the calling process.
// Scanning another process needs ptrace access to it (root, or same user
// and a permissive Yama ptrace_scope).
func OpenPagemap(pid int) (*Pagemap, error) {
	name := "/proc/self/pagemap"
	if pid != 0 {
		name = "/proc/" + strconv.Itoa(pid) + "/pagemap"
	}
	fd, err := unix.Open(name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w (does the process exist, and may we ptrace it?)", name, err)
	}
	return &Pagemap{fd: fd, pid: pid, vec: make([]pageRegion, defaultVecLen)}, nil
}

// Close closes the pagemap file.
func (p *Pagemap) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fd < 0 {
		return nil
	}
	err := unix.Close(p.fd)
	p.fd = -1
	if err != nil {
		return fmt.Errorf("close pagemap of pid %d: %w", p.pid, err)
	}
	return nil
}

// ScanWritten appends to out the runs of pages in [start, end) written since
// they were last write-protected (PAGEMAP_SCAN, category PAGE_IS_WRITTEN),
// in address order with adjacent runs merged, and returns the extended
// slice. With clean, the reported pages are write-protected again in the
// same walk, so the next scan reports only pages written after this one; no
// write can fall between the report and the re-protection.
//
// The range must lie in memory registered with RegisterWP on a userfaultfd
// opened with FeatureWPAsync|FeatureWPUnpopulated (PM_SCAN_CHECK_WPASYNC: the
// scan fails with EPERM otherwise). Unmapped holes in the range are skipped.
func (p *Pagemap) ScanWritten(start, end uintptr, clean bool, out []Region) ([]Region, error) {
	flags := uint64(pmScanCheckWPAsync)
	if clean {
		flags |= pmScanWPMatching
	}
	return p.scan(start, end, flags, PageIsWritten, PageIsWritten, out)
}

// Scan appends to out the runs of pages in [start, end) whose page
// categories (PageIs* bits), restricted to mask, equal want, in address
// order with adjacent runs merged; e.g. mask PageIsPFNZero and want 0 finds
// the pages not mapped to the shared zero page. It changes nothing and
// works on any memory. Unmapped holes have the categories the kernel gives
// them: none, or on WP_ASYNC-tracked memory PageIsWPAllowed|PageIsWritten
// (measured on Linux 6.18, see TestWPAsyncOnMissingMemory).
func (p *Pagemap) Scan(start, end uintptr, mask, want uint64, out []Region) ([]Region, error) {
	if mask == 0 {
		return out, errors.New("PAGEMAP_SCAN: empty category mask")
	}
	return p.scan(start, end, 0, mask, want&mask, out)
}

// scan runs PAGEMAP_SCAN over [start, end) for the pages whose categories
// under mask equal want, looping until the walk reaches end.
func (p *Pagemap) scan(start, end uintptr, flags, mask, want uint64, out []Region) ([]Region, error) {
	if start%pageSize != 0 || end%pageSize != 0 || end < start {
		return out, fmt.Errorf("PAGEMAP_SCAN: range [%#x,%#x) is not page-aligned", start, end)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fd < 0 {
		return out, fmt.Errorf("PAGEMAP_SCAN on pid %d: %w", p.pid, ErrClosed)
	}
	for cur := uint64(start); cur < uint64(end); {
		arg := pmScanArg{
			size:             pmScanArgLen,
			flags:            flags,
			start:            cur,
			end:              uint64(end),
			vec:              unsafe.Pointer(&p.vec[0]),
			vecLen:           uint64(len(p.vec)),
			categoryInverted: mask &^ want,
			categoryMask:     mask,
			returnMask:       mask,
		}
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(p.fd), ioctlPagemapScan, uintptr(unsafe.Pointer(&arg)))
		if errno != 0 {
			return out, scanError(p.pid, cur, uint64(end), errno)
		}
		n := int(r)
		if n > len(p.vec) {
			return out, fmt.Errorf("PAGEMAP_SCAN on pid %d: kernel returned %d regions for a %d-entry buffer", p.pid, n, len(p.vec))
		}
		p.calls++
		out = appendRegions(out, p.vec[:n])
		if arg.walkEnd <= cur {
			return out, fmt.Errorf("PAGEMAP_SCAN on pid %d: no progress at %#x (walk_end %#x)", p.pid, cur, arg.walkEnd)
		}
		cur = arg.walkEnd
	}
	return out, nil
}

// appendRegions appends the kernel's regions to out, merging a region that
// starts where the previous one ends. The kernel merges within one call; a
// run can still be split across calls when a call stops at its end (e.g. a
// VMA boundary between two VMAs of the same tracked mapping).
func appendRegions(out []Region, vec []pageRegion) []Region {
	for _, pr := range vec {
		if l := len(out); l > 0 && out[l-1].End == pr.start {
			out[l-1].End = pr.end
		} else {
			out = append(out, Region{Start: pr.start, End: pr.end})
		}
	}
	return out
}

func scanError(pid int, start, end uint64, errno unix.Errno) error {
	var hint string
	switch {
	case errors.Is(errno, unix.EPERM):
		hint = " (part of the range is not tracked: Open the userfaultfd with FeatureWPAsync|FeatureWPUnpopulated and Register it with RegisterWP)"
	case errors.Is(errno, unix.ENOTTY), errors.Is(errno, unix.EINVAL):
		hint = " (PAGEMAP_SCAN needs Linux 6.7 or newer, running " + kernelRelease() + ")"
	case errors.Is(errno, unix.ESRCH):
		hint = " (the process has exited)"
	}
	return fmt.Errorf("PAGEMAP_SCAN on pid %d [%#x,%#x): %w%s", pid, start, end, errno, hint)
}
