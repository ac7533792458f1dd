package uffd

import "unsafe"

// This file is the kernel ABI: ioctl numbers, argument structs and flag bits
// from include/uapi/linux/userfaultfd.h and include/uapi/linux/fs.h. They are
// defined here because golang.org/x/sys/unix only has SYS_USERFAULTFD, and
// the Debian 12 headers (Linux 6.1) predate WP_ASYNC and PAGEMAP_SCAN (6.7).
// abi_test.go checks every number against literal values published by the
// kernel and, when gcc is installed, against the installed C headers.

// The ioctl request encoding of asm-generic/ioctl.h (x86, arm64, riscv all
// use it): dir<<30 | size<<16 | type<<8 | nr.
const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2
)

func ioc(dir, typ, nr, size uintptr) uintptr {
	return dir<<30 | size<<16 | typ<<8 | nr
}

// The ioctl "type" bytes.
const (
	uffdioType   = 0xAA // UFFDIO and USERFAULTFD_IOC
	pagemapType  = 'f'  // PAGEMAP_SCAN lives in the 'f' (fs) space
	uffdAPI      = 0xAA // UFFD_API, the only API version there is
	uffdMsgSize  = 32   // sizeof(struct uffd_msg), packed
	pmScanArgLen = 96   // sizeof(struct pm_scan_arg)
)

// Both the kernel structs and the pointer fields below (unsafe.Pointer in
// place of __u64) assume a 64-bit address space; fail the build otherwise.
var (
	_ [8 - unsafe.Sizeof(uintptr(0))]byte
	_ [unsafe.Sizeof(uintptr(0)) - 8]byte
)

// struct uffdio_api.
type uffdioAPI struct {
	api      uint64
	features uint64
	ioctls   uint64
}

// struct uffdio_range.
type uffdioRange struct {
	start uint64
	len   uint64
}

// struct uffdio_register.
type uffdioRegister struct {
	rng    uffdioRange
	mode   uint64
	ioctls uint64
}

// struct uffdio_copy. src is a pointer (not a __u64) so that the garbage
// collector and the stack copier see it while the ioctl runs.
type uffdioCopy struct {
	dst  uint64
	src  unsafe.Pointer
	len  uint64
	mode uint64
	copy int64
}

// struct uffdio_zeropage.
type uffdioZeropage struct {
	rng      uffdioRange
	mode     uint64
	zeropage int64
}

// struct uffdio_writeprotect.
type uffdioWriteprotect struct {
	rng  uffdioRange
	mode uint64
}

// struct page_region (PAGEMAP_SCAN output).
type pageRegion struct {
	start      uint64
	end        uint64
	categories uint64
}

// struct pm_scan_arg. vec is a pointer for the same reason as uffdioCopy.src.
type pmScanArg struct {
	size              uint64
	flags             uint64
	start             uint64
	end               uint64
	walkEnd           uint64
	vec               unsafe.Pointer
	vecLen            uint64
	maxPages          uint64
	categoryInverted  uint64
	categoryMask      uint64
	categoryAnyofMask uint64
	returnMask        uint64
}

// ioctl request numbers. UFFDIO_WAKE and UFFDIO_UNREGISTER are _IOR although
// the kernel reads them: a historical mistake kept for ABI compatibility.
var (
	ioctlUserfaultfdNew = ioc(iocNone, uffdioType, 0x00, 0)
	ioctlAPI            = ioc(iocRead|iocWrite, uffdioType, 0x3F, unsafe.Sizeof(uffdioAPI{}))
	ioctlRegister       = ioc(iocRead|iocWrite, uffdioType, 0x00, unsafe.Sizeof(uffdioRegister{}))
	ioctlUnregister     = ioc(iocRead, uffdioType, 0x01, unsafe.Sizeof(uffdioRange{}))
	ioctlWake           = ioc(iocRead, uffdioType, 0x02, unsafe.Sizeof(uffdioRange{}))
	ioctlCopy           = ioc(iocRead|iocWrite, uffdioType, 0x03, unsafe.Sizeof(uffdioCopy{}))
	ioctlZeropage       = ioc(iocRead|iocWrite, uffdioType, 0x04, unsafe.Sizeof(uffdioZeropage{}))
	ioctlWriteprotect   = ioc(iocRead|iocWrite, uffdioType, 0x06, unsafe.Sizeof(uffdioWriteprotect{}))
	ioctlPagemapScan    = ioc(iocRead|iocWrite, pagemapType, 16, unsafe.Sizeof(pmScanArg{}))
)

