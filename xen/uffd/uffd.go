package uffd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

var (
	// ErrClosed is returned by ReadMsgs once Interrupt or Close was called,
	// and by every method after Close.
	ErrClosed = errors.New("uffd: userfaultfd closed")
	// ErrExist is matched (errors.Is) by the error of Copy and ZeroPage when
	// a page in the range was already present; the other pages are placed.
	ErrExist = errors.New("uffd: page already present")
)

// pageSize is the base page size all range operations are aligned to.
var pageSize = uintptr(os.Getpagesize())

// PageSize returns the page size the range operations must be aligned to.
func PageSize() int { return int(pageSize) }

// maxStalls bounds consecutive EAGAIN answers that make no progress (the
// kernel returns them while the address space is being changed, e.g. during
// fork or mremap); past it Copy gives up instead of spinning forever.
const maxStalls = 10000

// Msg is a decoded struct uffd_msg. For EventPagefault, Flags holds the
// PagefaultFlag* bits and Address the faulting address (page-aligned unless
// FeatureExactAddress). For other events Flags and Address carry the first two
// 64-bit words of the event argument (e.g. start and end for EventRemove).
type Msg struct {
	Event    uint8
	Flags    uint64
	Address  uint64
	ThreadID uint32 // faulting thread id, with FeatureThreadID only
}

// UFFD is a userfaultfd. Range operations may be called from many goroutines
// at once; ReadMsgs may be called concurrently with them. It is safe to call
// Close while another goroutine is blocked in ReadMsgs.
type UFFD struct {
	fd       int
	efd      int    // eventfd signalled by Interrupt; -1 if it could not be made (under efdMu once shared)
	features uint64 // features enabled by the handshake (0 for FromFD)

	stopped atomic.Bool  // Interrupt or Close was called
	mu      sync.RWMutex // held shared while fd is in use, exclusively by Close
	closed  bool         // under mu
	efdMu   sync.Mutex   // orders eventfd writes before its close
}

// Open creates a userfaultfd (close-on-exec, non-blocking) and performs the
// UFFDIO_API handshake asking for features. When the userfaultfd system call
// is refused (EPERM: vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE, or a
// seccomp filter) it falls back to /dev/userfaultfd. If the kernel lacks some
// of the requested features the error names them.
func Open(features uint64) (*UFFD, error) {
	fd, err := newFD()
	if err != nil {
		return nil, err
	}
	api := uffdioAPI{api: uffdAPI, features: features}
	if err := ioctl(fd, ioctlAPI, unsafe.Pointer(&api)); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EINVAL) && features != 0 {
			// A failed handshake leaves the fd unusable; probe on a fresh one
			// what the kernel offers, to say what is missing.
			if avail, perr := Available(); perr == nil && features&^avail != 0 {
				return nil, fmt.Errorf("userfaultfd: kernel %s lacks feature(s) %s (it offers %s); use a newer kernel or do without them",
					kernelRelease(), FeatureString(features&^avail), FeatureString(avail))
			}
		}
		return nil, fmt.Errorf("userfaultfd: UFFDIO_API handshake with features %s: %w", FeatureString(features), err)
	}
	u := newUFFD(fd)
	u.features = api.features
	return u, nil
}

// Available returns the feature bits the running kernel supports, probed on a
// throw-away userfaultfd.
func Available() (uint64, error) {
	fd, err := newFD()
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	api := uffdioAPI{api: uffdAPI}
	if err := ioctl(fd, ioctlAPI, unsafe.Pointer(&api)); err != nil {
		return 0, fmt.Errorf("userfaultfd: UFFDIO_API probe: %w", err)
	}
	return api.features, nil
}

// newFD returns a fresh userfaultfd, via the system call or /dev/userfaultfd.
func newFD() (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if errno == 0 {
		return int(r), nil
	}
	if errno != unix.EPERM {
		return -1, fmt.Errorf("userfaultfd(2): %w (is CONFIG_USERFAULTFD enabled in this kernel?)", errno)
	}
	fd, err := newDevFD()
	if err != nil {
		return -1, fmt.Errorf("userfaultfd(2) refused (%v), and %w; run as root, set sysctl vm.unprivileged_userfaultfd=1, or grant read-write access to /dev/userfaultfd", errno, err)
	}
	return fd, nil
}

