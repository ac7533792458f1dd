package migstate

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func sample(domain string, role Role) Record {
	start, _ := ProcStart(os.Getpid())
	return Record{Domain: domain, Role: role, Peer: "host-b", Mode: "postcopy", State: StatePostcopyPaused,
		Phase: "postcopy-paused", PID: os.Getpid(), PIDStart: start,
		StartedAt: time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC), UpdatedAt: time.Date(2026, 3, 1, 10, 0, 5, 0, time.UTC),
		RecoverToken: "0123abcd", Recoveries: 2}
}

func TestRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	want := sample("vm1", Source)
	require.NoError(t, Write(dir, want))
	want.Version = Version
	recs, errs := List(dir)
	require.Empty(t, errs)
	require.Equal(t, []Record{want}, recs)

	fi, err := os.Stat(dir)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o700), fi.Mode().Perm(), "the records name recovery sockets: root's only")
	fi, err = os.Stat(filepath.Join(dir, "vm1.source.json"))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	// Rewritten whole, nothing left beside it.
	want.State, want.Recoveries = StatePostcopyActive, 3
	require.NoError(t, Write(dir, want))
	recs, _ = List(dir)
	require.Equal(t, []Record{want}, recs)
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, ents, 1, "no temporary file left after a write")

	require.NoError(t, Remove(dir, "vm1", Source))
	require.NoError(t, Remove(dir, "vm1", Source), "removing a removed record is fine")
	recs, errs = List(dir)
	require.Empty(t, recs)
	require.Empty(t, errs)
}

// A crash mid-write leaves a temporary file; another tool (or a disk) may
// leave a file that does not parse. Neither hides the good records, and
// the bad one is reported by name.
func TestListSurvivesTempAndCorruptFiles(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, Write(dir, sample("vm1", Source)))
	require.NoError(t, Write(dir, sample("vm1", Dest)))
	require.NoError(t, os.WriteFile(filepath.Join(dir, ".vm2.source.json.tmp-123"), []byte(`{"version":1,"dom`), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "vm3.source.json"), []byte(`{"version":1,"domain":"vm3",`), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "vm4.source.json"), []byte(`{"version":99,"domain":"vm4","role":"source"}`), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "README"), []byte("not a record"), 0o600))
	recs, errs := List(dir)
	require.Len(t, recs, 2)
	require.Equal(t, Source, recs[0].Role, "source before dest")
	require.Equal(t, Dest, recs[1].Role)
	require.Len(t, errs, 2)
	var pe *ParseError
	require.True(t, errors.As(errs[0], &pe))
	require.Equal(t, filepath.Join(dir, "vm3.source.json"), pe.Path)
	require.ErrorContains(t, errs[1], "format version 99")
}

func TestFileNamesStayInDir(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"../evil", ".hidden", "a b/c"} {
		r := sample(name, Source)
		require.NoError(t, Write(dir, r))
	}
	recs, errs := List(dir)
	require.Empty(t, errs)
	require.Len(t, recs, 3, "a name with a slash or a leading dot is escaped, not lost or outside dir")
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		require.False(t, strings.HasPrefix(e.Name(), "."), e.Name())
	}
	require.NoError(t, Remove(dir, ".hidden", Source))
	recs, _ = List(dir)
	require.Len(t, recs, 2)
	require.Error(t, Write(dir, Record{Domain: "x", Role: "both"}))
	require.Error(t, Write(dir, Record{Role: Source}))
}

// A record is "process gone" once its process has exited, or when its
// pid now names another process.
func TestProcessGone(t *testing.T) {
	cmd := exec.Command("sleep", "0.2")
	require.NoError(t, cmd.Start())
	start, err := ProcStart(cmd.Process.Pid)
	require.NoError(t, err)
	r := sample("vm1", Source)
	r.PID, r.PIDStart = cmd.Process.Pid, start
	require.False(t, r.ProcessGone(), "the child runs")
	require.NoError(t, cmd.Wait())
	require.True(t, r.ProcessGone(), "the child has exited")

	dir := t.TempDir()
	require.NoError(t, Write(dir, r))
	require.NoError(t, Write(dir, sample("vm2", Source)))
	recs, _ := List(dir)
	require.Len(t, recs, 2)
	gone := map[string]bool{}
	for _, r := range recs {
		gone[r.Domain] = r.ProcessGone()
	}
	require.Equal(t, map[string]bool{"vm1": true, "vm2": false}, gone)

	me := sample("vm3", Source)
	me.PIDStart++
	require.True(t, me.ProcessGone(), "same pid, another start time: a reused pid")
}

// A zombie (exited, not yet waited for) has ended too.
func TestZombieIsGone(t *testing.T) {
	cmd := exec.Command("true")
	require.NoError(t, cmd.Start())
	defer cmd.Wait()
	start, err := ProcStart(cmd.Process.Pid)
	if err != nil {
		t.Skipf("the child ended before its start time was read: %v", err)
	}
	r := Record{PID: cmd.Process.Pid, PIDStart: start}
	for deadline := time.Now().Add(5 * time.Second); !r.ProcessGone(); time.Sleep(time.Millisecond) {
		require.False(t, time.Now().After(deadline), "an exited, unwaited child is still taken for running")
	}
}

func TestClean(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	deadPID := cmd.Process.Pid
	mk := func(domain, state string, pid int) {
		r := sample(domain, Source)
		r.State, r.PID, r.PIDStart = state, pid, 0
		require.NoError(t, Write(dir, r))
	}
	mk("failed-gone", StateFailed, deadPID)
	mk("failed-running", StateFailed, os.Getpid())
	mk("crashed", StatePostcopyPaused, deadPID)
	mk("running", StatePostcopyActive, os.Getpid())
	removed, errs := Clean(dir)
	require.Empty(t, errs)
	require.Len(t, removed, 1)
	require.Equal(t, "failed-gone", removed[0].Domain)
	recs, _ := List(dir)
	var left []string
	for _, r := range recs {
		left = append(left, r.Domain)
	}
	require.ElementsMatch(t, []string{"failed-running", "crashed", "running"}, left,
		"a migration whose process died mid-way stays: the admin must see it")
}
