package uffd

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The cross-process tests re-execute the test binary with childEnv set; the
// child owns the memory (like a lab domain) and talks over stdin/stdout:
// it prints "ready <base> <pages>", then answers commands line by line.
const childEnv = "UFFD_TEST_CHILD"

func TestMain(m *testing.M) {
	switch mode := os.Getenv(childEnv); mode {
	case "":
		os.Exit(m.Run())
	case "wp":
		os.Exit(childMain(childWP))
	case "missing":
		os.Exit(childMain(childMissing))
	default:
		fmt.Fprintf(os.Stderr, "unknown %s=%q\n", childEnv, mode)
		os.Exit(2)
	}
}

func childMain(f func(in *bufio.Scanner, out io.Writer) error) int {
	in := bufio.NewScanner(os.Stdin)
	if err := f(in, os.Stdout); err != nil {
		fmt.Fprintf(os.Stdout, "error %v\n", err)
		return 1
	}
	return 0
}

// childMem maps private anonymous memory without transparent huge pages, so
// that page-granular assertions do not depend on THP policy.
func childMem(pages int) ([]byte, uintptr, error) {
	mem, err := unix.Mmap(-1, 0, pages*PageSize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, 0, fmt.Errorf("mmap: %w", err)
	}
	if err := unix.Madvise(mem, unix.MADV_NOHUGEPAGE); err != nil {
		return nil, 0, fmt.Errorf("madvise: %w", err)
	}
	return mem, memAddr(mem), nil
}

const (
	wpChildPages     = 256
	wpChildPrefilled = 64 // pages 0..63 are populated before tracking starts
)

// childWP sets up WP_ASYNC dirty tracking on its memory and writes pages on
// command: "w <page>..." writes one byte into each page, "q" quits.
func childWP(in *bufio.Scanner, out io.Writer) error {
	mem, base, err := childMem(wpChildPages)
	if err != nil {
		return err
	}
	for i := 0; i < wpChildPrefilled; i++ {
		mem[i*PageSize()] = 1
	}
	u, err := Open(FeatureWPAsync | FeatureWPUnpopulated)
	if err != nil {
		return err
	}
	defer u.Close()
	if err := u.Register(base, uintptr(len(mem)), RegisterWP); err != nil {
		return err
	}
	if err := u.WriteProtect(base, uintptr(len(mem)), true); err != nil {
		return err
	}
	fmt.Fprintf(out, "ready %#x %d\n", base, wpChildPages)
	for in.Scan() {
		f := strings.Fields(in.Text())
		switch {
		case len(f) == 1 && f[0] == "q":
			return nil
		case len(f) >= 1 && f[0] == "w":
			for _, s := range f[1:] {
				p, err := strconv.Atoi(s)
				if err != nil || p < 0 || p >= wpChildPages {
					return fmt.Errorf("bad page %q", s)
				}
				mem[p*PageSize()+p%PageSize()] = byte(p + 1)
			}
			fmt.Fprintln(out, "ok")
		default:
			return fmt.Errorf("bad command %q", in.Text())
		}
	}
	return in.Err()
}

const missingChildPages = 64

// missingPattern is the content the fault server places in page p; every
// fourth page is served with ZeroPage instead.
func missingPattern(p int) []byte {
	b := make([]byte, PageSize())
	if p%4 == 3 {
		return b
	}
	for j := range b {
		b[j] = byte(p*7 + j*13 + 1)
	}
	return b
}

// childMissing registers its memory in MISSING mode, sends the userfaultfd
// over the socket on fd 3, then reads every page (each read faults and waits
// for the parent) and reports whether the contents are as served.
func childMissing(in *bufio.Scanner, out io.Writer) error {
	f := os.NewFile(3, "uffd-socket")
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("socket on fd 3: %w", err)
	}
	conn := fc.(*net.UnixConn)
	defer conn.Close()
	mem, base, err := childMem(missingChildPages)
	if err != nil {
		return err
	}
	u, err := Open(FeatureThreadID)
	if err != nil {
		return err
	}
	defer u.Close()
	if err := u.Register(base, uintptr(len(mem)), RegisterMissing); err != nil {
		return err
	}
	if err := SendFD(conn, u.FD()); err != nil {
		return err
	}
	fmt.Fprintf(out, "ready %#x %d\n", base, missingChildPages)
	if !in.Scan() || in.Text() != "go" {
		return fmt.Errorf("expected go, got %q (%v)", in.Text(), in.Err())
	}
	for p := 0; p < missingChildPages; p++ {
		// Every page was missing: this read blocks until the parent serves it.
		got := mem[p*PageSize() : (p+1)*PageSize()]
		if !bytes.Equal(got, missingPattern(p)) {
			return fmt.Errorf("page %d: contents differ from what was served (first byte %#x)", p, got[0])
		}
	}
	fmt.Fprintln(out, "ok")
	return nil
}

// child is a running re-executed test binary.
type child struct {
	t    *testing.T
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *bufio.Scanner
	base uintptr
	n    int
}

func startChild(t *testing.T, mode string, extra ...*os.File) *child {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	// A race-enabled child would sleep 1 s at exit waiting for late reports.
	gorace := strings.TrimSpace(os.Getenv("GORACE") + " atexit_sleep_ms=0")
	cmd.Env = append(os.Environ(), childEnv+"="+mode, "GORACE="+gorace)
	cmd.Stderr = os.Stderr
	cmd.ExtraFiles = extra
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start child: %v", err)
	}
	c := &child{t: t, cmd: cmd, in: in, out: bufio.NewScanner(outPipe)}
	t.Cleanup(func() {
		c.in.Close()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	line := c.line()
	var base uint64
	if _, err := fmt.Sscanf(line, "ready %v %d", &base, &c.n); err != nil {
		t.Fatalf("child said %q, want ready <base> <pages>", line)
	}
	c.base = uintptr(base)
	return c
}

// line returns the child's next output line, failing after 10 s.
func (c *child) line() string {
	c.t.Helper()
	got := make(chan string, 1)
	go func() {
		if c.out.Scan() {
			got <- c.out.Text()
		} else {
			got <- fmt.Sprintf("<child output ended: %v>", c.out.Err())
		}
	}()
	select {
	case l := <-got:
		return l
	case <-time.After(10 * time.Second):
		c.cmd.Process.Kill()
		c.t.Fatal("child did not answer within 10s")
		return ""
	}
}

func (c *child) send(cmd string) {
	c.t.Helper()
	if _, err := fmt.Fprintln(c.in, cmd); err != nil {
		c.t.Fatalf("send %q to child: %v", cmd, err)
	}
}

// write makes the child write the given pages and waits for it.
func (c *child) write(pages ...int) {
	c.t.Helper()
	s := "w"
	for _, p := range pages {
		s += " " + strconv.Itoa(p)
	}
	c.send(s)
	if l := c.line(); l != "ok" {
		c.t.Fatalf("child answered %q to %q", l, s)
	}
}

// quit asks the child to exit and checks it exited cleanly.
func (c *child) quit() {
	c.t.Helper()
	c.send("q")
	c.in.Close()
	if err := c.cmd.Wait(); err != nil {
		c.t.Fatalf("child exit: %v", err)
	}
}
