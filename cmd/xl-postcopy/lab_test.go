package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/lab"
	"github.com/xl-postcopy/xl-postcopy/xen/link"
	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

// The lab commands start their guests by re-executing their own binary;
// in `go test` that is the test binary, which must then act as the guest
// (as main does). The tests here also run the built command itself.
func TestMain(m *testing.M) {
	if lab.IsGuest() {
		os.Exit(lab.GuestMain())
	}
	code := m.Run()
	if cliDir != "" {
		os.RemoveAll(cliDir)
	}
	os.Exit(code)
}

var (
	cliOnce sync.Once
	cliDir  string
	cliPath string
	cliErr  error
)

// builtCLI builds the xl-postcopy command once per test run and returns
// its path.
func builtCLI(t *testing.T) string {
	t.Helper()
	cliOnce.Do(func() {
		goCmd, err := exec.LookPath("go")
		if err != nil {
			cliErr = fmt.Errorf("building the CLI needs go on PATH (make puts /usr/local/go/bin there): %w", err)
			return
		}
		if cliDir, cliErr = os.MkdirTemp("", "xlpc-cli-test-"); cliErr != nil {
			return
		}
		cliPath = filepath.Join(cliDir, "xl-postcopy")
		out, err := exec.Command(goCmd, "build", "-o", cliPath, ".").CombinedOutput()
		if err != nil {
			cliErr = fmt.Errorf("go build of the CLI: %v\n%s", err, out)
		}
	})
	require.NoError(t, cliErr)
	return cliPath
}

// requireLink skips unless an emulated link can be built here: root
// (CAP_NET_ADMIN) and iproute2, the same gate as xen/link's own namespace
// tests (requireNetAdmin there).
func requireLink(t *testing.T) {
	t.Helper()
	if err := link.Available(); err != nil {
		t.Skipf("needs what --link needs (root with CAP_NET_ADMIN, iproute2), like xen/link's namespace tests: %v", err)
	}
}

// namespacesOf lists the link namespaces of process pid in `ip netns list`.
func namespacesOf(t *testing.T, pid int) []string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	require.NoError(t, err, string(out))
	var ns []string
	for _, f := range strings.Fields(string(out)) {
		if strings.HasPrefix(f, fmt.Sprintf("xlpc-%d-", pid)) {
			ns = append(ns, f)
		}
	}
	return ns
}

// groupProcs lists the processes (pid and name, zombies included) of
// process group pgid.
func groupProcs(pgid int) []string {
	ents, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue // exited meanwhile
		}
		s := string(b)
		i, j := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if i < 0 || j < i {
			continue
		}
		f := strings.Fields(s[j+1:]) // state ppid pgrp ...
		if len(f) < 3 {
			continue
		}
		if g, _ := strconv.Atoi(f[2]); g == pgid {
			out = append(out, fmt.Sprintf("%d %s (state %s)", pid, s[i+1:j], f[0]))
		}
	}
	return out
}

// syncBuffer collects a subprocess's stderr.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// exitCode waits for cmd and returns its exit status; a death by signal
// fails the test (the command must handle the signal itself).
func exitCode(t *testing.T, cmd *exec.Cmd, stderr fmt.Stringer) int {
	t.Helper()
	return exitStatus(t, cmd.Wait(), stderr)
}

// exitStatus is exitCode for the error of a cmd.Wait; a death by signal is
// reported as -1, after failing the test (but letting it go on, so that
// it can still say what such a death left behind).
func exitStatus(t *testing.T, err error, stderr fmt.Stringer) int {
	t.Helper()
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	require.True(t, errors.As(err, &ee), "%v", err)
	ws := ee.Sys().(syscall.WaitStatus)
	if ws.Signaled() {
		t.Errorf("the command was killed by %v instead of handling it; stderr:\n%s", ws.Signal(), stderr)
		return -1
	}
	return ws.ExitStatus()
}

