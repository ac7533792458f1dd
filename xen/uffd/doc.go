// Package uffd is a small wrapper over Linux userfaultfd(2) and the
// PAGEMAP_SCAN ioctl of /proc/<pid>/pagemap, the two kernel mechanisms the
// lab domain backend is built on (DESIGN.md §4):
//
//   - Destination side (post-copy): a memory region is registered in MISSING
//     mode; a thread touching a page that is not there blocks in the kernel
//     and a Msg is queued on the userfaultfd; the fault server fetches the
//     page and places it atomically with Copy (UFFDIO_COPY) or ZeroPage,
//     which also wakes the blocked thread.
//   - Source side (dirty tracking, the Linux twin of Xen log-dirty): a region
//     registered in WP mode on a userfaultfd opened with FeatureWPAsync and
//     FeatureWPUnpopulated is write-protected once; the kernel then resolves
//     write faults itself and only records "written" in the page table, and
//     Pagemap.ScanWritten reads (and re-arms) that record for any process.
//   - Both at once (verifying the destination): a region registered in
//     MISSING and WP modes on a WP_ASYNC userfaultfd, whose pages are placed
//     write-protected (CopyWP; zero pages with ZeroPage then WriteProtect,
//     UFFDIO_ZEROPAGE having no WP mode), records the first write to each
//     placed page; MISSING faults are delivered as before.
//
// # The Go scheduler pitfall, and why the memory lives in a child process
//
// A goroutine that touches a missing page does not enter a system call: it
// takes a page fault in user code and its OS thread sleeps in the kernel
// until the page is placed. The Go runtime cannot tell: it still counts the
// goroutine as running on its P (processor), and neither asynchronous
// preemption nor sysmon reliably take the P back; a stop-the-world (garbage
// collection) also waits for the stuck thread. With few Ps (GOMAXPROCS is 2
// on the lab hosts, and every vCPU goroutine may be faulting at once) the
// goroutine that reads the userfaultfd and calls Copy may never run, and the
// process deadlocks on itself (measured: TestMissingInProcess changed to
// runtime.GOMAXPROCS(1) serves no fault in 10 s). A fault server that
// touched the registered region itself would likewise block on its own
// fault.
//
// The lab domain therefore keeps the guest memory and the vCPU threads in a
// child process. The child creates the userfaultfd, registers its memory and
// passes the descriptor to the migration engine with SendFD; the engine
// wraps it with FromFD (the UFFDIO_API handshake was done in the child) and
// serves the child's faults with Copy and ZeroPage, never touching the
// child's memory. Dirty tracking works the same way across processes: the
// engine opens /proc/<child>/pagemap with OpenPagemap. The tests of this
// package do exactly that by re-executing the test binary as a child; the
// in-process MISSING test raises GOMAXPROCS instead.
//
// Closing a userfaultfd does not wake a thread blocked in read(2) on it, so
// ReadMsgs polls the descriptor together with an internal eventfd that
// Interrupt and Close signal.
package uffd
