package main

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/migstate"
)

// goneRecord is the record of a source process that has exited.
func goneRecord(t *testing.T) migstate.Record {
	t.Helper()
	c := exec.Command("true")
	require.NoError(t, c.Run())
	start, _ := migstate.ProcStart(os.Getpid())
	return migstate.Record{Domain: "vm1", Role: migstate.Source, Peer: "hostb", Mode: "postcopy", State: migstate.StatePostcopyPaused,
		PID: c.Process.Pid, PIDStart: start + 1, RecoverToken: "abc", PageSpace: json.RawMessage(`[{"first":0,"count":4}]`)}
}

// --resume takes over only a migration it can: recorded from this host,
// to that host, with recovery, its process gone.
func TestFindTakeOver(t *testing.T) {
	ok := goneRecord(t)
	r, err := findSourceRecordTO([]migstate.Record{{Domain: "vm1", Role: migstate.Dest}, ok}, "vm1", "hostb")
	require.NoError(t, err)
	require.Equal(t, "abc", r.RecoverToken)

	_, err = findSourceRecordTO([]migstate.Record{ok}, "vm2", "hostb")
	require.ErrorContains(t, err, "no migration of vm2")
	_, err = findSourceRecordTO([]migstate.Record{ok}, "vm1", "hostc")
	require.ErrorContains(t, err, "was going to hostb")

	live := ok
	live.PID = os.Getpid()
	live.PIDStart, _ = migstate.ProcStart(os.Getpid())
	_, err = findSourceRecordTO([]migstate.Record{live}, "vm1", "hostb")
	require.ErrorContains(t, err, "still run by process")

	norec := ok
	norec.RecoverToken = ""
	_, err = findSourceRecordTO([]migstate.Record{norec}, "vm1", "hostb")
	require.ErrorContains(t, err, "without recovery")

	nospace := ok
	nospace.PageSpace = nil
	_, err = findSourceRecordTO([]migstate.Record{nospace}, "vm1", "hostb")
	require.ErrorContains(t, err, "no page space")
}

// A take-over's JSON leaves out what the dead process measured (omitted,
// not zero) and keeps what it saw itself.
func TestTakeOverOmitsUnknownFigures(t *testing.T) {
	st := &engine.Stats{TakenOver: true, TotalTimeMs: 12, Recoveries: 1, Verified: true}
	m, err := withoutUnknown(struct {
		*engine.Stats
		Host string `json:"host"`
	}{st, "hostb"})
	require.NoError(t, err)
	for _, k := range takeOverFigures {
		require.NotContains(t, m, k)
	}
	require.Equal(t, true, m["taken_over"])
	require.Equal(t, 12.0, m["total_time_ms"])
	require.Equal(t, "hostb", m["host"])
	_, has := m["verified"]
	require.True(t, has)
}

// A take-over's relays number their attempts above any the dead process
// used, so that the receiver does not drop them as stale.
func TestTakeOverAttemptsAreNewer(t *testing.T) {
	r := attachOnlyLocal("/bin/false", "tok")
	require.Greater(t, r.attempts, uint64(1<<40))
	require.Equal(t, []string{"/bin/false", "migrate-receive", "--attach", "tok", "--link", "7"}, r.attachCmd(7).Args)
}

// --abandon resumes the source copy only when the destination's `xl list`
// ran and shows no copy of the domain.
func TestJudgeDestCopy(t *testing.T) {
	list := "Name                                        ID   Mem VCPUs\tState\tTime(s)\nDomain-0                                     0  1024     1     r-----     359.0\n"
	require.NoError(t, judgeDestCopy("vm1", "hostb", list, nil))
	require.NoError(t, judgeDestCopy("vm1", "hostb", list+"vm10                 7   128     1     -b----       1.0\n", nil))
	err := judgeDestCopy("vm1", "hostb", list+"vm1--incoming                      23     9     1     ------       0.0\n", nil)
	require.ErrorContains(t, err, "xl destroy vm1--incoming")
	err = judgeDestCopy("vm1", "hostb", list+"vm1                      23     9     1     -b----       0.0\n", nil)
	require.ErrorContains(t, err, "still has a copy")
	require.ErrorContains(t, judgeDestCopy("vm1", "hostb", "", errors.New("exit status 255")), "could not tell")
	require.ErrorContains(t, judgeDestCopy("vm1", "hostb", "ssh: connect to host hostb port 22: No route to host\n", nil), "could not tell")
}

func TestFindAbandon(t *testing.T) {
	ok := goneRecord(t)
	_, err := findSourceRecordAB([]migstate.Record{ok}, "vm1", "hostb")
	require.NoError(t, err)
	live := ok
	live.PID = os.Getpid()
	live.PIDStart, _ = migstate.ProcStart(os.Getpid())
	_, err = findSourceRecordAB([]migstate.Record{live}, "vm1", "hostb")
	require.ErrorContains(t, err, "still run by process")
	_, err = findSourceRecordAB([]migstate.Record{ok}, "vm1", "hostc")
	require.ErrorContains(t, err, "not hostc")
}

func findSourceRecordTO(r []migstate.Record, name, host string) (migstate.Record, error) {
	return findSourceRecord(r, name, host, true)
}

func findSourceRecordAB(r []migstate.Record, name, host string) (migstate.Record, error) {
	return findSourceRecord(r, name, host, false)
}
