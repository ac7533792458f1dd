package uffd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestOpenFeatures(t *testing.T) {
	avail, err := Available()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s offers %s", kernelRelease(), FeatureString(avail))
	for _, f := range []uint64{FeatureWPAsync, FeatureWPUnpopulated, FeatureMissingShmem} {
		if avail&f == 0 {
			t.Errorf("kernel lacks %s, which the lab needs", FeatureString(f))
		}
	}
	u, err := Open(FeatureWPAsync | FeatureWPUnpopulated)
	if err != nil {
		t.Fatal(err)
	}
	if u.Features()&(FeatureWPAsync|FeatureWPUnpopulated) != FeatureWPAsync|FeatureWPUnpopulated {
		t.Errorf("handshake enabled %s", FeatureString(u.Features()))
	}
	if err := u.Close(); err != nil {
		t.Fatal(err)
	}
	if err := u.Close(); !errors.Is(err, ErrClosed) {
		t.Errorf("second Close = %v, want ErrClosed", err)
	}

	// A bit no kernel has must be named in the error.
	const bogus = 1 << 60
	_, err = Open(FeatureWPAsync | bogus)
	if err == nil || !strings.Contains(err.Error(), "lacks feature(s) 0x1000000000000000") {
		t.Fatalf("Open(bogus feature) = %v, want it named as missing", err)
	}
	if strings.Contains(err.Error(), "lacks feature(s) WP_ASYNC") {
		t.Errorf("error blames a feature the kernel has: %v", err)
	}
}

// TestDevUserfaultfd exercises the fallback Open uses when userfaultfd(2)
// is refused (we are root here, so Open itself never takes it).
func TestDevUserfaultfd(t *testing.T) {
	if _, err := os.Stat("/dev/userfaultfd"); err != nil {
		t.Skip("precondition: /dev/userfaultfd absent (kernel older than 6.1 or no devtmpfs node)")
	}
	fd, err := newDevFD()
	if err != nil {
		t.Fatal(err)
	}
	api := uffdioAPI{api: uffdAPI}
	if err := ioctl(fd, ioctlAPI, unsafe.Pointer(&api)); err != nil {
		unix.Close(fd)
		t.Fatalf("UFFDIO_API on a /dev/userfaultfd descriptor: %v", err)
	}
	u := FromFD(fd)
	defer u.Close()
	mem, base, err := childMem(1)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	if err := u.Register(base, uintptr(len(mem)), RegisterMissing); err != nil {
		t.Fatal(err)
	}
	if err := u.Copy(base, bytes.Repeat([]byte{9}, PageSize()), true); err != nil {
		t.Fatal(err)
	}
	if mem[PageSize()-1] != 9 {
		t.Fatal("page not placed through the /dev/userfaultfd descriptor")
	}
}

func TestFeatureString(t *testing.T) {
	for f, want := range map[uint64]string{
		0:                                     "none",
		FeatureWPAsync:                        "WP_ASYNC",
		FeatureWPUnpopulated | FeatureWPAsync: "WP_UNPOPULATED|WP_ASYNC",
		FeatureMove | 1<<40:                   "MOVE|0x10000000000",
	} {
		if got := FeatureString(f); got != want {
			t.Errorf("FeatureString(%#x) = %q, want %q", f, got, want)
		}
	}
}

func TestDecodeMsgs(t *testing.T) {
	raw := make([]byte, 3*uffdMsgSize)
	for i := 0; i < 3; i++ {
		r := raw[i*uffdMsgSize:]
		r[0] = EventPagefault
		binary.LittleEndian.PutUint64(r[8:], PagefaultFlagWrite)
		binary.LittleEndian.PutUint64(r[16:], 0x7f0000001000+uint64(i)<<12)
		binary.LittleEndian.PutUint32(r[24:], uint32(100+i))
	}
	buf := make([]Msg, 2)
	if n := decodeMsgs(raw, buf); n != 2 {
		t.Fatalf("decoded %d messages into a 2-slot buffer", n)
	}
	want := Msg{Event: EventPagefault, Flags: PagefaultFlagWrite, Address: 0x7f0000002000, ThreadID: 101}
	if buf[1] != want {
		t.Errorf("msg 1 = %+v, want %+v", buf[1], want)
	}
	if n := decodeMsgs(raw[:uffdMsgSize+5], make([]Msg, 4)); n != 1 {
		t.Errorf("decoded %d messages from 1.2 records, want 1", n)
	}
}

