package uffd

import (
	"errors"
	"fmt"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkCopy measures UFFDIO_COPY into missing pages for several batch
// sizes (pages per ioctl); MB/s is the placement throughput of the
// destination side. No thread waits on the pages, so this is the copy and
// page-table cost alone; the region is zapped with MADV_DONTNEED (timer
// stopped) whenever it is full. The wp/ cases are the lab destination's
// placement: CopyWP into memory registered MISSING|WP with WP_ASYNC.
func BenchmarkCopy(b *testing.B) {
	for _, wp := range []bool{false, true} {
		for _, batch := range []int{1, 16, 64, 512} {
			name := fmt.Sprintf("pages=%d", batch)
			copyFn := (*UFFD).Copy
			if wp {
				name, copyFn = "wp/"+name, (*UFFD).CopyWP
			}
			b.Run(name, func(b *testing.B) {
				benchPlace(b, batch, wp, func(u *UFFD, _ *Pagemap, dst uintptr, src []byte) error { return copyFn(u, dst, src, true) })
			})
		}
	}
}

// BenchmarkZeroPage is BenchmarkCopy for UFFDIO_ZEROPAGE. The wp/ cases
// are the lab destination's zero pages: before the resume ZeroPage then
// WriteProtect; once the guest runs (wp-running/) ZeroPage without waking,
// WriteProtect, a PAGEMAP_SCAN for pages written in between, then Wake.
func BenchmarkZeroPage(b *testing.B) {
	zero := func(u *UFFD, _ *Pagemap, dst uintptr, src []byte) error {
		return u.ZeroPage(dst, uintptr(len(src)), true)
	}
	zeroWP := func(u *UFFD, _ *Pagemap, dst uintptr, src []byte) error {
		if err := u.ZeroPage(dst, uintptr(len(src)), true); err != nil {
			return err
		}
		return u.WriteProtect(dst, uintptr(len(src)), true)
	}
	zeroRunning := func(u *UFFD, pm *Pagemap, dst uintptr, src []byte) error {
		n := uintptr(len(src))
		if err := u.ZeroPage(dst, n, false); err != nil {
			return err
		}
		if err := u.WriteProtect(dst, n, true); err != nil {
			return err
		}
		regs, err := pm.Scan(dst, dst+n, PageIsPFNZero, 0, nil)
		if err != nil {
			return err
		}
		if len(regs) != 0 {
			return fmt.Errorf("zero pages written: %v", regs)
		}
		return u.Wake(dst, n)
	}
	for _, c := range []struct {
		name  string
		wp    bool
		place func(*UFFD, *Pagemap, uintptr, []byte) error
	}{{"", false, zero}, {"wp/", true, zeroWP}, {"wp-running/", true, zeroRunning}} {
		for _, batch := range []int{1, 512} {
			b.Run(fmt.Sprintf("%spages=%d", c.name, batch), func(b *testing.B) {
				benchPlace(b, batch, c.wp, c.place)
			})
		}
	}
}

func benchPlace(b *testing.B, batch int, wp bool, place func(*UFFD, *Pagemap, uintptr, []byte) error) {
	const regionPages = 16384 // 64 MiB
	ps := PageSize()
	var u *UFFD
	var pm *Pagemap
	var mem []byte
	var base uintptr
	if wp {
		u, pm, mem, base = newMissingWP(b, regionPages)
	} else {
		u, mem, base = newMissing(b, regionPages)
	}
	src := make([]byte, batch*ps)
	for i := range src {
		src[i] = byte(i*31 + 1)
	}
	b.SetBytes(int64(len(src)))
	b.ResetTimer()
	next := 0
	for i := 0; i < b.N; i++ {
		if next+batch > regionPages {
			b.StopTimer()
			if err := unix.Madvise(mem, unix.MADV_DONTNEED); err != nil {
				b.Fatal(err)
			}
			next = 0
			b.StartTimer()
		}
		if err := place(u, pm, base+uintptr(next*ps), src); err != nil {
			b.Fatal(err)
		}
		next += batch
	}
}

// BenchmarkScanWritten measures a clean PAGEMAP_SCAN over 256 MiB of
// populated, tracked memory with no page written, and with 1 page in 64
// written (about 1000 separate regions) before each scan.
func BenchmarkScanWritten(b *testing.B) {
	const pages = 65536 // 256 MiB
	ps := PageSize()
	mem, base, err := childMem(pages)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(mem)
	for p := 0; p < pages; p++ {
		mem[p*ps] = 1
	}
	u, err := Open(FeatureWPAsync | FeatureWPUnpopulated)
	if err != nil {
		b.Fatal(err)
	}
	defer u.Close()
	if err := u.Register(base, uintptr(len(mem)), RegisterWP); err != nil {
		b.Fatal(err)
	}
	if err := u.WriteProtect(base, uintptr(len(mem)), true); err != nil {
		b.Fatal(err)
	}
	pm, err := OpenPagemap(0)
	if err != nil {
		b.Fatal(err)
	}
	defer pm.Close()
	var out []Region
	for _, stride := range []int{0, 64} {
		name := "256MiB/none-written"
		if stride > 0 {
			name = fmt.Sprintf("256MiB/1-in-%d-written", stride)
		}
		b.Run(name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if stride > 0 {
					b.StopTimer()
					for p := i % stride; p < pages; p += stride {
						mem[p*ps]++
					}
					b.StartTimer()
				}
				out, err = pm.ScanWritten(base, base+uintptr(len(mem)), true, out[:0])
				if err != nil {
					b.Fatal(err)
				}
				if stride > 0 && len(out) != pages/stride {
					b.Fatalf("scan found %d regions, want %d", len(out), pages/stride)
				}
			}
		})
	}
}

// BenchmarkFaultInProcess measures one MISSING fault served in-process:
// the toucher reads a missing page, the server goroutine reads the message
// and places it with Copy, the toucher wakes. GOMAXPROCS is raised for the
// reason given in the package comment.
func BenchmarkFaultInProcess(b *testing.B) {
	old := runtime.GOMAXPROCS(max(runtime.GOMAXPROCS(0), 4))
	defer runtime.GOMAXPROCS(old)
	const regionPages = 16384
	ps := PageSize()
	u, mem, _ := newMissing(b, regionPages)
	page := make([]byte, ps)
	served := make(chan error, 1)
	go func() {
		buf := make([]Msg, 16)
		for {
			n, err := u.ReadMsgs(buf)
			if err != nil {
				served <- err
				return
			}
			for _, m := range buf[:n] {
				if err := u.Copy(uintptr(m.Address), page, true); err != nil {
					served <- err
					return
				}
			}
		}
	}()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	b.ResetTimer()
	var sum byte
	next := 0
	for i := 0; i < b.N; i++ {
		if next == regionPages {
			b.StopTimer()
			if err := unix.Madvise(mem, unix.MADV_DONTNEED); err != nil {
				b.Fatal(err)
			}
			next = 0
			b.StartTimer()
		}
		sum += mem[next*ps] // faults; the server places it
		next++
	}
	b.StopTimer()
	u.Interrupt()
	if err := <-served; !errors.Is(err, ErrClosed) {
		b.Fatalf("server: %v", err)
	}
	if sum != 0 {
		b.Fatalf("served pages were not zero (sum %d)", sum)
	}
}
