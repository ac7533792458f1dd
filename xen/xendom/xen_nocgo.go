//go:build !cgo

package xendom

import "errors"

// ErrNoXen is OpenXen's error in a build without cgo (CGO_ENABLED=0, or no
// C compiler): such a binary has no libxenctrl to reach a hypervisor with.
var ErrNoXen = errors.New("this xl-postcopy was built without Xen support (CGO_ENABLED=0): " +
	"rebuild it with cgo and libxen-dev (apt-get install libxen-dev; make build) to migrate Xen domains; " +
	"the lab commands work in this build")

// Xen is the Hypervisor of a real dom0. In this build OpenXen never makes
// one; the type exists so that callers compile the same in both builds.
type Xen struct{ Hypervisor }

// OpenXen fails with ErrNoXen: this build cannot reach a hypervisor.
func OpenXen() (*Xen, error) { return nil, ErrNoXen }

// SetPerGFN does nothing in a build without Xen.
func (x *Xen) SetPerGFN(bool) {}

// Close does nothing in a build without Xen.
func (x *Xen) Close() error { return nil }

// LookupDomain fails with ErrNoXen in a build without Xen.
func (x *Xen) LookupDomain(string) (uint32, error) { return 0, ErrNoXen }