// newMissing maps pages of anonymous memory registered in MISSING mode.
func newMissing(t testing.TB, pages int) (*UFFD, []byte, uintptr) {
	t.Helper()
	mem, base, err := childMem(pages)
	if err != nil {
		t.Fatal(err)
	}
	u, err := Open(0)
	if err != nil {
		unix.Munmap(mem)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		u.Close()
		unix.Munmap(mem)
	})
	if err := u.Register(base, uintptr(len(mem)), RegisterMissing); err != nil {
		t.Fatal(err)
	}
	return u, mem, base
}

// TestCopyZeroPageExist places pages without any fault (so nothing blocks
// in this process) and checks contents, EEXIST handling and the argument
// checks.
func TestCopyZeroPageExist(t *testing.T) {
	ps := PageSize()
	u, mem, base := newMissing(t, 8)
	page := func(p int) []byte { return mem[p*ps : (p+1)*ps] }

	src := append(missingPattern(0), missingPattern(1)...)
	if err := u.Copy(base, src, true); err != nil {
		t.Fatal(err)
	}
	if err := u.ZeroPage(base+uintptr(2*ps), uintptr(2*ps), false); err != nil {
		t.Fatal(err)
	}
	// Pages 1 and 2 are present: nothing is copied, both are reported.
	err := u.Copy(base+uintptr(ps), make([]byte, 2*ps), true)
	var ee *existError
	if !errors.Is(err, ErrExist) || !errors.Is(err, unix.EEXIST) || !errors.As(err, &ee) || ee.pages != 2 {
		t.Fatalf("Copy over present pages = %v, want ErrExist for 2 pages", err)
	}
	// Page 3 present, 4 and 5 missing: 4 and 5 are still copied.
	src = bytes.Repeat([]byte{0x5A}, 3*ps)
	err = u.Copy(base+uintptr(3*ps), src, false)
	if !errors.As(err, &ee) || ee.pages != 1 || ee.first != base+uintptr(3*ps) {
		t.Fatalf("Copy over pages 3-5 = %v, want ErrExist for page 3 only", err)
	}
	if err := u.Wake(base+uintptr(3*ps), uintptr(3*ps)); err != nil {
		t.Fatal(err)
	}
	if err := u.ZeroPage(base, uintptr(ps), true); !errors.Is(err, ErrExist) {
		t.Fatalf("ZeroPage over a present page = %v, want ErrExist", err)
	}
	for p, want := range [][]byte{missingPattern(0), missingPattern(1), make([]byte, ps), make([]byte, ps), src[:ps], src[:ps]} {
		if !bytes.Equal(page(p), want) {
			t.Errorf("page %d has the wrong contents (first byte %#x)", p, page(p)[0])
		}
	}

	if err := u.Copy(base+1, make([]byte, ps), true); err == nil || errors.Is(err, ErrExist) {
		t.Errorf("unaligned Copy = %v, want an alignment error", err)
	}
	if err := u.Copy(base+uintptr(6*ps), make([]byte, 100), true); err == nil {
		t.Error("Copy of a partial page accepted")
	}
	// Outside any registered range.
	other, obase, err := childMem(1)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(other)
	if err := u.Copy(obase, make([]byte, ps), true); err == nil || errors.Is(err, ErrExist) {
		t.Errorf("Copy to an unregistered range = %v, want an error", err)
	}
}

