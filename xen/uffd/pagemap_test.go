package uffd

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func memAddr(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

// pagesOf turns regions into page indexes relative to base, which also
// checks that every region is page-aligned and inside [base, base+n pages).
func pagesOf(t *testing.T, regs []Region, base uintptr, n int) []int {
	t.Helper()
	ps := uint64(PageSize())
	var pages []int
	for i, r := range regs {
		if r.Start%ps != 0 || r.End%ps != 0 || r.End <= r.Start {
			t.Fatalf("region %d [%#x,%#x) is not a non-empty page-aligned range", i, r.Start, r.End)
		}
		if r.Start < uint64(base) || r.End > uint64(base)+uint64(n)*ps {
			t.Fatalf("region %d [%#x,%#x) outside the scanned memory", i, r.Start, r.End)
		}
		if i > 0 && r.Start <= regs[i-1].End {
			t.Fatalf("regions %d and %d overlap, touch or are out of order: %v", i-1, i, regs)
		}
		for a := r.Start; a < r.End; a += ps {
			pages = append(pages, int((a-uint64(base))/ps))
		}
	}
	return pages
}

func wantPages(t *testing.T, what string, got []int, want ...int) {
	t.Helper()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("%s: written pages %v, want %v", what, got, want)
	}
}

// TestScanWrittenCrossProcess is the migration engine's situation: the
// memory and its WP_ASYNC tracking live in a child; we scan the child's
// /proc/<pid>/pagemap and clean it from here.
func TestScanWrittenCrossProcess(t *testing.T) {
	c := startChild(t, "wp")
	pm, err := OpenPagemap(c.cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	start, end := c.base, c.base+uintptr(c.n*PageSize())
	scan := func(what string, clean bool, want ...int) {
		t.Helper()
		regs, err := pm.ScanWritten(start, end, clean, nil)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		wantPages(t, what, pagesOf(t, regs, c.base, c.n), want...)
	}

	scan("fresh, prefilled pages 0-63 and untouched pages", false)
	c.write(3, 4, 5, 10, 100, 255) // 3-10 were populated before tracking, 100 and 255 never
	scan("after writes", false, 3, 4, 5, 10, 100, 255)
	scan("scan without clean does not reset", false, 3, 4, 5, 10, 100, 255)
	scan("clean scan reports", true, 3, 4, 5, 10, 100, 255)
	scan("after clean", false)
	c.write(4, 7, 100)
	scan("only new writes", true, 4, 7, 100)
	scan("after second clean", false)

	// A tiny output buffer forces the kernel to stop early; ScanWritten
	// must loop to the end of the range.
	pm.vec = make([]pageRegion, 2)
	calls := pm.calls
	var odd []int
	for p := 21; p < 200; p += 2 {
		odd = append(odd, p)
	}
	c.write(odd...)
	c.write(230, 231, 232, 233, 234, 235)
	want := append(append([]int{}, odd...), 230, 231, 232, 233, 234, 235)
	regs, err := pm.ScanWritten(start, end, true, nil)
	if err != nil {
		t.Fatal(err)
	}
	wantPages(t, "many regions, 2-entry buffer", pagesOf(t, regs, c.base, c.n), want...)
	if len(regs) != len(odd)+1 {
		t.Errorf("got %d regions, want %d (the run 230-235 as one)", len(regs), len(odd)+1)
	}
	if n := pm.calls - calls; n < len(regs)/2 {
		t.Errorf("%d regions came back from %d PAGEMAP_SCAN calls with a 2-entry buffer", len(regs), n)
	}
	scan("after clean with small buffer", false)

	// out is appended to, not overwritten.
	c.write(1)
	prev := []Region{{Start: 1, End: 2}}
	regs, err = pm.ScanWritten(start, end, true, prev)
	if err != nil {
		t.Fatal(err)
	}
	if len(regs) != 2 || regs[0] != prev[0] || regs[1].Start != uint64(c.base)+uint64(PageSize()) {
		t.Errorf("ScanWritten with a non-empty out = %v, want the old region then page 1", regs)
	}
	c.quit()

	// The process is gone: the scan must fail, not report nothing.
	if _, err := pm.ScanWritten(start, end, false, nil); err == nil {
		t.Error("ScanWritten of an exited process succeeded")
	}
}

// TestScanWrittenSelf runs the tracking cycle in this process (pid 0), and
// checks that untracked memory is refused rather than reported as written.
func TestScanWrittenSelf(t *testing.T) {
	const pages = 32
	mem, base, err := childMem(pages)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	length := uintptr(len(mem))
	pm, err := OpenPagemap(0)
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()

	if _, err := pm.ScanWritten(base, base+length, false, nil); !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), "FeatureWPAsync") {
		t.Fatalf("scan of untracked memory: err %v, want EPERM with a hint", err)
	}
	if _, err := pm.ScanWritten(base+1, base+length, false, nil); err == nil {
		t.Fatal("unaligned scan accepted")
	}

	u, err := Open(FeatureWPAsync | FeatureWPUnpopulated)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if err := u.Register(base, length, RegisterWP); err != nil {
		t.Fatal(err)
	}
	// Before write protection every page counts as written: the documented
	// alternative to WriteProtect is a first clean scan.
	regs, err := pm.ScanWritten(base, base+length, true, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("first clean scan before any WriteProtect: %d pages", len(pagesOf(t, regs, base, pages)))
	regs, err = pm.ScanWritten(base, base+length, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	wantPages(t, "after first clean scan", pagesOf(t, regs, base, pages))

	for _, p := range []int{0, 1, 31} {
		mem[p*PageSize()] = 0xAA
	}
	regs, err = pm.ScanWritten(base, base+length, true, regs[:0])
	if err != nil {
		t.Fatal(err)
	}
	wantPages(t, "self writes", pagesOf(t, regs, base, pages), 0, 1, 31)
	if mem[0] != 0xAA || mem[31*PageSize()] != 0xAA {
		t.Fatal("written data lost by the clean scan")
	}
	// A sub-range scan sees only its part.
	mem[5*PageSize()] = 1
	mem[20*PageSize()] = 1
	regs, err = pm.ScanWritten(base+uintptr(4*PageSize()), base+uintptr(8*PageSize()), true, nil)
	if err != nil {
		t.Fatal(err)
	}
	wantPages(t, "sub-range", pagesOf(t, regs, base, pages), 5)
	regs, err = pm.ScanWritten(base, base+length, true, nil)
	if err != nil {
		t.Fatal(err)
	}
	wantPages(t, "rest", pagesOf(t, regs, base, pages), 20)

	if err := pm.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := pm.ScanWritten(base, base+length, false, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("scan after Close: %v, want ErrClosed", err)
	}
}

func TestOpenPagemapMissingProcess(t *testing.T) {
	// PIDs above pid_max cannot exist.
	_, err := OpenPagemap(1 << 30)
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("OpenPagemap(no such pid) = %v, want ENOENT", err)
	}
}

func TestAppendRegions(t *testing.T) {
	out := []Region{{0x1000, 0x3000}}
	out = appendRegions(out, []pageRegion{{0x3000, 0x4000, PageIsWritten}, {0x6000, 0x7000, PageIsWritten}})
	out = appendRegions(out, []pageRegion{{0x7000, 0x9000, PageIsWritten}, {0xa000, 0xb000, PageIsWritten}})
	want := []Region{{0x1000, 0x4000}, {0x6000, 0x9000}, {0xa000, 0xb000}}
	if fmt.Sprint(out) != fmt.Sprint(want) {
		t.Fatalf("appendRegions = %v, want %v", out, want)
	}
}