// Feature bits for Open (UFFD_FEATURE_*). The kernel enables only the
// features asked for; WP_ASYNC dirty tracking needs FeatureWPAsync and, for
// anonymous memory never touched yet, FeatureWPUnpopulated.
const (
	FeaturePagefaultFlagWP  uint64 = 1 << 0  // WP faults carry PagefaultFlagWP
	FeatureEventFork        uint64 = 1 << 1  // fork events (needs CAP_SYS_PTRACE)
	FeatureEventRemap       uint64 = 1 << 2  // mremap events
	FeatureEventRemove      uint64 = 1 << 3  // madvise(DONTNEED/REMOVE) events
	FeatureMissingHugetlbfs uint64 = 1 << 4  // MISSING mode on hugetlbfs
	FeatureMissingShmem     uint64 = 1 << 5  // MISSING mode on shmem/tmpfs
	FeatureEventUnmap       uint64 = 1 << 6  // munmap events
	FeatureSigbus           uint64 = 1 << 7  // SIGBUS instead of fault events
	FeatureThreadID         uint64 = 1 << 8  // Msg.ThreadID is filled
	FeatureMinorHugetlbfs   uint64 = 1 << 9  // MINOR mode on hugetlbfs
	FeatureMinorShmem       uint64 = 1 << 10 // MINOR mode on shmem
	FeatureExactAddress     uint64 = 1 << 11 // fault address not page-masked
	FeatureWPHugetlbfsShmem uint64 = 1 << 12 // WP mode on hugetlbfs and shmem
	FeatureWPUnpopulated    uint64 = 1 << 13 // WP applies to never-populated anon pages (6.4)
	FeaturePoison           uint64 = 1 << 14 // UFFDIO_POISON (6.6)
	FeatureWPAsync          uint64 = 1 << 15 // WP faults resolved by the kernel, tracked for PAGEMAP_SCAN (6.7)
	FeatureMove             uint64 = 1 << 16 // UFFDIO_MOVE (6.8)
)

var featureNames = []struct {
	bit  uint64
	name string
}{
	{FeaturePagefaultFlagWP, "PAGEFAULT_FLAG_WP"},
	{FeatureEventFork, "EVENT_FORK"},
	{FeatureEventRemap, "EVENT_REMAP"},
	{FeatureEventRemove, "EVENT_REMOVE"},
	{FeatureMissingHugetlbfs, "MISSING_HUGETLBFS"},
	{FeatureMissingShmem, "MISSING_SHMEM"},
	{FeatureEventUnmap, "EVENT_UNMAP"},
	{FeatureSigbus, "SIGBUS"},
	{FeatureThreadID, "THREAD_ID"},
	{FeatureMinorHugetlbfs, "MINOR_HUGETLBFS"},
	{FeatureMinorShmem, "MINOR_SHMEM"},
	{FeatureExactAddress, "EXACT_ADDRESS"},
	{FeatureWPHugetlbfsShmem, "WP_HUGETLBFS_SHMEM"},
	{FeatureWPUnpopulated, "WP_UNPOPULATED"},
	{FeaturePoison, "POISON"},
	{FeatureWPAsync, "WP_ASYNC"},
	{FeatureMove, "MOVE"},
}

// Register modes (UFFDIO_REGISTER_MODE_*).
const (
	RegisterMissing uint64 = 1 << 0 // faults on missing pages are reported
	RegisterWP      uint64 = 1 << 1 // writes to write-protected pages are reported (or tracked, with WP_ASYNC)
	RegisterMinor   uint64 = 1 << 2 // minor faults (shmem/hugetlbfs page cache hits)
)

// Mode bits of the range ioctls.
const (
	copyModeDontwake     = 1 << 0 // UFFDIO_COPY_MODE_DONTWAKE
	copyModeWP           = 1 << 1 // UFFDIO_COPY_MODE_WP: place the pages write-protected
	zeropageModeDontwake = 1 << 0 // UFFDIO_ZEROPAGE_MODE_DONTWAKE
	writeprotectModeWP   = 1 << 0 // UFFDIO_WRITEPROTECT_MODE_WP
	pmScanWPMatching     = 1 << 0 // PM_SCAN_WP_MATCHING: write-protect what matched
	pmScanCheckWPAsync   = 1 << 1 // PM_SCAN_CHECK_WPASYNC: fail on a VMA without async WP
)

// Events (uffd_msg.event) and pagefault flags.
const (
	EventPagefault = 0x12 // UFFD_EVENT_PAGEFAULT
	EventFork      = 0x13 // UFFD_EVENT_FORK
	EventRemap     = 0x14 // UFFD_EVENT_REMAP
	EventRemove    = 0x15 // UFFD_EVENT_REMOVE
	EventUnmap     = 0x16 // UFFD_EVENT_UNMAP

	PagefaultFlagWrite uint64 = 1 << 0 // the fault was a write
	PagefaultFlagWP    uint64 = 1 << 1 // the fault was on a write-protected page
	PagefaultFlagMinor uint64 = 1 << 2 // the fault was a minor fault
)

// PAGEMAP_SCAN page categories (PAGE_IS_*), as reported by the kernel.
const (
	PageIsWPAllowed uint64 = 1 << 0 // async write-protect is enabled on the page
	PageIsWritten   uint64 = 1 << 1 // written since it was last write-protected
	PageIsFile      uint64 = 1 << 2 // file-backed
	PageIsPresent   uint64 = 1 << 3 // mapped to a page frame
	PageIsSwapped   uint64 = 1 << 4 // in swap
	PageIsPFNZero   uint64 = 1 << 5 // mapped to the shared zero page
	PageIsHuge      uint64 = 1 << 6 // part of a THP or hugetlb page
	PageIsSoftDirty uint64 = 1 << 7 // soft-dirty bit set
)
