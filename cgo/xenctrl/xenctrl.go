// Package xenctrl is the project's only binding to the Xen 4.17 tool
// libraries (libxenctrl, libxenforeignmemory, libxenevtchn, libxenstore).
// C types never leave it: every call takes and returns Go types, and every
// failure is an *Error that names the libxc call and the domain and wraps
// the errno as a syscall.Errno, so errors.Is(err, syscall.EPERM) works.
//
// The package builds and links wherever libxen-dev is installed, but only
// works inside a Xen control domain (dom0): Open fails elsewhere with an
// error that says so (errors.Is(err, ErrNotDom0)).
//
// A Handle is safe for concurrent use by several goroutines (libxenctrl
// handles are re-entrant unless opened NON_REENTRANT, which we never do),
// except that Close must not race with other calls. Mappings, dirty
// bitmaps and paging rings are owned by one goroutine at a time.
package xenctrl

/*
#cgo pkg-config: xencontrol xenforeignmemory xenevtchn xenguest xenstore
#include <stdlib.h>
#include "helpers.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
	"unsafe"
)

// PrivcmdPath is the device through which dom0 issues hypercalls; its
// absence is how we know we are not in a Xen control domain.
const PrivcmdPath = "/dev/xen/privcmd"

// PageSize is the Xen page size on x86.
const PageSize = C.XC_PAGE_SIZE

// ErrNotDom0 is matched (errors.Is) by the error Open returns when the
// process does not run in a Xen dom0.
var ErrNotDom0 = errors.New("not running in a Xen dom0")

// ErrClosed is returned by calls on a closed Handle.
var ErrClosed = errors.New("xenctrl: handle is closed")

// notDom0Error is Open's error when the privcmd device is missing.
type notDom0Error struct{ path string }

func (e *notDom0Error) Error() string {
	return fmt.Sprintf("not running in a Xen dom0 (%s missing): run xl-postcopy as root in the "+
		"control domain of a Xen host; if this is dom0, load the driver (modprobe xen-privcmd) "+
		"and mount xenfs (mount -t xenfs xenfs /proc/xen)", e.path)
}

func (e *notDom0Error) Is(target error) bool { return target == ErrNotDom0 }

// Error is a failed libxc/libxenforeignmemory/libxenevtchn call.
type Error struct {
	Op     string        // the C call, e.g. "xc_domain_pause"
	Dom    uint32        // domain id the call was about
	HasDom bool          // false for calls that are not about one domain
	Detail string        // extra context, e.g. "pfn 0x1234"
	Errno  syscall.Errno // errno reported by the call
	Hint   string        // what an administrator can do about it, if known
}

func (e *Error) Error() string {
	s := e.Op
	switch {
	case e.HasDom && e.Detail != "":
		s += fmt.Sprintf("(dom %d, %s)", e.Dom, e.Detail)
	case e.HasDom:
		s += fmt.Sprintf("(dom %d)", e.Dom)
	case e.Detail != "":
		s += "(" + e.Detail + ")"
	}
	s += ": " + e.Errno.Error()
	if e.Hint != "" {
		s += " (" + e.Hint + ")"
	}
	return s
}

// Unwrap makes errors.Is(err, syscall.EXXX) work.
func (e *Error) Unwrap() error { return e.Errno }

// errnoOf turns a failed call's return value and cgo errno into an Errno.
// libxc mostly returns -1 with errno set, a few calls return -errno, and a
// call can fail without setting errno at all (then EIO).
func errnoOf(rc int64, err error) syscall.Errno {
	var en syscall.Errno
	if errors.As(err, &en) && en != 0 {
		return en
	}
	if rc < -1 && rc > -4096 {
		return syscall.Errno(-rc)
	}
	return syscall.EIO
}

// Handle is an open connection to the hypervisor (an xc_interface).
type Handle struct {
	xch   *C.xc_interface
	debug func(msg string)
}

// Open connects to the hypervisor. Outside a Xen dom0 it fails with an
// error matching ErrNotDom0 that starts "not running in a Xen dom0
// (/dev/xen/privcmd missing)".
func Open() (*Handle, error) { return openAt(PrivcmdPath) }

func openAt(privcmd string) (*Handle, error) {
	if _, err := os.Stat(privcmd); errors.Is(err, fs.ErrNotExist) {
		return nil, &notDom0Error{path: privcmd}
	}
	// A NULL logger makes libxc print its own diagnostics on stderr, which
	// is what an administrator debugging a failure wants to see.
	xch, err := C.xc_interface_open(nil, nil, 0)
	if xch == nil {
		e := &Error{Op: "xc_interface_open", Errno: errnoOf(-1, err)}
		if e.Errno == syscall.EACCES || e.Errno == syscall.EPERM {
			e.Hint = "run as root in dom0"
		}
		return nil, e
	}
	return &Handle{xch: xch}, nil
}

// SetDebug makes every call report its result through f (nil turns it
// off). Used by the --debug flags of the commands.
func (h *Handle) SetDebug(f func(msg string)) { h.debug = f }

func (h *Handle) logf(format string, a ...any) {
	if h.debug != nil {
		h.debug(fmt.Sprintf(format, a...))
	}
}

// result checks a call that returns <0 on failure, logs it when debugging
// and builds the *Error.
func (h *Handle) result(op string, dom uint32, detail string, rc int64, err error) error {
	where := fmt.Sprintf("dom %d", dom)
	if detail != "" {
		where += ", " + detail
	}
	if rc >= 0 {
		h.logf("%s(%s) = %d", op, where, rc)
		return nil
	}
	e := &Error{Op: op, Dom: dom, HasDom: true, Detail: detail, Errno: errnoOf(rc, err)}
	h.logf("%s(%s) = %d: %v", op, where, rc, e.Errno)
	return e
}

func (h *Handle) alive() error {
	if h == nil || h.xch == nil {
		return ErrClosed
	}
	return nil
}

// Close releases the connection. It is safe to call twice.
func (h *Handle) Close() error {
	if h == nil || h.xch == nil {
		return nil
	}
	rc, err := C.xc_interface_close(h.xch)
	h.xch = nil
	if rc != 0 {
		return &Error{Op: "xc_interface_close", Errno: errnoOf(int64(rc), err)}
	}
	return nil
}

// LookupDomain returns the id of the domain called name, read from
// xenstore (/local/domain/<id>/name), as `xl domid` does.
func (h *Handle) LookupDomain(name string) (uint32, error) {
	if err := h.alive(); err != nil {
		return 0, err
	}
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	id, err := C.xp_xs_domid_by_name(cs)
	if id < 0 {
		e := &Error{Op: "xenstore lookup", Detail: fmt.Sprintf("name %q", name), Errno: errnoOf(-1, err)}
		if e.Errno == syscall.ENOENT {
			e.Hint = "no domain has that name; see `xl list`"
		} else {
			e.Hint = "is xenstored running?"
		}
		h.logf("xenstore domid_by_name(%q) failed: %v", name, e.Errno)
		return 0, e
	}
	h.logf("xenstore domid_by_name(%q) = %d", name, id)
	return uint32(id), nil
}