// newDevFD gets a userfaultfd from /dev/userfaultfd (Linux 6.1+), whose
// access is governed by the device node's permissions instead of
// vm.unprivileged_userfaultfd.
func newDevFD() (int, error) {
	dev, err := unix.Open("/dev/userfaultfd", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/userfaultfd: %w", err)
	}
	defer unix.Close(dev)
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(dev), ioctlUserfaultfdNew, unix.O_CLOEXEC|unix.O_NONBLOCK)
	if errno != 0 {
		return -1, fmt.Errorf("/dev/userfaultfd USERFAULTFD_IOC_NEW: %w", errno)
	}
	return int(r), nil
}

// FromFD wraps a userfaultfd whose UFFDIO_API handshake was already done,
// typically by another process that passed it with SendFD. The UFFD owns fd
// from now on (Close closes it). fd is switched to non-blocking mode, which
// is shared with every holder of the same open file.
func FromFD(fd int) *UFFD {
	_ = unix.SetNonblock(fd, true) // ReadMsgs copes with a blocking fd too: it only reads after poll
	return newUFFD(fd)
}

func newUFFD(fd int) *UFFD {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		efd = -1 // ReadMsgs then polls with a timeout and checks the flag
	}
	return &UFFD{fd: fd, efd: efd}
}

// FD returns the userfaultfd descriptor, e.g. to pass it with SendFD. It
// stays owned by u.
func (u *UFFD) FD() int { return u.fd }

// Features returns the features enabled by Open's handshake (0 for FromFD).
func (u *UFFD) Features() uint64 { return u.features }

// acquire takes the shared lock and fails if u is closed.
func (u *UFFD) acquire() error {
	u.mu.RLock()
	if u.closed {
		u.mu.RUnlock()
		return ErrClosed
	}
	return nil
}

func checkRange(op string, addr, length uintptr) error {
	if addr%pageSize != 0 || length%pageSize != 0 || length == 0 {
		return fmt.Errorf("%s: range %#x+%#x is not a non-empty multiple of the %d-byte page size", op, addr, length, pageSize)
	}
	return nil
}

// Register registers [addr, addr+length) with the userfaultfd; mode is
// RegisterMissing, RegisterWP, RegisterMinor or a combination.
func (u *UFFD) Register(addr, length uintptr, mode uint64) error {
	if err := checkRange("UFFDIO_REGISTER", addr, length); err != nil {
		return err
	}
	if err := u.acquire(); err != nil {
		return err
	}
	defer u.mu.RUnlock()
	reg := uffdioRegister{rng: uffdioRange{uint64(addr), uint64(length)}, mode: mode}
	if err := ioctl(u.fd, ioctlRegister, unsafe.Pointer(&reg)); err != nil {
		hint := ""
		switch {
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOMEM):
			hint = " (the range must be mapped, private anonymous, shmem or hugetlbfs memory; WP on shmem/hugetlbfs needs FeatureWPHugetlbfsShmem)"
		case errors.Is(err, unix.EBUSY):
			hint = " (the range is already registered with another userfaultfd)"
		}
		return fmt.Errorf("UFFDIO_REGISTER %#x+%#x mode %#x: %w%s", addr, length, mode, err, hint)
	}
	return nil
}

// Unregister undoes Register on [addr, addr+length).
func (u *UFFD) Unregister(addr, length uintptr) error {
	if err := checkRange("UFFDIO_UNREGISTER", addr, length); err != nil {
		return err
	}
	if err := u.acquire(); err != nil {
		return err
	}
	defer u.mu.RUnlock()
	rng := uffdioRange{uint64(addr), uint64(length)}
	if err := ioctl(u.fd, ioctlUnregister, unsafe.Pointer(&rng)); err != nil {
		return fmt.Errorf("UFFDIO_UNREGISTER %#x+%#x: %w", addr, length, err)
	}
	return nil
}

// existError reports the pages Copy or ZeroPage found already present.
type existError struct {
	op    string
	first uintptr
	pages int
}