// TestMissingInProcess serves faults raised by a goroutine of this process.
// See the package comment: the touching goroutine pins its thread and P
// while it waits, so GOMAXPROCS is raised to leave Ps for the server.
func TestMissingInProcess(t *testing.T) {
	old := runtime.GOMAXPROCS(max(runtime.GOMAXPROCS(0), 4))
	defer runtime.GOMAXPROCS(old)
	const pages = 32
	ps := PageSize()
	u, mem, base := newMissing(t, pages)

	touched := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // the thread is lost to faults anyway
		defer runtime.UnlockOSThread()
		for p := 0; p < pages; p++ {
			// Pages are served in pairs, so only even pages fault; keep the
			// loaded value live by checking it.
			if got, want := mem[p*ps+p], missingPattern(p)[p]; got != want {
				touched <- fmt.Errorf("page %d: byte %d is %#x, want %#x", p, p, got, want)
				return
			}
		}
		touched <- nil
	}()

	served := make(chan error, 1)
	go func() {
		buf := make([]Msg, 8)
		faults := 0
		for faults < pages/2 {
			n, err := u.ReadMsgs(buf)
			if err != nil {
				served <- err
				return
			}
			for _, m := range buf[:n] {
				if m.Event != EventPagefault || m.Address < uint64(base) || m.Address >= uint64(base)+uint64(len(mem)) {
					served <- errors.New("unexpected message")
					return
				}
				p := int((m.Address - uint64(base)) / uint64(ps))
				if p%2 != 0 {
					served <- errors.New("fault on a page placed before")
					return
				}
				addr := base + uintptr(p*ps)
				src := append(missingPattern(p), missingPattern(p+1)...)
				if faults%2 == 0 {
					err = u.Copy(addr, src, true)
				} else if err = u.Copy(addr, src, false); err == nil {
					err = u.Wake(addr, uintptr(ps))
				}
				if err != nil {
					served <- err
					return
				}
				faults++
			}
		}
		served <- nil
	}()

	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("fault server: %v", err)
		}
	case <-time.After(10 * time.Second):
		u.Close() // releases the faulting thread: the pages become zero-filled
		<-touched // before Cleanup unmaps the memory under it
		t.Fatal("faults not served within 10s")
	}
	if err := <-touched; err != nil {
		t.Fatal(err)
	}
}

// TestMissingFromChild is the lab layout: the child registers its memory,
// passes the userfaultfd over a Unix socket, and reads its pages; we serve
// them with Copy and ZeroPage without ever touching its memory.
func TestMissingFromChild(t *testing.T) {
	ours, theirs := socketPair(t)
	c := startChild(t, "missing", theirs)
	theirs.Close()
	fd, err := RecvFD(ours)
	if err != nil {
		t.Fatal(err)
	}
	u := FromFD(fd)
	defer u.Close()
	c.send("go")

	ps := PageSize()
	served := make([]bool, c.n)
	buf := make([]Msg, 16)
	timer := time.AfterFunc(10*time.Second, u.Interrupt)
	defer timer.Stop()
	for count := 0; count < c.n; {
		n, err := u.ReadMsgs(buf)
		if err != nil {
			t.Fatalf("after %d faults: %v", count, err)
		}
		for _, m := range buf[:n] {
			if m.Event != EventPagefault || m.Flags&PagefaultFlagWP != 0 {
				t.Fatalf("unexpected message %+v", m)
			}
			if m.Address < uint64(c.base) || m.Address >= uint64(c.base)+uint64(c.n*ps) || m.Address%uint64(ps) != 0 {
				t.Fatalf("fault address %#x outside the child's region", m.Address)
			}
			if _, err := os.Stat(fmt.Sprintf("/proc/%d/task/%d", c.cmd.Process.Pid, m.ThreadID)); m.ThreadID == 0 || err != nil {
				t.Fatalf("fault thread id %d is not a thread of the child (%v)", m.ThreadID, err)
			}
			p := int((m.Address - uint64(c.base)) / uint64(ps))
			if served[p] {
				t.Fatalf("page %d faulted after being served", p)
			}
			addr := uintptr(m.Address)
			if p%4 == 3 {
				err = u.ZeroPage(addr, uintptr(ps), true)
			} else {
				err = u.Copy(addr, missingPattern(p), true)
			}
			if err != nil {
				t.Fatalf("serve page %d: %v", p, err)
			}
			served[p] = true
			count++
			if p == 0 {
				// The page is now present in the child: a second copy must
				// be refused and leave the served contents alone.
				if err := u.Copy(addr, make([]byte, ps), true); !errors.Is(err, ErrExist) {
					t.Fatalf("second Copy to page 0 = %v, want ErrExist", err)
				}
			}
		}
	}
	if l := c.line(); l != "ok" {
		t.Fatalf("child reports %q", l)
	}
}

