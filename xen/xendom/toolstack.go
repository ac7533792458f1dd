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
	Path    string        // default "xl"
	Timeout time.Duration // per command, default 2 minutes
}

func (x XL) run(args ...string) (string, error) {
	path := x.Path
	if path == "" {
		path = "xl"
	}
	to := x.Timeout
	if to <= 0 {
		to = 2 * time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), to)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
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
func (x XL) CreatePaused(cfgPath, name string) (uint32, error) {
	if _, err := x.run("create", "-p", cfgPath, "name="+strconv.Quote(name)); err != nil {
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