func (e *existError) Error() string {
	return fmt.Sprintf("%s: %d page(s) already present, first at %#x (left untouched, the rest was placed)", e.op, e.pages, e.first)
}

func (e *existError) Unwrap() []error { return []error{ErrExist, unix.EEXIST} }

// fill runs a UFFDIO_COPY-like ioctl over [dst, dst+length) until all of it is
// done. step performs one ioctl from offset off and returns the kernel's
// progress word (bytes done, or -errno) and the ioctl error. Pages already
// present are skipped (and woken if wake), then reported as an existError.
func (u *UFFD) fill(op string, dst, length uintptr, wake bool, step func(off uintptr) (int64, error)) error {
	if err := checkRange(op, dst, length); err != nil {
		return err
	}
	if err := u.acquire(); err != nil {
		return err
	}
	defer u.mu.RUnlock()
	var exist *existError
	stalls := 0
	for off := uintptr(0); off < length; {
		done, err := step(off)
		if done > 0 {
			off += uintptr(done)
			stalls = 0
		}
		switch {
		case err == nil:
			if done <= 0 {
				return fmt.Errorf("%s at %#x: kernel reported success with progress %d", op, dst+off, done)
			}
		case errors.Is(err, unix.EAGAIN):
			// Partial progress (done > 0), or the address space is changing.
			if done <= 0 {
				if stalls++; stalls > maxStalls {
					return fmt.Errorf("%s at %#x: no progress after %d EAGAIN retries: %w", op, dst+off, maxStalls, err)
				}
				runtime.Gosched()
			}
		case errors.Is(err, unix.EEXIST):
			if exist == nil {
				exist = &existError{op: op, first: dst + off}
			}
			exist.pages++
			if wake {
				// A thread may wait on this page if whoever placed it asked
				// not to wake; the caller asked for waking, so do it.
				rng := uffdioRange{uint64(dst + off), uint64(pageSize)}
				if werr := ioctl(u.fd, ioctlWake, unsafe.Pointer(&rng)); werr != nil {
					return fmt.Errorf("%s: UFFDIO_WAKE %#x: %w", op, dst+off, werr)
				}
			}
			off += pageSize
		case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ESRCH):
			return fmt.Errorf("%s at %#x: %w (the range is not registered, or the process owning the memory has exited)", op, dst+off, err)
		default:
			return fmt.Errorf("%s at %#x+%#x: %w", op, dst+off, length-off, err)
		}
	}
	if exist != nil {
		return exist
	}
	return nil
}

// Copy atomically places len(src) bytes (whole pages) at dst with
// UFFDIO_COPY, retrying after partial copies. With wake, threads blocked on
// faults in the range are woken; otherwise call Wake later (batching). Pages
// already present keep their contents and yield an error matching ErrExist
// after the rest is copied.
func (u *UFFD) Copy(dst uintptr, src []byte, wake bool) error {
	return u.copy(dst, src, 0, wake)
}

// CopyWP is Copy with UFFDIO_COPY_MODE_WP: the pages are placed
// write-protected, in the same page-table update that maps them, so no
// write can reach them unprotected. The range must be registered with
// RegisterWP (as well as RegisterMissing); with FeatureWPAsync the first
// write to each page is then recorded for Pagemap.ScanWritten, exactly as
// after WriteProtect.
func (u *UFFD) CopyWP(dst uintptr, src []byte, wake bool) error {
	return u.copy(dst, src, copyModeWP, wake)
}

func (u *UFFD) copy(dst uintptr, src []byte, mode uint64, wake bool) error {
	if !wake {
		mode |= copyModeDontwake
	}
	if len(src) == 0 {
		return checkRange("UFFDIO_COPY", dst, 0)
	}
	err := u.fill("UFFDIO_COPY", dst, uintptr(len(src)), wake, func(off uintptr) (int64, error) {
		c := uffdioCopy{
			dst:  uint64(dst + off),
			src:  unsafe.Pointer(&src[off]),
			len:  uint64(uintptr(len(src)) - off),
			mode: mode,
		}
		err := ioctl(u.fd, ioctlCopy, unsafe.Pointer(&c))
		return c.copy, err
	})
	runtime.KeepAlive(src)
	return err
}

