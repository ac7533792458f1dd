package uffd

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"unsafe"
)

// goABI is every ABI value this package defines, by its C name.
func goABI() map[string]uint64 {
	return map[string]uint64{
		"USERFAULTFD_IOC_NEW": uint64(ioctlUserfaultfdNew),
		"UFFDIO_API":          uint64(ioctlAPI),
		"UFFDIO_REGISTER":     uint64(ioctlRegister),
		"UFFDIO_UNREGISTER":   uint64(ioctlUnregister),
		"UFFDIO_WAKE":         uint64(ioctlWake),
		"UFFDIO_COPY":         uint64(ioctlCopy),
		"UFFDIO_ZEROPAGE":     uint64(ioctlZeropage),
		"UFFDIO_WRITEPROTECT": uint64(ioctlWriteprotect),
		"PAGEMAP_SCAN":        uint64(ioctlPagemapScan),

		"UFFD_API":             uffdAPI,
		"UFFD_EVENT_PAGEFAULT": EventPagefault,
		"UFFD_EVENT_FORK":      EventFork,
		"UFFD_EVENT_REMAP":     EventRemap,
		"UFFD_EVENT_REMOVE":    EventRemove,
		"UFFD_EVENT_UNMAP":     EventUnmap,

		"UFFD_PAGEFAULT_FLAG_WRITE": PagefaultFlagWrite,
		"UFFD_PAGEFAULT_FLAG_WP":    PagefaultFlagWP,
		"UFFD_PAGEFAULT_FLAG_MINOR": PagefaultFlagMinor,

		"UFFD_FEATURE_PAGEFAULT_FLAG_WP":  FeaturePagefaultFlagWP,
		"UFFD_FEATURE_EVENT_FORK":         FeatureEventFork,
		"UFFD_FEATURE_EVENT_REMAP":        FeatureEventRemap,
		"UFFD_FEATURE_EVENT_REMOVE":       FeatureEventRemove,
		"UFFD_FEATURE_MISSING_HUGETLBFS":  FeatureMissingHugetlbfs,
		"UFFD_FEATURE_MISSING_SHMEM":      FeatureMissingShmem,
		"UFFD_FEATURE_EVENT_UNMAP":        FeatureEventUnmap,
		"UFFD_FEATURE_SIGBUS":             FeatureSigbus,
		"UFFD_FEATURE_THREAD_ID":          FeatureThreadID,
		"UFFD_FEATURE_MINOR_HUGETLBFS":    FeatureMinorHugetlbfs,
		"UFFD_FEATURE_MINOR_SHMEM":        FeatureMinorShmem,
		"UFFD_FEATURE_EXACT_ADDRESS":      FeatureExactAddress,
		"UFFD_FEATURE_WP_HUGETLBFS_SHMEM": FeatureWPHugetlbfsShmem,
		"UFFD_FEATURE_WP_UNPOPULATED":     FeatureWPUnpopulated,
		"UFFD_FEATURE_POISON":             FeaturePoison,
		"UFFD_FEATURE_WP_ASYNC":           FeatureWPAsync,
		"UFFD_FEATURE_MOVE":               FeatureMove,

		"UFFDIO_REGISTER_MODE_MISSING":  RegisterMissing,
		"UFFDIO_REGISTER_MODE_WP":       RegisterWP,
		"UFFDIO_REGISTER_MODE_MINOR":    RegisterMinor,
		"UFFDIO_COPY_MODE_DONTWAKE":     copyModeDontwake,
		"UFFDIO_COPY_MODE_WP":           copyModeWP,
		"UFFDIO_ZEROPAGE_MODE_DONTWAKE": zeropageModeDontwake,
		"UFFDIO_WRITEPROTECT_MODE_WP":   writeprotectModeWP,
		"PM_SCAN_WP_MATCHING":           pmScanWPMatching,
		"PM_SCAN_CHECK_WPASYNC":         pmScanCheckWPAsync,
		"PAGE_IS_WPALLOWED":             PageIsWPAllowed,
		"PAGE_IS_WRITTEN":               PageIsWritten,
		"PAGE_IS_PRESENT":               PageIsPresent,
		"PAGE_IS_PFNZERO":               PageIsPFNZero,

		"sizeof(struct uffd_msg)":                   uffdMsgSize,
		"sizeof(struct uffdio_api)":                 uint64(unsafe.Sizeof(uffdioAPI{})),
		"sizeof(struct uffdio_register)":            uint64(unsafe.Sizeof(uffdioRegister{})),
		"sizeof(struct uffdio_copy)":                uint64(unsafe.Sizeof(uffdioCopy{})),
		"sizeof(struct uffdio_zeropage)":            uint64(unsafe.Sizeof(uffdioZeropage{})),
		"sizeof(struct uffdio_writeprotect)":        uint64(unsafe.Sizeof(uffdioWriteprotect{})),
		"sizeof(struct pm_scan_arg)":                uint64(unsafe.Sizeof(pmScanArg{})),
		"sizeof(struct page_region)":                uint64(unsafe.Sizeof(pageRegion{})),
		"offsetof(uffd_msg, arg.pagefault.flags)":   8,
		"offsetof(uffd_msg, arg.pagefault.address)": 16,
		"offsetof(uffd_msg, arg.pagefault.feat)":    24,
		"offsetof(uffdio_copy, src)":                uint64(unsafe.Offsetof(uffdioCopy{}.src)),
		"offsetof(uffdio_copy, mode)":               uint64(unsafe.Offsetof(uffdioCopy{}.mode)),
		"offsetof(uffdio_copy, copy)":               uint64(unsafe.Offsetof(uffdioCopy{}.copy)),
		"offsetof(uffdio_zeropage, zeropage)":       uint64(unsafe.Offsetof(uffdioZeropage{}.zeropage)),
		"offsetof(uffdio_register, ioctls)":         uint64(unsafe.Offsetof(uffdioRegister{}.ioctls)),
		"offsetof(pm_scan_arg, walk_end)":           uint64(unsafe.Offsetof(pmScanArg{}.walkEnd)),
		"offsetof(pm_scan_arg, vec)":                uint64(unsafe.Offsetof(pmScanArg{}.vec)),
		"offsetof(pm_scan_arg, return_mask)":        uint64(unsafe.Offsetof(pmScanArg{}.returnMask)),
	}
}

