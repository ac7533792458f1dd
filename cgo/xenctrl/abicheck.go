package xenctrl

/*
#include "helpers.h"
#include "batch.h"
#include <xenguest.h>
*/
import "C"

// same(a, b) compiles only if a == b: a constant index other than 0 into a
// one-element array is a compile-time error. types.go spells these values
// out so that it builds without cgo; this keeps them equal to the headers
// the cgo build compiles against.
var _ = [...]struct{}{
	[1]struct{}{}[int64(PageSize)-int64(C.XC_PAGE_SIZE)],
	[1]struct{}{}[int64(PageNormal)-int64(C.XEN_DOMCTL_PFINFO_NOTAB)],
	[1]struct{}{}[int64(PageL1)-int64(C.XEN_DOMCTL_PFINFO_L1TAB)],
	[1]struct{}{}[int64(PageL2)-int64(C.XEN_DOMCTL_PFINFO_L2TAB)],
	[1]struct{}{}[int64(PageL3)-int64(C.XEN_DOMCTL_PFINFO_L3TAB)],
	[1]struct{}{}[int64(PageL4)-int64(C.XEN_DOMCTL_PFINFO_L4TAB)],
	[1]struct{}{}[int64(PagePinned)-int64(C.XEN_DOMCTL_PFINFO_LPINTAB)],
	[1]struct{}{}[int64(PageInvalid)-int64(C.XEN_DOMCTL_PFINFO_XTAB)],
	[1]struct{}{}[int64(PageXAlloc)-int64(C.XEN_DOMCTL_PFINFO_XALLOC)],
	[1]struct{}{}[int64(PageBroken)-int64(C.XEN_DOMCTL_PFINFO_BROKEN)],
	[1]struct{}{}[int64(pageMask)-int64(C.XEN_DOMCTL_PFINFO_LTAB_MASK)],
	[1]struct{}{}[int64(pageTypeMask)-int64(C.XEN_DOMCTL_PFINFO_LTABTYPE_MASK)],
	[1]struct{}{}[int64(HVMParamStorePFN)-int64(C.HVM_PARAM_STORE_PFN)],
	[1]struct{}{}[int64(HVMParamConsolePFN)-int64(C.HVM_PARAM_CONSOLE_PFN)],
	[1]struct{}{}[int64(HVMParamPagingRingPFN)-int64(C.HVM_PARAM_PAGING_RING_PFN)],
	[1]struct{}{}[int64(VMEventInterfaceVersion)-int64(C.VM_EVENT_INTERFACE_VERSION)],
	[1]struct{}{}[int64(FlagVCPUPaused)-int64(C.VM_EVENT_FLAG_VCPU_PAUSED)],
	[1]struct{}{}[int64(FlagForeign)-int64(C.VM_EVENT_FLAG_FOREIGN)],
	[1]struct{}{}[int64(ReasonMemPaging)-int64(C.VM_EVENT_REASON_MEM_PAGING)],
	[1]struct{}{}[int64(PagingDropPage)-int64(C.MEM_PAGING_DROP_PAGE)],
	[1]struct{}{}[int64(PagingEvictFail)-int64(C.MEM_PAGING_EVICT_FAIL)],
	[1]struct{}{}[int64(ShutdownPoweroff)-int64(C.SHUTDOWN_poweroff)],
	[1]struct{}{}[int64(ShutdownReboot)-int64(C.SHUTDOWN_reboot)],
	[1]struct{}{}[int64(ShutdownSuspend)-int64(C.SHUTDOWN_suspend)],
	[1]struct{}{}[int64(ShutdownCrash)-int64(C.SHUTDOWN_crash)],
	[1]struct{}{}[int64(shutdownMax)-int64(C.SHUTDOWN_MAX)],
	[1]struct{}{}[int64(MaxPagingBatch)-int64(C.XP_BATCH_MAX)],
}
