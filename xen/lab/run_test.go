package lab

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

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
