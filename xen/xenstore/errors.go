package xenstore

import (
	"errors"
	"fmt"
	"syscall"
)

// Sentinel errors for the errno names xenstored sends in ERROR replies.
// They are the matching syscall.Errno values, so errors.Is also works with
// io/fs sentinels: errors.Is(err, fs.ErrNotExist) for a missing key.
var (
	ErrNotFound   error = syscall.ENOENT    // the key (or its parent, for RM) does not exist
	ErrPermission error = syscall.EACCES    // the permissions of the node deny the access
	ErrExist      error = syscall.EEXIST    // the node exists (MKDIR on some daemons)
	ErrInvalid    error = syscall.EINVAL    // malformed path or request
	ErrAgain      error = syscall.EAGAIN    // transaction conflict: retry it
	ErrBusy       error = syscall.EBUSY     // too many transactions or pending requests
	ErrQuota      error = syscall.ENOSPC    // a quota of the domain is exhausted
	ErrTooBig     error = syscall.E2BIG     // payload or path too long
	ErrNotPerm    error = syscall.EPERM     // the operation is reserved to dom0
	ErrNoSys      error = syscall.ENOSYS    // the daemon does not implement the operation
	ErrIsDir      error = syscall.EISDIR    // the path names a directory where a value is wanted
	ErrNotEmpty   error = syscall.ENOTEMPTY // the node still has children
	ErrReadOnly   error = syscall.EROFS     // read-only connection
	ErrIO         error = syscall.EIO       // daemon-side I/O failure
	ErrNoMem      error = syscall.ENOMEM    // daemon out of memory
	ErrIsConn     error = syscall.EISCONN   // the domain is already introduced
)

// errnos maps the names of xsd_errors (io/xs_wire.h) to errors.
var errnos = map[string]error{
	"EINVAL": ErrInvalid, "EACCES": ErrPermission, "EEXIST": ErrExist, "EISDIR": ErrIsDir,
	"ENOENT": ErrNotFound, "ENOMEM": ErrNoMem, "ENOSPC": ErrQuota, "EIO": ErrIO,
	"ENOTEMPTY": ErrNotEmpty, "ENOSYS": ErrNoSys, "EROFS": ErrReadOnly, "EBUSY": ErrBusy,
	"EAGAIN": ErrAgain, "EISCONN": ErrIsConn, "E2BIG": ErrTooBig, "EPERM": ErrNotPerm,
	// Not in xs_wire.h's table, but sent by oxenstored for quota errors.
	"EQUOTA": ErrQuota,
}

// Error is an ERROR reply from xenstored. It unwraps to the sentinel for
// its errno name when the name is known.
type Error struct {
	Op    Op     // the request that failed
	Path  string // its path, when the request had one
	Errno string // the name sent by the daemon, e.g. "ENOENT"
}

func (e *Error) Error() string {
	var hint string
	if err := errnos[e.Errno]; err != nil {
		hint = " (" + err.Error() + ")"
	}
	if e.Path != "" {
		return fmt.Sprintf("xenstore %s %s: %s%s", e.Op, e.Path, e.Errno, hint)
	}
	return fmt.Sprintf("xenstore %s: %s%s", e.Op, e.Errno, hint)
}

// Unwrap returns the sentinel error for the errno name, or nil for a name
// this package does not know.
func (e *Error) Unwrap() error { return errnos[e.Errno] }

// ErrClosed is returned for requests on a Client that was closed or whose
// connection failed; errors.Is(err, ErrClosed) tells them apart from a
// daemon's refusal.
var ErrClosed = errors.New("xenstore connection closed")

// parseError turns an ERROR payload ("ENOENT\0") into an *Error.
func parseError(op Op, path string, p []byte) error {
	name := string(p)
	if len(p) > 0 && p[len(p)-1] == 0 {
		name = string(p[:len(p)-1])
	}
	if !validErrno(name) {
		return fmt.Errorf("%w: %s %s: ERROR reply with malformed errno %q", ErrProtocol, op, path, truncate(p))
	}
	return &Error{Op: op, Path: path, Errno: name}
}

// validErrno accepts names shaped like errno names: 'E' then capitals or
// digits. Unknown but well-formed names still become *Error.
func validErrno(s string) bool {
	if len(s) < 2 || len(s) > 32 || s[0] != 'E' {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if (c < 'A' || c > 'Z') && (c < '0' || c > '9') {
			return false
		}
	}
	return true
}

// ErrnoName returns the xenstored errno name for err ("ENOENT" for
// ErrNotFound), or "EINVAL" when err matches none; test doubles use it to
// build ERROR replies.
func ErrnoName(err error) string {
	for name, e := range errnos {
		if name != "EQUOTA" && errors.Is(err, e) {
			return name
		}
	}
	return "EINVAL"
}