// TestReadMsgsUnblocksOnClose: a fault server blocked with no faults must
// return ErrClosed when the UFFD is closed under it.
func TestReadMsgsUnblocksOnClose(t *testing.T) {
	u, _, base := newMissing(t, 1)
	done := make(chan error, 1)
	go func() {
		_, err := u.ReadMsgs(make([]Msg, 4))
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("ReadMsgs returned %v with no fault pending", err)
	case <-time.After(50 * time.Millisecond):
	}
	if err := u.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("ReadMsgs after Close = %v, want ErrClosed", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("ReadMsgs still blocked 2s after Close")
	}
	if err := u.Copy(base, make([]byte, PageSize()), true); !errors.Is(err, ErrClosed) {
		t.Errorf("Copy after Close = %v, want ErrClosed", err)
	}
}

// TestInterrupt stops readers but keeps the descriptor usable.
func TestInterrupt(t *testing.T) {
	u, mem, base := newMissing(t, 1)
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = u.ReadMsgs(make([]Msg, 1))
		}()
	}
	time.Sleep(20 * time.Millisecond)
	u.Interrupt()
	wg.Wait()
	for i, err := range errs {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("reader %d: %v, want ErrClosed", i, err)
		}
	}
	if _, err := u.ReadMsgs(make([]Msg, 1)); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadMsgs after Interrupt = %v, want ErrClosed", err)
	}
	if err := u.Copy(base, bytes.Repeat([]byte{7}, PageSize()), true); err != nil {
		t.Fatalf("Copy after Interrupt: %v", err)
	}
	if mem[0] != 7 {
		t.Fatal("page not placed")
	}
}

func socketPair(t *testing.T) (*net.UnixConn, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "ours")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.UnixConn), os.NewFile(uintptr(fds[1]), "theirs")
}

func TestSendRecvFD(t *testing.T) {
	a, bf := socketPair(t)
	bc, err := net.FileConn(bf)
	bf.Close()
	if err != nil {
		t.Fatal(err)
	}
	b := bc.(*net.UnixConn)
	defer b.Close()

	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	if err := SendFD(a, p[1]); err != nil {
		t.Fatal(err)
	}
	unix.Close(p[1]) // the receiver's copy must keep the pipe open
	if _, err := a.Write([]byte("after")); err != nil {
		t.Fatal(err)
	}
	fd, err := RecvFD(b)
	if err != nil {
		t.Fatal(err)
	}
	if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("received fd flags %#x (%v), want close-on-exec", flags, err)
	}
	if _, err := unix.Write(fd, []byte("via")); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	got := make([]byte, 8)
	n, _ := unix.Read(p[0], got)
	if string(got[:n]) != "via" {
		t.Fatalf("read %q through the pipe, want %q", got[:n], "via")
	}
	// Data written after the descriptor is left for the caller.
	rest := make([]byte, 5)
	if _, err := b.Read(rest); err != nil || string(rest) != "after" {
		t.Fatalf("data after the fd: %q, %v", rest, err)
	}
	// Plain data without a descriptor, then EOF, are errors.
	if _, err := a.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := RecvFD(b); err == nil || !strings.Contains(err.Error(), "got 0 descriptors") {
		t.Fatalf("RecvFD of plain data = %v", err)
	}
	a.Close()
	if _, err := RecvFD(b); err == nil {
		t.Fatal("RecvFD after peer close succeeded")
	}
}
