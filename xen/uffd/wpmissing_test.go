package uffd

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// newMissingWP maps pages registered MISSING|WP on a WP_ASYNC userfaultfd:
// the lab destination's layout, whose writes are tracked from placement on.
func newMissingWP(t testing.TB, pages int) (*UFFD, *Pagemap, []byte, uintptr) {
	t.Helper()
	mem, base, err := childMem(pages)
	if err != nil {
		t.Fatal(err)
	}
	u, err := Open(FeatureWPAsync | FeatureWPUnpopulated)
	if err != nil {
		unix.Munmap(mem)
		t.Fatal(err)
	}
	pm, err := OpenPagemap(0)
	if err != nil {
		u.Close()
		unix.Munmap(mem)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		pm.Close()
		u.Close()
		unix.Munmap(mem)
	})
	if err := u.Register(base, uintptr(len(mem)), RegisterMissing|RegisterWP); err != nil {
		t.Fatal(err)
	}
	return u, pm, mem, base
}

// categories returns the PAGEMAP_SCAN categories of each page.
func categories(t *testing.T, pm *Pagemap, base uintptr, pages int) []uint64 {
	t.Helper()
	ps := uintptr(PageSize())
	out := make([]uint64, pages)
	for _, c := range []uint64{PageIsWPAllowed, PageIsWritten, PageIsPresent, PageIsPFNZero} {
		regs, err := pm.Scan(base, base+uintptr(pages)*ps, c, c, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pagesOf(t, regs, base, pages) {
			out[p] |= c
		}
	}
	return out
}

// TestWPAsyncOnMissingMemory is the kernel evidence for the lab
// destination's write tracking (Linux 6.7+ semantics, measured on 6.18):
// WP_ASYNC works on memory registered MISSING|WP; a page placed by
// UFFDIO_COPY in WP mode is protected and reads as not written until a
// write; UFFDIO_ZEROPAGE has no WP mode (its page reads as written) and
// fails with EEXIST on a write-protect marker, so zero pages are protected
// after placing; a write to a zero page before that is visible as the page
// leaving the zero pfn; process_vm_readv does not count as a write,
// process_vm_writev does (and WriteProtect clears it again); a page zapped
// with MADV_DONTNEED and placed again is protected again.
func TestWPAsyncOnMissingMemory(t *testing.T) {
	const pages = 16
	ps := PageSize()
	u, pm, mem, base := newMissingWP(t, pages)
	addr := func(p int) uintptr { return base + uintptr(p*ps) }
	data := bytes.Repeat([]byte{0xA5}, ps)
	const present, written, zero = PageIsPresent, PageIsWritten, PageIsPFNZero
	check := func(what string, want map[int]uint64) {
		t.Helper()
		got := categories(t, pm, base, pages)
		for p, w := range want {
			if g := got[p] &^ PageIsWPAllowed; g != w {
				t.Errorf("%s: page %d has categories %#x, want %#x", what, p, g, w)
			}
		}
	}

	// Never-populated pages of tracked memory read as written: only
	// present pages (all of them, once the migration is complete) can be
	// judged by the written bit.
	check("fresh", map[int]uint64{0: written, 15: written})

	if err := u.CopyWP(addr(0), append(bytes.Clone(data), data...), true); err != nil { // pages 0, 1
		t.Fatal(err)
	}
	if err := u.Copy(addr(2), data, true); err != nil { // plain copy: not protected
		t.Fatal(err)
	}
	if err := u.ZeroPage(addr(3), uintptr(2*ps), true); err != nil { // pages 3, 4
		t.Fatal(err)
	}
	check("placed", map[int]uint64{0: present, 1: present, 2: present | written, 3: present | written | zero, 4: present | written | zero})
	if err := u.WriteProtect(addr(3), uintptr(2*ps), true); err != nil {
		t.Fatal(err)
	}
	check("zero pages protected", map[int]uint64{3: present | zero, 4: present | zero})

	// UFFDIO_ZEROPAGE refuses a page holding a write-protect marker;
	// UFFDIO_COPY takes it.
	if err := u.WriteProtect(addr(5), uintptr(2*ps), true); err != nil {
		t.Fatal(err)
	}
	check("markers", map[int]uint64{5: 0, 6: 0})
	if err := u.ZeroPage(addr(5), uintptr(ps), true); !errors.Is(err, ErrExist) {
		t.Fatalf("ZeroPage onto a write-protect marker = %v, want ErrExist", err)
	}
	if err := u.CopyWP(addr(6), data, true); err != nil {
		t.Fatalf("CopyWP onto a write-protect marker: %v", err)
	}

	// Writes: a protected page and a protected zero page flip to written
	// (the zero page is replaced by the copy written to).
	mem[0*ps+9] = 1
	mem[3*ps+9] = 1
	check("written", map[int]uint64{0: present | written, 1: present, 3: present | written, 4: present | zero, 6: present})
	if mem[3*ps+9] != 1 || mem[0*ps+10] != 0xA5 {
		t.Fatal("contents lost by the write tracking")
	}

	// A write between ZeroPage and WriteProtect is not in the written bit
	// afterwards, but the page is no longer the zero page.
	if err := u.ZeroPage(addr(7), uintptr(ps), false); err != nil {
		t.Fatal(err)
	}
	mem[7*ps+1] = 2
	if err := u.WriteProtect(addr(7), uintptr(ps), true); err != nil {
		t.Fatal(err)
	}
	check("written before protection", map[int]uint64{7: present})
	regs, err := pm.Scan(addr(3), addr(8), PageIsPFNZero, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := pagesOf(t, regs, base, pages); fmt.Sprint(got) != "[3 5 6 7]" {
		// page 5 holds only a marker (no page), 6 data: not the zero page either
		t.Fatalf("pages 3-7 off the zero page: %v, want [3 5 6 7]", got)
	}

	// process_vm_readv does not write; process_vm_writev does, and
	// WriteProtect makes the page clean again.
	if err := u.CopyWP(addr(8), append(bytes.Clone(data), data...), true); err != nil { // 8, 9
		t.Fatal(err)
	}
	buf := make([]byte, ps)
	local := []unix.Iovec{{Base: &buf[0]}}
	local[0].SetLen(ps)
	if _, err := unix.ProcessVMReadv(unix.Getpid(), local, []unix.RemoteIovec{{Base: addr(8), Len: ps}}, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.ProcessVMWritev(unix.Getpid(), local, []unix.RemoteIovec{{Base: addr(9), Len: ps}}, 0); err != nil {
		t.Fatal(err)
	}
	check("readv 8, writev 9", map[int]uint64{8: present, 9: present | written})
	if err := u.WriteProtect(addr(9), uintptr(ps), true); err != nil {
		t.Fatal(err)
	}
	check("9 protected again", map[int]uint64{9: present})

	// Zapped, then placed again: protected again.
	mem[8*ps] = 3
	if err := unix.Madvise(mem[8*ps:9*ps], unix.MADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	check("zapped", map[int]uint64{8: written})
	if err := u.CopyWP(addr(8), data, true); err != nil {
		t.Fatal(err)
	}
	check("placed again", map[int]uint64{8: present})
}

// TestMissingFaultOnWPAsyncMemory: WP_ASYNC does not change MISSING
// faults: a read of a missing page is still delivered and served with
// CopyWP; the toucher's write that follows is resolved by the kernel (no
// message) and recorded, and a page only read is not.
func TestMissingFaultOnWPAsyncMemory(t *testing.T) {
	old := runtime.GOMAXPROCS(max(runtime.GOMAXPROCS(0), 4))
	defer runtime.GOMAXPROCS(old)
	const pages = 8
	ps := PageSize()
	u, pm, mem, base := newMissingWP(t, pages)
	touched := make(chan byte, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		sum := byte(0)
		for p := 0; p < pages; p += 2 {
			sum += mem[p*ps] // read faults (MISSING)
			if p%4 == 0 {
				mem[p*ps+1] = mem[p*ps] + 1 // then writes
			}
		}
		touched <- sum
	}()
	buf := make([]Msg, 4)
	timer := time.AfterFunc(10*time.Second, u.Interrupt)
	defer timer.Stop()
	for served := 0; served < pages/2; {
		n, err := u.ReadMsgs(buf)
		if err != nil {
			t.Fatalf("after %d faults: %v", served, err)
		}
		for _, m := range buf[:n] {
			if m.Event != EventPagefault || m.Flags&PagefaultFlagWP != 0 {
				t.Fatalf("unexpected message %+v (WP faults must be resolved by the kernel)", m)
			}
			if err := u.CopyWP(uintptr(m.Address), bytes.Repeat([]byte{4}, ps), true); err != nil {
				t.Fatal(err)
			}
			served++
		}
	}
	if got := <-touched; got != 4*pages/2 {
		t.Fatalf("the toucher read %d, want %d from the placed pages", got, 4*pages/2)
	}
	regs, err := pm.ScanWritten(base, base+uintptr(pages*ps), false, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Odd pages were never placed: holes read as written (see above).
	wantPages(t, "after the toucher's writes", pagesOf(t, regs, base, pages), 0, 1, 3, 4, 5, 7)
	for p := 0; p < pages; p += 4 {
		if mem[p*ps+1] != 5 {
			t.Errorf("page %d: the toucher's write is missing", p)
		}
	}
}
