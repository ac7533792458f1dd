package uffd

import (
	"errors"
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// SendFD sends a duplicate of fd over c (SCM_RIGHTS, with one data byte so
// that stream sockets carry it). The caller keeps its own fd.
func SendFD(c *net.UnixConn, fd int) error {
	n, oobn, err := c.WriteMsgUnix([]byte{'F'}, unix.UnixRights(fd), nil)
	if err != nil {
		return fmt.Errorf("send fd %d over %s: %w", fd, c.LocalAddr(), err)
	}
	if n != 1 || oobn == 0 {
		return fmt.Errorf("send fd %d: short write (%d data, %d control bytes)", fd, n, oobn)
	}
	return nil
}

// RecvFD receives one descriptor sent by SendFD. It reads exactly one data
// byte, so data the peer writes after SendFD stays in the socket. The
// returned fd is close-on-exec and owned by the caller.
func RecvFD(c *net.UnixConn) (int, error) {
	buf := make([]byte, 1)
	oob := make([]byte, unix.CmsgSpace(4*4)) // room for a few, to close extras
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return -1, fmt.Errorf("receive fd: %w", err)
	}
	msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
	var fds []int
	if perr == nil {
		for i := range msgs {
			got, err := unix.ParseUnixRights(&msgs[i])
			if err == nil {
				fds = append(fds, got...)
			}
		}
	}
	for _, fd := range fds {
		unix.CloseOnExec(fd) // net already asks for MSG_CMSG_CLOEXEC; be sure
	}
	switch {
	case n == 0:
		closeAll(fds)
		return -1, errors.New("receive fd: peer closed the connection before sending a descriptor")
	case perr != nil:
		return -1, fmt.Errorf("receive fd: parse control message: %w", perr)
	case flags&unix.MSG_CTRUNC != 0:
		closeAll(fds)
		return -1, errors.New("receive fd: control message truncated (peer sent too many descriptors, or RLIMIT_NOFILE reached)")
	case len(fds) != 1:
		closeAll(fds)
		return -1, fmt.Errorf("receive fd: got %d descriptors with the data byte, want exactly 1", len(fds))
	}
	return fds[0], nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
