package xendom

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// Toolstack is what the backend asks of xl: domain creation from a
// configuration (so that libxl sets up xenstore, the console and devices
// exactly as for any domain), renames and destruction.
type Toolstack interface {
	// CreatePaused creates a domain from the xl config file cfgPath with
	// its name replaced by name, leaves it paused, and returns its id.
	CreatePaused(cfgPath, name string) (uint32, error)
	Rename(dom uint32, name string) error
	Destroy(dom uint32) error
}

// XL drives the xl command.
type XL struct {
	Path string // default "xl"
	// Timeout bounds one xl command (default DefaultXLTimeout). xl create
	// under the nested lab's emulation on a loaded 2-core machine has
	// taken over two minutes.
	Timeout time.Duration
}

// DefaultXLTimeout is XL's default per-command limit.
const DefaultXLTimeout = 10 * time.Minute

func (x XL) run(args ...string) (string, error) {
	path := x.Path
	if path == "" {
		path = "xl"
	}
	to := x.Timeout
	if to <= 0 {
		to = DefaultXLTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), to)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	// xl forks helpers (the device model, libxl-save-helper) that keep
	// the output pipes open: without WaitDelay a killed xl would leave
	// Wait blocked on them.
	cmd.WaitDelay = 5 * time.Second
	cmd.Env = CleanEnv()
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	text := strings.TrimSpace(out.String())
	if err != nil {
		if len(text) > 2000 {
			text = "…" + text[len(text)-2000:]
		}
		return text, fmt.Errorf("%s %s: %w: %s", path, strings.Join(args, " "), err, text)
	}
	return text, nil
}

// CreatePaused implements Toolstack with `xl create -p CFG name="NAME"`.
// A create that fails or is killed by the time limit may leave the domain
// half made under that name: it is destroyed before the error returns.
func (x XL) CreatePaused(cfgPath, name string) (uint32, error) {
	if _, err := x.run("create", "-p", cfgPath, "name="+strconv.Quote(name)); err != nil {
		if out, derr := x.run("domid", name); derr == nil {
			if _, derr := x.run("destroy", strings.TrimSpace(out)); derr != nil {
				return 0, fmt.Errorf("%w (and the half-made domain %s is left: %v)", err, name, derr)
			}
			return 0, fmt.Errorf("%w (the half-made domain %s was destroyed)", err, name)
		}
		return 0, err
	}
	out, err := x.run("domid", name)
	if err != nil {
		return 0, err
	}
	id, err := strconv.ParseUint(strings.TrimSpace(out), 10, 32)
	if err != nil {
		return 0, fmt.Errorf("xl domid %s printed %q: %w", name, out, err)
	}
	return uint32(id), nil
}

// Rename implements Toolstack.
func (x XL) Rename(dom uint32, name string) error {
	_, err := x.run("rename", strconv.FormatUint(uint64(dom), 10), name)
	return err
}

// Destroy implements Toolstack.
func (x XL) Destroy(dom uint32) error {
	_, err := x.run("destroy", strconv.FormatUint(uint64(dom), 10))
	return err
}

// CleanEnv is os.Environ without entries Go's exec refuses (a NUL byte:
// seen in the lab's busybox dom0, whose init leaves one behind).
func CleanEnv() []string {
	var env []string
	for _, e := range os.Environ() {
		if !strings.ContainsRune(e, 0) {
			env = append(env, e)
		}
	}
	return env
}