// The memory flags of `lab migrate` are checked before anything starts:
// NaN is not a size, and 1T is more than this host can give to two copies
// of the guest. Both are usage errors (exit 2) that name the flag, the
// value and the limit; no guest process and no link namespace is created.
func TestLabMigrateMemFlagChecksBeforeStarting(t *testing.T) {
	bin := builtCLI(t)
	limit, _ := maxLabMem()
	withLink := link.Available() == nil
	for _, tc := range []struct {
		value, problem string
	}{
		{"NaN", `--mem "NaN": not a size (a plain number with an optional K/M/G/T suffix, e.g. 256M)`},
		{"1T", "--mem 1T: too large"},
	} {
		t.Run(tc.value, func(t *testing.T) {
			if tc.value == "1T" && limit >= 1<<40 {
				t.Skipf("precondition absent: this host can give a 1T lab domain (limit %s)", showSize(limit))
			}
			args := []string{"lab", "migrate", "--mem", tc.value}
			if withLink {
				// Where a link can be built, show that none is.
				args = append(args, "--link", "1gbit")
			} else {
				t.Log("not root: the check that no link namespace is created is skipped (needs CAP_NET_ADMIN, as xen/link's tests)")
			}
			cmd := exec.Command(bin, args...)
			var stderr syncBuffer
			cmd.Stderr = &stderr
			require.NoError(t, cmd.Start())
			pid := cmd.Process.Pid
			code := exitCode(t, cmd, &stderr)
			out := stderr.String()
			assert.Equal(t, 2, code, "usage error; stderr:\n%s", out)
			assert.Contains(t, out, "xl-postcopy lab migrate: "+tc.problem+": want 64K to ")
			assert.Regexp(t, regexp.MustCompile(`want 64K to [0-9]+[KMG][^;]*; [0-9]+[KMG] is the most this host can give: the lab needs about 2× --mem, because the source and the destination each hold a full copy`), out)
			assert.Contains(t, out, "available (MemAvailable in /proc/meminfo)")
			assert.Contains(t, out, "Run 'xl-postcopy lab migrate --help' for usage.")
			assert.NotContains(t, out, "migrating lab domain", "nothing started")
			assert.NotContains(t, out, "lab guest", "no guest process started")
			if withLink {
				assert.Empty(t, namespacesOf(t, pid), "no link namespace was created")
			}
		})
	}
}

