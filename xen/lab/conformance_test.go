package lab

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/engine/enginetest"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// childGuests lists this process's live children: in this package's
// tests, only lab guests.
func childGuests() ([]int, error) {
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		return nil, err
	}
	me := os.Getpid()
	var out []int
	for _, p := range stats {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // gone meanwhile
		}
		// pid (comm) state ppid ...; comm may hold spaces: split after ')'.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) < 2 || f[0] == "Z" {
			continue
		}
		if ppid, _ := strconv.Atoi(f[1]); ppid == me {
			pid, _ := strconv.Atoi(strings.Fields(string(b))[0])
			out = append(out, pid)
		}
	}
	return out, nil
}

func noGuestsLeft() error {
	pids, err := childGuests()
	if err != nil {
		return err
	}
	if len(pids) > 0 {
		return fmt.Errorf("lab guest processes left: %v", pids)
	}
	return nil
}

// The lab backend passes the engine's backend conformance suite.
func TestLabConformance(t *testing.T) {
	cfg := smallDomain("zipf")
	enginetest.TestSource(t, enginetest.SourceBackend{New: func(t *testing.T) engine.Source {
		s, err := StartSource(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Kill)
		return s
	}})
	header := func(c Config) *wire.DomainHeader {
		raw, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		return &wire.DomainHeader{Backend: Backend, NumPages: c.Pages, PageSize: pageSize, VCPUs: uint32(c.VCPUs), Config: raw}
	}
	enginetest.TestDest(t, enginetest.DestBackend{
		Header: func(*testing.T) *wire.DomainHeader { return header(cfg) },
		New:    func(h *wire.DomainHeader) (engine.Dest, error) { return NewDest(h) },
		BadHeader: func(*testing.T) *wire.DomainHeader {
			bad := cfg
			bad.VCPUs = 0 // the guest's configuration is refused
			return header(bad)
		},
		Leftovers: noGuestsLeft,
	})
}
