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