// TestIoctlNumbersLiteral checks the computed request numbers against the
// values the kernel headers expand to on x86-64/arm64, written out by hand
// here (the same numbers appear in strace output, e.g. "ioctl(3, UFFDIO_API"
// is 0xc018aa3f). It fails if a struct gains or loses a field, since the
// size is part of the number.
func TestIoctlNumbersLiteral(t *testing.T) {
	want := map[string]uint64{
		"USERFAULTFD_IOC_NEW": 0x0000aa00, // _IO(0xAA, 0)
		"UFFDIO_API":          0xc018aa3f, // _IOWR(0xAA, 0x3F, 24 bytes)
		"UFFDIO_REGISTER":     0xc020aa00, // _IOWR(0xAA, 0x00, 32)
		"UFFDIO_UNREGISTER":   0x8010aa01, // _IOR(0xAA, 0x01, 16)
		"UFFDIO_WAKE":         0x8010aa02, // _IOR(0xAA, 0x02, 16)
		"UFFDIO_COPY":         0xc028aa03, // _IOWR(0xAA, 0x03, 40)
		"UFFDIO_ZEROPAGE":     0xc020aa04, // _IOWR(0xAA, 0x04, 32)
		"UFFDIO_WRITEPROTECT": 0xc018aa06, // _IOWR(0xAA, 0x06, 24)
		"PAGEMAP_SCAN":        0xc0606610, // _IOWR('f', 16, 96)
	}
	got := goABI()
	for name, w := range want {
		if got[name] != w {
			t.Errorf("%s = %#x, want %#x", name, got[name], w)
		}
	}
}

