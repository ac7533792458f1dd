package link

import (
	"bytes"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// netnsDir is where `ip netns add` bind-mounts named namespaces.
const netnsDir = "/run/netns"

// capNetAdmin is CAP_NET_ADMIN from linux/capability.h.
const capNetAdmin = 12

// errNeedRoot is returned when the process cannot create namespaces. The
// text is what an administrator needs: the cause and both ways out.
var errNeedRoot = errors.New("creating the emulated link needs root (CAP_NET_ADMIN): run as root or drop --link")

// hasNetAdmin reports whether CAP_NET_ADMIN is in the effective set. Checking
// up front gives a clear message instead of a string of EPERMs from ip/tc.
func hasNetAdmin() bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[capNetAdmin/32].Effective&(1<<(capNetAdmin%32)) != 0
}

// Available reports whether Setup can build a link on this host: it needs
// CAP_NET_ADMIN and the iproute2 commands ip and tc. The error says which
// is missing. Tests of code that uses a link gate themselves on it.
func Available() error {
	if !hasNetAdmin() {
		return errNeedRoot
	}
	for _, cmd := range []string{"ip", "tc"} {
		if _, err := exec.LookPath(cmd); err != nil {
			return fmt.Errorf("the emulated link needs the iproute2 command %s: %w", cmd, err)
		}
	}
	return nil
}

// run executes an iproute2 command and folds its stderr into the error,
// because that is where ip and tc say what they disliked.
func run(name string, args ...string) error {
	cmd := exec.Command(name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("%s not found in PATH: install iproute2: %w", name, err)
		}
		msg := strings.TrimSpace(stderr.String())
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, msg)
	}
	return nil
}

// inNetns runs fn with the calling OS thread switched into the named network
// namespace, so that sockets fn creates belong to that namespace. Sockets
// keep their namespace for life, so they may be used from any goroutine
// afterwards.
//
// The switch happens on a fresh goroutine locked to its thread: the caller's
// thread is never touched. If restoring the original namespace fails, the
// thread is left locked so the runtime destroys it when the goroutine exits
// rather than handing a thread in the wrong namespace to other goroutines.
func inNetns(name string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("opening this thread's network namespace: %w", err)
			return
		}
		defer unix.Close(orig)
		target, err := unix.Open(filepath.Join(netnsDir, name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("opening network namespace %s (was the link closed?): %w", name, err)
			return
		}
		defer unix.Close(target)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering network namespace %s: %w", name, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			// Deliberately no UnlockOSThread: see the function comment.
			errc <- errors.Join(ferr, fmt.Errorf("returning from network namespace %s: %w", name, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