// ZeroPage maps zero pages on [dst, dst+length) with UFFDIO_ZEROPAGE; same
// conventions as Copy. UFFDIO_ZEROPAGE has no write-protect mode: the zero
// pages it maps are not protected, and a page already carrying a
// write-protect marker (WriteProtect on a never-populated page, with
// FeatureWPUnpopulated) counts as present (ErrExist). To track writes to
// zero pages, place them without waking, WriteProtect them, then Wake, and
// look with Pagemap.Scan for pages no longer on the zero page (PageIsPFNZero):
// those were written in between (a write to a zero page replaces it).
func (u *UFFD) ZeroPage(dst, length uintptr, wake bool) error {
	var mode uint64
	if !wake {
		mode = zeropageModeDontwake
	}
	return u.fill("UFFDIO_ZEROPAGE", dst, length, wake, func(off uintptr) (int64, error) {
		z := uffdioZeropage{rng: uffdioRange{uint64(dst + off), uint64(length - off)}, mode: mode}
		err := ioctl(u.fd, ioctlZeropage, unsafe.Pointer(&z))
		return z.zeropage, err
	})
}

// Wake wakes the threads blocked on faults in [addr, addr+length), after
// Copy or ZeroPage without wake.
func (u *UFFD) Wake(addr, length uintptr) error {
	if err := checkRange("UFFDIO_WAKE", addr, length); err != nil {
		return err
	}
	if err := u.acquire(); err != nil {
		return err
	}
	defer u.mu.RUnlock()
	rng := uffdioRange{uint64(addr), uint64(length)}
	if err := ioctl(u.fd, ioctlWake, unsafe.Pointer(&rng)); err != nil {
		return fmt.Errorf("UFFDIO_WAKE %#x+%#x: %w", addr, length, err)
	}
	return nil
}

// WriteProtect sets (protect) or clears write protection on [addr,
// addr+length), which must be registered with RegisterWP. Clearing wakes the
// threads blocked on WP faults in the range. With FeatureWPAsync, setting it
// (re)starts dirty tracking: the next write to each page is recorded and
// shows up in Pagemap.ScanWritten.
func (u *UFFD) WriteProtect(addr, length uintptr, protect bool) error {
	if err := checkRange("UFFDIO_WRITEPROTECT", addr, length); err != nil {
		return err
	}
	if err := u.acquire(); err != nil {
		return err
	}
	defer u.mu.RUnlock()
	wp := uffdioWriteprotect{rng: uffdioRange{uint64(addr), uint64(length)}}
	if protect {
		wp.mode = writeprotectModeWP
	}
	if err := ioctl(u.fd, ioctlWriteprotect, unsafe.Pointer(&wp)); err != nil {
		return fmt.Errorf("UFFDIO_WRITEPROTECT %#x+%#x protect=%v: %w (is the range registered with RegisterWP?)", addr, length, protect, err)
	}
	return nil
}

