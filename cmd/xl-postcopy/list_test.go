package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/migstate"
)

// listCmd runs `xl-postcopy list args...` and returns its exit code,
// stdout and stderr.
func listCmd(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var code int
	var out string
	errOut := captureStderr(t, func() {
		out = captureStdout(t, func() { code = runMain(append([]string{"list"}, args...)) })
	})
	return code, out, errOut
}

// stateDir is a state directory for this test with: vm1's source, paused
// after a break and running (this process); vm2's destination, whose
// process died mid-way; vm3's source, failed, its process gone.
func stateDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	t.Setenv(migstate.EnvDir, dir)
	dead := exec.Command("true")
	require.NoError(t, dead.Run())
	me := os.Getpid()
	meStart, err := migstate.ProcStart(me)
	require.NoError(t, err)
	start := time.Now().Add(-95 * time.Second).UTC()
	for _, r := range []migstate.Record{
		{Domain: "vm1", Role: migstate.Source, Peer: "host-b", Mode: "postcopy", State: migstate.StatePostcopyPaused,
			Phase: "postcopy-paused", PID: me, PIDStart: meStart, StartedAt: start, RecoverToken: "abc", Recoveries: 2},
		{Domain: "vm2", Role: migstate.Dest, Mode: "hybrid", State: migstate.StateActive, Phase: "setup",
			PID: dead.Process.Pid, StartedAt: start.Add(time.Second)},
		{Domain: "vm3", Role: migstate.Source, Peer: "host-c", Mode: "postcopy", State: migstate.StateFailed, Phase: "postcopy",
			PID: dead.Process.Pid, StartedAt: start.Add(2 * time.Second), Where: "source copy paused, destination may run it",
			WhatToDo: "migrate vm3: migration failed after switchover: link down; check the destination"},
	} {
		require.NoError(t, migstate.Write(dir, r))
	}
	return dir
}

func TestListTable(t *testing.T) {
	stateDir(t)
	code, out, errOut := listCmd(t)
	require.Equal(t, 0, code, errOut)
	require.Regexp(t, `(?m)^DOMAIN +ROLE +PEER +STATE +PHASE +AGE +PID +RECOVERIES$`, out)
	require.Regexp(t, `(?m)^vm1 +source +host-b +postcopy-paused +postcopy-paused +1m3[45]s +`+strconv.Itoa(os.Getpid())+` +2$`, out)
	require.Regexp(t, `(?m)^vm2 +dest +- +active +setup +1m3[34]s +process gone +0$`, out, "a process that died mid-way is what the admin must see")
	require.NotContains(t, out, "vm3", "ended: only with --all")
	require.Contains(t, errOut, "1 ended migration(s) not shown: xl-postcopy list --all")

	code, out, _ = listCmd(t, "--all")
	require.Equal(t, 0, code)
	require.Regexp(t, `(?m)^vm3 +source +host-c +failed +postcopy +\S+ +process gone +0$`, out)
	require.Regexp(t, `(?m)^vm3 \(source\): source copy paused, destination may run it\n  migrate vm3: .*check the destination$`, out)
}

func TestListJSON(t *testing.T) {
	stateDir(t)
	for _, c := range []struct {
		args []string
		want map[string]bool // domain → process_gone
	}{
		{nil, map[string]bool{"vm1": false, "vm2": true}},
		{[]string{"--all"}, map[string]bool{"vm1": false, "vm2": true, "vm3": true}},
	} {
		code, out, errOut := listCmd(t, append([]string{"--json"}, c.args...)...)
		require.Equal(t, 0, code, errOut)
		var got []struct {
			migstate.Record
			ProcessGone bool `json:"process_gone"`
		}
		require.NoError(t, json.Unmarshal([]byte(out), &got), out)
		gone := map[string]bool{}
		for _, r := range got {
			gone[r.Domain] = r.ProcessGone
		}
		require.Equal(t, c.want, gone, c.args)
		require.Equal(t, "abc", got[0].RecoverToken)
		require.Equal(t, migstate.StatePostcopyPaused, got[0].State)
	}
	t.Setenv(migstate.EnvDir, t.TempDir())
	code, out, _ := listCmd(t, "--json")
	require.Equal(t, 0, code)
	require.Equal(t, "[]\n", out, "no records: an empty array, not null")
}

// --clean removes the ended records whose process is gone, and only
// those; a file that does not parse is named and makes list fail, after
// the good records are printed.
func TestListCleanAndCorrupt(t *testing.T) {
	dir := stateDir(t)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "vm9.dest.json"), []byte("{garbage"), 0o600))
	code, out, errOut := listCmd(t, "--clean", "--all")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "removed the record of vm3 (source, failed)")
	require.Regexp(t, regexp.MustCompile(`state file .*vm9\.dest\.json: `), errOut)
	require.Contains(t, out, "vm1")
	require.Contains(t, out, "vm2")
	require.NotContains(t, out, "vm3")
	_, err := os.Stat(filepath.Join(dir, "vm3.source.json"))
	require.ErrorIs(t, err, os.ErrNotExist)
	require.Equal(t, 2, runMain([]string{"list", "extra"}))
}

func TestFmtAge(t *testing.T) {
	for d, want := range map[time.Duration]string{
		-time.Second: "0s", 42 * time.Second: "42s", 185 * time.Second: "3m05s",
		2*time.Hour + 10*time.Minute + 5*time.Second: "2h10m", 76 * time.Hour: "3d04h",
	} {
		require.Equal(t, want, fmtAge(d), d)
	}
}
