package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
)

// childPIDs lists this process's children (any thread's).
func childPIDs(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob("/proc/self/task/*/children")
	require.NoError(t, err)
	var pids []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // the thread exited
		}
		pids = append(pids, strings.Fields(string(b))...)
	}
	return pids
}

// A Run whose context is already done (a lab command that got a signal)
// returns the context's error and leaves no child process. (Cancelling a
// Run midway is tested through the CLI, in cmd/xl-postcopy's
// TestLabMigrateSIGTERMCleansUp.)
func TestRunCancelledLeavesNoChild(t *testing.T) {
	require.Empty(t, childPIDs(t), "precondition: no children before the test")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Run(ctx, RunConfig{Domain: smallDomain("zipf")})
	require.ErrorIs(t, err, context.Canceled)
	require.Empty(t, childPIDs(t))
}

// The engine's words about where a domain is are for Xen domains; a lab
// run ends both copies, and its errors must say so, not promise a paused
// copy with all its memory.
func TestLabOutcomeSaysWhatTheLabDid(t *testing.T) {
	cause := errors.New("bulk connection: reset")
	after := labOutcome(&engine.Error{Domain: "lab", Where: engine.AfterGo, Err: cause})
	require.ErrorIs(t, after, cause)
	require.NotContains(t, after.Error(), "PAUSED")
	require.Contains(t, after.Error(), "ended both lab copies")
	before := labOutcome(&engine.Error{Domain: "lab", Where: engine.RunsAtSource, Err: cause})
	require.NotContains(t, before.Error(), "still runs")
	require.Contains(t, before.Error(), "until this command ended it")
	require.Nil(t, labOutcome(nil))
}

// A lab guest stopped with SIGSTOP fails the next control call after the
// control timeout instead of hanging the tool.
func TestStoppedGuestFailsControlCalls(t *testing.T) {
	cfg := smallDomain("zipf")
	cfg.ControlTimeout = 300 * time.Millisecond
	src, err := StartSource(cfg)
	require.NoError(t, err)
	defer src.g.kill()
	require.NoError(t, syscall.Kill(src.g.pid, syscall.SIGSTOP))
	defer syscall.Kill(src.g.pid, syscall.SIGCONT)
	// Stopped once /proc says so (signal delivery is asynchronous).
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", src.g.pid))
		if err != nil {
			return false
		}
		f := strings.Fields(string(b)[strings.LastIndexByte(string(b), ')')+1:])
		return len(f) > 0 && f[0] == "T"
	}, 5*time.Second, 5*time.Millisecond)
	start := time.Now()
	_, err = src.Report()
	require.ErrorContains(t, err, "did not answer")
	require.Less(t, time.Since(start), 10*time.Second)
}
