package link

import (
	"fmt"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// SetUrgent marks a TCP connection as the urgent channel so demand-fault
// requests and replies do not wait behind bulk page streaming: IP TOS
// LOWDELAY, which the emulated link's filter sends to the high-priority
// band; SO_PRIORITY TC_PRIO_INTERACTIVE (6), which the kernel derives from
// that TOS anyway and which priority-aware qdiscs on real hosts honour; and
// TCP_NODELAY so small messages leave at once.
// Both ends of the channel should call it, since each end shapes its own
// sending direction. On loopback it is harmless.
func SetUrgent(c net.Conn) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return fmt.Errorf("marking connection urgent: %T has no socket to set options on", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("marking connection urgent: %w", err)
	}
	var serr error
	cerr := raw.Control(func(fd uintptr) {
		// TOS first: setting it resets the socket priority.
		if err := unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TOS, urgentTOS); err != nil {
			serr = fmt.Errorf("setting IP_TOS %#x: %w", urgentTOS, err)
			return
		}
		if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PRIORITY, urgentPriority); err != nil {
			serr = fmt.Errorf("setting SO_PRIORITY %d: %w", urgentPriority, err)
			return
		}
		if err := unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
			serr = fmt.Errorf("setting TCP_NODELAY: %w", err)
		}
	})
	if cerr != nil {
		return fmt.Errorf("marking connection urgent: %w", cerr)
	}
	if serr != nil {
		return fmt.Errorf("marking connection urgent: %w", serr)
	}
	return nil
}
