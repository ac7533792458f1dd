package main

import (
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Before GO a signal stops the migration (the domain stays where it ran);
// after GO it does not: the guest runs at the destination with its memory
// still here, and stopping would strand it.
func TestMigrateSignalsStopOnlyBeforeGo(t *testing.T) {
	t.Run("after GO", func(t *testing.T) {
		m := newMigrateSignals("domain 7", "hostB")
		defer m.stop()
		m.passedGo()
		require.NoError(t, syscall.Kill(os.Getpid(), syscall.SIGINT))
		require.NoError(t, syscall.Kill(os.Getpid(), syscall.SIGTERM))
		time.Sleep(300 * time.Millisecond)
		require.NoError(t, m.ctx.Err(), "a signal after GO ended the migration")
	})
	t.Run("before GO", func(t *testing.T) {
		m := newMigrateSignals("domain 7", "hostB")
		defer m.stop()
		require.NoError(t, syscall.Kill(os.Getpid(), syscall.SIGTERM))
		select {
		case <-m.ctx.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("a signal before GO did not stop the migration")
		}
	})
}