// cProgram prints, for every name the installed headers define, "name value".
// Names too new for the headers (PAGEMAP_SCAN and the 6.4+ feature bits on
// Debian 12's 6.1 headers) are guarded by #ifdef and simply not printed.
const cProgram = `#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>
#include <linux/fs.h>
#define P(name) printf("%s %llu\n", #name, (unsigned long long)(name))
#define S(t) printf("sizeof(%s) %llu\n", #t, (unsigned long long)sizeof(t))
#define O(t, f) printf("offsetof(%s, %s) %llu\n", #t, #f, (unsigned long long)offsetof(struct t, f))
int main(void) {
	P(UFFDIO_API); P(UFFDIO_REGISTER); P(UFFDIO_UNREGISTER); P(UFFDIO_WAKE);
	P(UFFDIO_COPY); P(UFFDIO_ZEROPAGE); P(UFFDIO_WRITEPROTECT); P(UFFD_API);
#ifdef USERFAULTFD_IOC_NEW
	P(USERFAULTFD_IOC_NEW);
#endif
	P(UFFD_EVENT_PAGEFAULT); P(UFFD_EVENT_FORK); P(UFFD_EVENT_REMAP); P(UFFD_EVENT_REMOVE); P(UFFD_EVENT_UNMAP);
	P(UFFD_PAGEFAULT_FLAG_WRITE); P(UFFD_PAGEFAULT_FLAG_WP);
#ifdef UFFD_PAGEFAULT_FLAG_MINOR
	P(UFFD_PAGEFAULT_FLAG_MINOR);
#endif
	P(UFFD_FEATURE_PAGEFAULT_FLAG_WP); P(UFFD_FEATURE_EVENT_FORK); P(UFFD_FEATURE_EVENT_REMAP);
	P(UFFD_FEATURE_EVENT_REMOVE); P(UFFD_FEATURE_MISSING_HUGETLBFS); P(UFFD_FEATURE_MISSING_SHMEM);
	P(UFFD_FEATURE_EVENT_UNMAP); P(UFFD_FEATURE_SIGBUS); P(UFFD_FEATURE_THREAD_ID);
#ifdef UFFD_FEATURE_MINOR_HUGETLBFS
	P(UFFD_FEATURE_MINOR_HUGETLBFS); P(UFFD_FEATURE_MINOR_SHMEM);
#endif
#ifdef UFFD_FEATURE_EXACT_ADDRESS
	P(UFFD_FEATURE_EXACT_ADDRESS);
#endif
#ifdef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
	P(UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
#endif
#ifdef UFFD_FEATURE_WP_UNPOPULATED
	P(UFFD_FEATURE_WP_UNPOPULATED);
#endif
#ifdef UFFD_FEATURE_POISON
	P(UFFD_FEATURE_POISON);
#endif
#ifdef UFFD_FEATURE_WP_ASYNC
	P(UFFD_FEATURE_WP_ASYNC);
#endif
#ifdef UFFD_FEATURE_MOVE
	P(UFFD_FEATURE_MOVE);
#endif
	P(UFFDIO_REGISTER_MODE_MISSING); P(UFFDIO_REGISTER_MODE_WP);
#ifdef UFFDIO_REGISTER_MODE_MINOR
	P(UFFDIO_REGISTER_MODE_MINOR);
#endif
	P(UFFDIO_COPY_MODE_DONTWAKE); P(UFFDIO_ZEROPAGE_MODE_DONTWAKE); P(UFFDIO_WRITEPROTECT_MODE_WP);
	P(UFFDIO_COPY_MODE_WP);
	S(struct uffd_msg); S(struct uffdio_api); S(struct uffdio_register); S(struct uffdio_copy);
	S(struct uffdio_zeropage); S(struct uffdio_writeprotect);
	O(uffd_msg, arg.pagefault.flags); O(uffd_msg, arg.pagefault.address); O(uffd_msg, arg.pagefault.feat);
	O(uffdio_copy, src); O(uffdio_copy, mode); O(uffdio_copy, copy); O(uffdio_zeropage, zeropage);
	O(uffdio_register, ioctls);
#ifdef PAGEMAP_SCAN
	P(PAGEMAP_SCAN); P(PM_SCAN_WP_MATCHING); P(PM_SCAN_CHECK_WPASYNC);
	P(PAGE_IS_WPALLOWED); P(PAGE_IS_WRITTEN); P(PAGE_IS_PRESENT); P(PAGE_IS_PFNZERO);
	S(struct pm_scan_arg); S(struct page_region);
	O(pm_scan_arg, walk_end); O(pm_scan_arg, vec); O(pm_scan_arg, return_mask);
#endif
	return 0;
}
`

// TestABIAgainstCHeaders compiles a small C program against the installed
// kernel headers (with gcc, outside the Go build: the package stays
// cgo-free) and compares every value it prints with ours.
func TestABIAgainstCHeaders(t *testing.T) {
	cc, err := exec.LookPath("gcc")
	if err != nil {
		t.Skip("precondition: gcc is not installed, cannot read the C headers (TestIoctlNumbersLiteral still checks the numbers)")
	}
	if _, err := os.Stat("/usr/include/linux/userfaultfd.h"); err != nil {
		t.Skip("precondition: /usr/include/linux/userfaultfd.h missing (install linux-libc-dev)")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "abi.c")
	bin := filepath.Join(dir, "abi")
	if err := os.WriteFile(src, []byte(cProgram), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(cc, "-o", bin, src).CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s", err, out)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatalf("run abi probe: %v", err)
	}
	ours := goABI()
	seen := 0
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		i := strings.LastIndexByte(line, ' ')
		name, val := line[:i], line[i+1:]
		c, err := strconv.ParseUint(val, 10, 64)
		if err != nil {
			t.Fatalf("bad probe line %q", line)
		}
		g, ok := ours[name]
		if !ok {
			t.Errorf("probe printed %s which the test does not know", name)
			continue
		}
		seen++
		if g != c {
			t.Errorf("%s: Go %#x, C headers %#x", name, g, c)
		}
	}
	// The 6.1 headers define the core ioctls, events and structs: at least
	// that much must have been compared.
	if seen < 40 {
		t.Errorf("only %d values compared, the probe output looks truncated:\n%s", seen, out)
	}
	t.Logf("%d ABI values match the installed C headers", seen)
}