// The other size, duration and count flags of the lab commands are checked
// the same way (in process: runMain is what main runs). The host is posed
// as one with 1 GiB available, so that the memory limit is known: (1 GiB
// less 256 MiB of headroom) / 2 = 384M.
func TestLabFlagsUsageErrors(t *testing.T) {
	hostMemory = func() (uint64, string, error) { return 1 << 30, "MemAvailable in /proc/meminfo", nil }
	t.Cleanup(func() { hostMemory = readHostMemory })
	dir := t.TempDir()
	traceFile := filepath.Join(dir, "some.trace")
	out := filepath.Join(dir, "out")
	bench := func(args ...string) []string {
		return append([]string{"bench", "--out", out, "--workloads", "zipf", "--modes", "precopy"}, args...)
	}
	labTrace := func(args ...string) []string {
		return append([]string{"lab", "trace", "-o", filepath.Join(dir, "t"), "--interval", "50ms", "--duration", "100ms"}, args...)
	}
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"lab", "migrate", "--mem", "512M"}, "--mem 512M: too large: want 64K to 384M; 384M is the most this host can give: the lab needs about 2× --mem, " +
			"because the source and the destination each hold a full copy of the guest memory, and this host has 1.00 GiB available (MemAvailable in /proc/meminfo), less 256.0 MiB of headroom"},
		{[]string{"lab", "migrate", "--mem", "Inf"}, `--mem "Inf": not a size`},
		{[]string{"lab", "migrate", "--mem", "1e3"}, `--mem "1e3": not a size`},
		{[]string{"lab", "migrate", "--mem", "-64M"}, `--mem "-64M": not a size`},
		{[]string{"lab", "migrate", "--mem", "0"}, "--mem 0: too small: want 64K to 384M"},
		{[]string{"lab", "migrate", "--mem", "0.3M"}, "--mem 0.3M: 314572 bytes is not a whole number of 4 KiB pages: use 304K or 308K"},
		{[]string{"lab", "migrate", "--mem", "64M", "--working-set", "64M"}, "--working-set 64M: too large: want 4K to 56M; the working set must fit in --mem 64M less the default --free of --mem/8 = 8M"},
		{[]string{"lab", "migrate", "--mem", "64M", "--working-set", "0"}, "--working-set 0: too small: want 4K to 56M"},
		{[]string{"lab", "migrate", "--mem", "64M", "--free", "64M"}, "--free 64M: too large: want 0 to 65532K; --free must leave at least one page of --mem 64M usable"},
		{[]string{"lab", "migrate", "--mem", "64M", "--free", "1000"}, "--free 1000: too large"},
		{[]string{"lab", "migrate", "--mem", "64M", "--working-set", "16M", "--free", "5K"}, "--free 5K: 5120 bytes is not a whole number of 4 KiB pages: use 4K or 8K"},
		{[]string{"lab", "migrate", "--window", "0"}, "--window 0: too small: want 4K to 1G"},
		{[]string{"lab", "migrate", "--window", "NaN"}, `--window "NaN": not a size`},
		{[]string{"lab", "migrate", "--warmup", "-1s"}, "--warmup -1s: too small: want 1ms to 1h0m0s"},
		{[]string{"lab", "migrate", "--warmup", "0s"}, "--warmup 0s: too small: want 1ms to 1h0m0s"},
		{[]string{"lab", "migrate", "--after", "-300ms"}, "--after -300ms: too small: want 1ms to 1h0m0s"},
		{[]string{"lab", "migrate", "--record", "-1s"}, "--record -1s: too small: want 1ms to 1h0m0s"},
		{[]string{"lab", "migrate", "--record-interval", "-20ms"}, "--record-interval -20ms: too small: want 1ms to 1s; at most --record"},
		{[]string{"lab", "migrate", "--record-interval", "2s"}, "--record-interval 2s: too large: want 1ms to 1s; at most --record"},
		{[]string{"lab", "migrate", "--max-rounds", "-3"}, "--max-rounds -3: too small: want 1 to 100"},
		{[]string{"lab", "migrate", "--hybrid-rounds", "-1"}, "--hybrid-rounds -1: too small: want 1 to 100"},
		{[]string{"lab", "migrate", "--pivots", "0"}, "--pivots 0: too small: want 1 to 1024"},
		{[]string{"lab", "migrate", "--vcpus", "0"}, "--vcpus 0: too small: want 1 to 64"},
		{[]string{"lab", "migrate", "--op-cost", "-5"}, "--op-cost -5: too small: want 0 to 1000000"},
		{[]string{"lab", "migrate", "--batch", "0"}, "--batch 0: too small: want 1 to 1024"},
		{[]string{"lab", "migrate", "--link", "fast"}, `--link fast: link rate "fast": unknown unit`},
		{[]string{"lab", "migrate", "--trace", traceFile}, "--trace " + traceFile + ": only the trace workload reads a trace file, and --workload is zipf: add trace to --workload or drop --trace"},
		{[]string{"lab", "migrate", "--workload", "trace"}, "--workload trace: the trace workload needs --trace FILE"},
		{bench("--max-rounds", "-1"), "xl-postcopy bench: --max-rounds -1: too small: want 1 to 100"},
		{bench("--warmup", "-1s"), "xl-postcopy bench: --warmup -1s: too small"},
		{bench("--mem", "NaN"), `xl-postcopy bench: --mem "NaN": not a size`},
		{bench("--trace", traceFile), "xl-postcopy bench: --trace " + traceFile + ": only the trace workload reads a trace file, and --workloads is zipf: add trace to --workloads or drop --trace"},
		{labTrace("--warmup", "-1s"), "xl-postcopy lab trace: --warmup -1s: too small"},
		{labTrace("--mem", "NaN"), `xl-postcopy lab trace: --mem "NaN": not a size`},
		{labTrace("--trace", traceFile), "xl-postcopy lab trace: --trace " + traceFile + ": only the trace workload reads a trace file"},
	} {
		var code int
		stderr := captureStderr(t, func() { code = runMain(tc.args) })
		assert.Equal(t, 2, code, "%v: stderr:\n%s", tc.args, stderr)
		assert.Contains(t, stderr, tc.msg, "%v", tc.args)
		assert.Contains(t, stderr, "--help' for usage.", "%v", tc.args)
		assert.NotContains(t, stderr, "migrating lab domain", "%v", tc.args)
	}
	_, err := os.Stat(out)
	assert.True(t, os.IsNotExist(err), "bench created nothing: %v", err)
}

