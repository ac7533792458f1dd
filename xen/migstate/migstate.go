// Package migstate keeps a small record of every migration this host takes
// part in, one JSON file per migration and role, so that `xl-postcopy
// list` (and a later `--resume`) can say what is in flight, paused, or
// ended badly — also after the process that ran it died.
//
// A record lives in <dir>/<domain>.<role>.json. It is replaced whole:
// written to a temporary file in the same directory, synced, renamed over
// the old one and the directory synced, so a reader (or a crash) never
// sees half a record. Temporary files start with a dot and are ignored
// by List; a file that does not parse is reported, never fatal.
package migstate

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// Version is the record format this package writes; List refuses a
// record of a later version rather than misread it.
const Version = 1

// DefaultDir is where records live unless EnvDir says otherwise.
const DefaultDir = "/var/lib/xl-postcopy/migrations"

// EnvDir names the environment variable that moves the records elsewhere
// (tests and the lab, which must not touch the host's own).
const EnvDir = "XL_POSTCOPY_STATE_DIR"

// Dir is the record directory: $XL_POSTCOPY_STATE_DIR, else DefaultDir.
func Dir() string {
	if d := os.Getenv(EnvDir); d != "" {
		return d
	}
	return DefaultDir
}

// Role is which side of a migration a record describes.
type Role string

// The two roles; each has its own file, so that a migration between two
// domains of one host (`-s ”`) keeps both records.
const (
	Source Role = "source"
	Dest   Role = "dest"
)

// The QEMU-like states a record holds (those of --json-progress).
const (
	StateSetup          = "setup"
	StateActive         = "active"
	StateDevice         = "device"
	StatePostcopyActive = "postcopy-active"
	StatePostcopyPaused = "postcopy-paused"
	StateCompleted      = "completed"
	StateFailed         = "failed"
)

// Record is one migration as one side of it sees it.
type Record struct {
	Version int    `json:"version"`
	Domain  string `json:"domain"`
	Role    Role   `json:"role"`
	// Peer is the other host: the destination's for the source, the
	// source's (as ssh reports it) for the destination; may be empty.
	Peer string `json:"peer"`
	// Mode is postcopy, hybrid or precopy.
	Mode string `json:"mode"`
	// State is QEMU's name (State* constants); Phase the engine's own.
	State string `json:"state"`
	Phase string `json:"phase"`
	// PID is the xl-postcopy process that runs this side; PIDStart its
	// start time (field 22 of /proc/PID/stat, clock ticks since boot),
	// so that a pid reused by another process is not taken for it.
	PID      int    `json:"pid"`
	PIDStart uint64 `json:"pid_start"`
	// StartedAt is when the migration started, UpdatedAt the last write.
	StartedAt time.Time `json:"started_at"`
	UpdatedAt time.Time `json:"updated_at"`
	// RecoverToken names the receiver's recovery socket
	// (@xl-postcopy-recover-TOKEN), for a later resume; empty when
	// recovery is off.
	RecoverToken string `json:"recover_token,omitempty"`
	// Recoveries counts broken links recovered so far.
	Recoveries int `json:"recoveries"`
	// Where the domain is and what the administrator can do, as the
	// command said when it ended (set on failure).
	Where    string `json:"where,omitempty"`
	WhatToDo string `json:"what_to_do,omitempty"`
	// What a later `migrate --resume` needs to take the migration over
	// if the source process dies (source records): the transport
	// command (-s), the receiver command on the destination host, the
	// pre-paging policy, and the backend's page space (page index to
	// gfn, opaque here).
	Transport string          `json:"transport,omitempty"`
	Receiver  string          `json:"receiver,omitempty"`
	Prepaging string          `json:"prepaging,omitempty"`
	PageSpace json.RawMessage `json:"page_space,omitempty"`
}

// Ended says the migration is over (completed or failed): nothing will
// update the record again.
func (r Record) Ended() bool { return r.State == StateCompleted || r.State == StateFailed }

// ProcessGone says the process that wrote r no longer runs: its pid is
// free, a zombie, or another process (a different start time).
func (r Record) ProcessGone() bool { return !alive(r.PID, r.PIDStart) }

