package link

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"

	"golang.org/x/sys/unix"
)

// staleName matches the namespace names Setup creates and captures the
// owner pid: xlpc-<pid>-<seq>-src|dst.
var staleName = regexp.MustCompile(`^xlpc-([0-9]+)-[0-9]+-(src|dst)$`)

// CleanupStale deletes xlpc-* namespaces whose owning process is dead, such
// as those left by a run that was killed before it could call Close. Setup
// calls it; a CLI may also call it on start-up. Namespaces of live
// processes, including this one, are left alone. A recycled pid makes a
// dead owner look alive, which only delays the clean-up; it never removes a
// namespace still in use.
func CleanupStale() error {
	ents, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil // no named namespaces on this host at all
	}
	if err != nil {
		return fmt.Errorf("listing network namespaces in %s: %w", netnsDir, err)
	}
	var errs []error
	for _, e := range ents {
		m := staleName.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		pid, err := strconv.Atoi(m[1])
		if err != nil || pidAlive(pid) {
			continue
		}
		if err := deleteNetns(e.Name()); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("removing stale link namespaces: %w", errors.Join(errs...))
	}
	return nil
}

// pidAlive reports whether a process with this pid exists. EPERM means it
// exists but belongs to someone else, which counts as alive.
func pidAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	if pid == os.Getpid() {
		return true
	}
	err := unix.Kill(pid, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}
