package migstate

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// ProcStart returns the start time of process pid (field 22 of
// /proc/PID/stat: clock ticks after boot). With the pid it names one
// process for the life of the host, where the pid alone may be reused.
func ProcStart(pid int) (uint64, error) {
	_, start, err := procStat(pid)
	return start, err
}

// procStat reads the state letter and start time of pid.
func procStat(pid int) (byte, uint64, error) {
	if pid <= 0 {
		return 0, 0, fmt.Errorf("pid %d", pid)
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces
	// and parentheses itself: the fields that follow start after the
	// last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, errors.New("/proc stat without a command name")
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state), so field 22 (starttime) is f[19].
	if len(f) < 20 || len(f[0]) != 1 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f)+2)
	}
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("/proc/%d/stat start time: %w", pid, err)
	}
	return f[0][0], start, nil
}

// alive says process pid runs and is the one that started at start (0:
// not known, the pid alone decides). A zombie has ended: it only waits
// for its parent to read its status.
func alive(pid int, start uint64) bool {
	state, st, err := procStat(pid)
	if err != nil {
		return false
	}
	if state == 'Z' || state == 'X' {
		return false
	}
	return start == 0 || st == start
}