// ReadMsgs blocks until at least one message is queued, then decodes up to
// len(buf) of them into buf and returns how many. It returns ErrClosed once
// Interrupt or Close was called, including when that happens while it waits;
// messages still queued then are not returned (see Close for what happens
// to their threads).
// Several goroutines may call it; each message goes to one of them.
func (u *UFFD) ReadMsgs(buf []Msg) (int, error) {
	if len(buf) == 0 {
		return 0, errors.New("uffd: ReadMsgs with an empty buffer")
	}
	if err := u.acquire(); err != nil {
		return 0, err
	}
	defer u.mu.RUnlock()
	raw := make([]byte, len(buf)*uffdMsgSize)
	u.efdMu.Lock()
	efd := u.efd // cannot be closed while we hold mu shared
	u.efdMu.Unlock()
	fds := []unix.PollFd{{Fd: int32(u.fd), Events: unix.POLLIN}, {Fd: int32(efd), Events: unix.POLLIN}}
	timeout := -1
	if efd < 0 {
		fds = fds[:1]
		timeout = 50 // ms: no eventfd, so look at the flag now and then
	}
	for {
		if u.stopped.Load() {
			return 0, ErrClosed
		}
		// Poll before reading: an fd from FromFD might be blocking, and a
		// read(2) blocked on a userfaultfd cannot be interrupted.
		if _, err := unix.Poll(fds, timeout); err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return 0, fmt.Errorf("poll userfaultfd: %w", err)
		}
		if len(fds) > 1 && fds[1].Revents != 0 {
			return 0, ErrClosed
		}
		if fds[0].Revents&(unix.POLLERR|unix.POLLNVAL) != 0 {
			return 0, fmt.Errorf("poll userfaultfd: revents %#x (descriptor broken or not a userfaultfd)", fds[0].Revents)
		}
		if fds[0].Revents == 0 {
			continue
		}
		n, err := unix.Read(u.fd, raw)
		switch {
		case err == nil && n > 0:
			return decodeMsgs(raw[:n], buf), nil
		case err == nil:
			return 0, errors.New("read userfaultfd: unexpected end of file")
		case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR):
			// Another reader took the message; wait again.
		default:
			return 0, fmt.Errorf("read userfaultfd: %w", err)
		}
	}
}

// decodeMsgs decodes packed struct uffd_msg records (little-endian: every
// architecture this package builds for is).
func decodeMsgs(raw []byte, buf []Msg) int {
	n := 0
	for ; n < len(buf) && (n+1)*uffdMsgSize <= len(raw); n++ {
		r := raw[n*uffdMsgSize : (n+1)*uffdMsgSize]
		buf[n] = Msg{
			Event:    r[0],
			Flags:    binary.LittleEndian.Uint64(r[8:]),
			Address:  binary.LittleEndian.Uint64(r[16:]),
			ThreadID: binary.LittleEndian.Uint32(r[24:]),
		}
	}
	return n
}

// Interrupt makes a blocked ReadMsgs, and every later one, return ErrClosed,
// without closing the descriptor: Copy and friends keep working, so a fault
// server can be stopped while the memory is still being filled.
func (u *UFFD) Interrupt() {
	u.stopped.Store(true)
	u.efdMu.Lock()
	defer u.efdMu.Unlock()
	if u.efd >= 0 {
		var one [8]byte
		binary.LittleEndian.PutUint64(one[:], 1)
		// Fails only if the counter would overflow, i.e. it is already signalled.
		_, _ = unix.Write(u.efd, one[:])
	}
}

// Close wakes a blocked ReadMsgs, waits for the calls in progress to return
// and closes the descriptors. When the last copy of the userfaultfd is closed
// (a process that passed it with SendFD holds its own), the kernel wakes the
// threads still blocked on faults and the ranges become ordinary memory.
func (u *UFFD) Close() error {
	u.Interrupt()
	u.mu.Lock() // waits for ReadMsgs (woken above) and range operations
	defer u.mu.Unlock()
	if u.closed {
		return ErrClosed
	}
	u.closed = true
	u.efdMu.Lock()
	if u.efd >= 0 {
		unix.Close(u.efd)
		u.efd = -1
	}
	u.efdMu.Unlock()
	if err := unix.Close(u.fd); err != nil {
		return fmt.Errorf("close userfaultfd: %w", err)
	}
	return nil
}

// ioctl issues a pointer-argument ioctl. arg is an unsafe.Pointer (not a
// uintptr) so the pointed-to struct stays alive and is not moved.
func ioctl(fd int, req uintptr, arg unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return errno
	}
	return nil
}

// FeatureString names the feature bits in f, e.g. "WP_ASYNC|WP_UNPOPULATED".
func FeatureString(f uint64) string {
	if f == 0 {
		return "none"
	}
	var names []string
	for _, fn := range featureNames {
		if f&fn.bit != 0 {
			names = append(names, fn.name)
			f &^= fn.bit
		}
	}
	if f != 0 {
		names = append(names, fmt.Sprintf("%#x", f))
	}
	return strings.Join(names, "|")
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "(unknown)"
	}
	return unix.ByteSliceToString(u.Release[:])
}