// ParseError is a record file List could not read.
type ParseError struct {
	Path string
	Err  error
}

func (e *ParseError) Error() string {
	return fmt.Sprintf("state file %s: %v (not a record of this xl-postcopy; remove it if no migration needs it)", e.Path, e.Err)
}

func (e *ParseError) Unwrap() error { return e.Err }

// fileName is the record file of domain and role. The domain is escaped
// so that no name reaches outside dir or starts with the dot that marks
// temporary files.
func fileName(domain string, role Role) (string, error) {
	if domain == "" {
		return "", errors.New("record without a domain name")
	}
	if role != Source && role != Dest {
		return "", fmt.Errorf("record role %q: want %q or %q", role, Source, Dest)
	}
	esc := url.PathEscape(domain)
	if strings.HasPrefix(esc, ".") {
		esc = "%2E" + esc[1:]
	}
	return esc + "." + string(role) + ".json", nil
}

// Write replaces the record of r.Domain and r.Role in dir atomically,
// creating dir (mode 0700: the records name recovery sockets) if needed.
func Write(dir string, r Record) error {
	name, err := fileName(r.Domain, r.Role)
	if err != nil {
		return err
	}
	r.Version = Version
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode the record of %s: %w", r.Domain, err)
	}
	b = append(b, '\n')
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	f, err := os.CreateTemp(dir, "."+name+".tmp-*")
	if err != nil {
		return fmt.Errorf("record of %s: %w", r.Domain, err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(b); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	// Synced before the rename, else a crash could leave the new name
	// on an empty file.
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp, err)
	}
	final := filepath.Join(dir, name)
	if err := os.Rename(tmp, final); err != nil {
		return fmt.Errorf("record of %s: %w", r.Domain, err)
	}
	ok = true
	return syncDir(dir)
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync state directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync state directory %s: %w", dir, err)
	}
	return nil
}

// Remove deletes the record of domain and role; a record already gone is
// not an error.
func Remove(dir, domain string, role Role) error {
	name, err := fileName(domain, role)
	if err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove the record of %s: %w", domain, err)
	}
	return syncDir(dir)
}

// List reads every record in dir, oldest first. Files that are not
// records (temporary files, other names) are skipped; a record file that
// does not parse is one of the errors (a *ParseError) and does not hide
// the others. A dir that does not exist holds no records.
func List(dir string) ([]Record, []error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, []error{fmt.Errorf("state directory: %w", err)}
	}
	var recs []Record
	var errs []error
	for _, e := range ents {
		n := e.Name()
		if e.IsDir() || strings.HasPrefix(n, ".") || !strings.HasSuffix(n, ".json") {
			continue
		}
		p := filepath.Join(dir, n)
		r, err := readRecord(p)
		if err != nil {
			errs = append(errs, &ParseError{Path: p, Err: err})
			continue
		}
		recs = append(recs, r)
	}
	sort.SliceStable(recs, func(i, j int) bool {
		a, b := recs[i], recs[j]
		if !a.StartedAt.Equal(b.StartedAt) {
			return a.StartedAt.Before(b.StartedAt)
		}
		if a.Domain != b.Domain {
			return a.Domain < b.Domain
		}
		return a.Role > b.Role // source before dest
	})
	return recs, errs
}

func readRecord(p string) (Record, error) {
	var r Record
	b, err := os.ReadFile(p)
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, err
	}
	switch {
	case r.Version < 1:
		return r, errors.New("no format version")
	case r.Version > Version:
		return r, fmt.Errorf("format version %d, newer than this xl-postcopy's %d", r.Version, Version)
	case r.Domain == "" || (r.Role != Source && r.Role != Dest):
		return r, fmt.Errorf("domain %q, role %q: not a record", r.Domain, r.Role)
	}
	return r, nil
}

// Clean removes the ended records whose process is gone and returns them;
// records of migrations still running, or whose process died mid-way,
// stay (the administrator has to look at those).
func Clean(dir string) ([]Record, []error) {
	recs, errs := List(dir)
	var removed []Record
	for _, r := range recs {
		if !r.Ended() || !r.ProcessGone() {
			continue
		}
		if err := Remove(dir, r.Domain, r.Role); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, r)
	}
	return removed, errs
}