// Killing `lab migrate --link` with SIGTERM stops it cleanly: it exits 1
// with a message that says so, and leaves neither of its two link
// namespaces nor any of its lab guest processes behind. The signal is
// sent once during the migration (both guests running), and once while
// the link is being set up (as soon as its first namespace appears).
func TestLabMigrateSIGTERMCleansUp(t *testing.T) {
	requireLink(t)
	bin := builtCLI(t)
	start := func(t *testing.T) (*exec.Cmd, *syncBuffer) {
		cmd := exec.Command(bin, "lab", "migrate", "--link", "1gbit", "--mem", "512M", "--working-set", "256M", "--warmup", "300ms")
		// Its own process group: the guests inherit it, so they can be
		// found (and, should the test fail, killed) by group.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		stderr := &syncBuffer{}
		cmd.Stderr = stderr
		require.NoError(t, cmd.Start())
		pid := cmd.Process.Pid
		t.Cleanup(func() {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			_ = link.CleanupStale() // whatever a failed run left
		})
		return cmd, stderr
	}
	// waitFor polls cond for up to a minute (a liveness bound, not a
	// speed requirement).
	waitFor := func(t *testing.T, what string, stderr *syncBuffer, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(time.Minute); !cond(); time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s; stderr:\n%s", what, stderr)
			}
		}
	}
	check := func(t *testing.T, cmd *exec.Cmd, stderr *syncBuffer, when *regexp.Regexp) {
		pid := cmd.Process.Pid
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		var code int
		select {
		case err := <-done:
			code = exitStatus(t, err, stderr)
		case <-time.After(2 * time.Minute):
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			t.Fatalf("lab migrate did not exit after SIGTERM; stderr:\n%s", stderr)
		}
		out := stderr.String()
		assert.Equal(t, 1, code, "stderr:\n%s", out)
		assert.Contains(t, out, "xl-postcopy lab migrate: got SIGTERM: stopping and cleaning up")
		assert.Regexp(t, when, out)
		assert.Contains(t, out, fmt.Sprintf("removed the link's namespaces xlpc-%d-1-src and xlpc-%d-1-dst", pid, pid))
		assert.Empty(t, namespacesOf(t, pid), "namespaces of the killed run in `ip netns list`")
		var left []string
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if left = groupProcs(pid); len(left) == 0 || time.Now().After(deadline) {
				break
			}
		}
		assert.Empty(t, left, "processes of the killed run")
	}

	t.Run("during the migration", func(t *testing.T) {
		cmd, stderr := start(t)
		pid := cmd.Process.Pid
		// Both the source and the destination guest run: the migration
		// is under way.
		waitFor(t, "the destination lab guest", stderr, func() bool {
			n := 0
			for _, p := range groupProcs(pid) {
				if !strings.HasPrefix(p, strconv.Itoa(pid)+" ") && strings.Contains(p, " xl-postcopy ") {
					n++
				}
			}
			return n >= 2
		})
		check(t, cmd, stderr, regexp.MustCompile(`xl-postcopy lab migrate: interrupted by SIGTERM during the migration: stopped it, ended the lab guests and removed the link's namespaces`))
	})
	t.Run("while setting up the link", func(t *testing.T) {
		cmd, stderr := start(t)
		prefix := fmt.Sprintf("xlpc-%d-", cmd.Process.Pid)
		waitFor(t, "the link's first namespace", stderr, func() bool {
			ents, _ := os.ReadDir("/run/netns")
			for _, e := range ents {
				if strings.HasPrefix(e.Name(), prefix) {
					return true
				}
			}
			return false
		})
		// Setup may have finished by the time the signal lands.
		check(t, cmd, stderr, regexp.MustCompile(`xl-postcopy lab migrate: interrupted by SIGTERM (while setting up the link: started no lab guest|during the migration: stopped it, ended the lab guests) and removed`))
	})
}

// `lab trace` records with the shared recorder (xen/trace/record): a
// trace file that trace.Read accepts, rounds and times in order, round 0
// at time 0, and the summary line.
func TestLabTraceRecords(t *testing.T) {
	path := filepath.Join(t.TempDir(), "zipf.trace")
	var code int
	out := captureStderr(t, func() {
		code = runMain([]string{"lab", "trace", "-o", path, "--mem", "16M", "--working-set", "4M", "--warmup", "50ms", "--interval", "10ms", "--duration", "100ms"})
	})
	require.Equal(t, 0, code, "stderr: %s", out)
	assert.Regexp(t, `wrote .*zipf\.trace: [1-9][0-9]* accesses, [1-9][0-9]* distinct pages, 100ms`, out)
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	tr, err := trace.Read(f)
	require.NoError(t, err)
	assert.Equal(t, "lab:zipf", tr.Source)
	assert.Equal(t, 10*time.Millisecond, tr.Interval)
	require.NotEmpty(t, tr.Accesses)
	if tr.Accesses[0].Round == 0 {
		assert.Zero(t, tr.Accesses[0].T, "round 0 starts at the start of recording")
	}
	for i := 1; i < len(tr.Accesses); i++ {
		a, b := tr.Accesses[i-1], tr.Accesses[i]
		require.True(t, b.Round > a.Round || b.Round == a.Round && b.PFN > a.PFN && b.T == a.T, "access %d out of order: %+v after %+v", i, b, a)
	}
}
