package enginetest

import (
	"os"
	"os/exec"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

func TestMemBackends(t *testing.T) {
	TestSource(t, SourceBackend{New: func(t *testing.T) engine.Source { return NewMemSource(2048) }})
	var f MemDests
	TestDest(t, DestBackend{
		Header: func(*testing.T) *wire.DomainHeader {
			return &wire.DomainHeader{Backend: "mem", NumPages: 64, PageSize: 4096, VCPUs: 1}
		},
		New: f.New,
		BadHeader: func(*testing.T) *wire.DomainHeader {
			return &wire.DomainHeader{Backend: "xen", NumPages: 64, PageSize: 4096}
		},
		Leftovers: f.Leftovers,
	})
}

// aliasingSource returns its own buffer from DirtyPages: the defect the
// Xen backend once had (a pre-copy round's list overwritten by the next).
type aliasingSource struct {
	*MemSource
	buf []uint64
}

func (s *aliasingSource) DirtyPages(dst []uint64) ([]uint64, error) {
	var err error
	s.buf, err = s.MemSource.DirtyPages(s.buf[:0])
	return s.buf, err
}

// deafDest's ReadFaults ignores Close.
type deafDest struct{ *MemDest }

func (d deafDest) ReadFaults(dst []uint64) ([]uint64, error) { select {} }

// The suite fails backends that break what it checks: run in a child
// process (a failing subtest would fail this test), each break must fail
// with its own message.
func TestSuiteFailsBrokenBackends(t *testing.T) {
	if b := os.Getenv("ENGINETEST_BROKEN"); b != "" {
		switch b {
		case "dirty":
			TestSource(t, SourceBackend{New: func(t *testing.T) engine.Source { return &aliasingSource{MemSource: NewMemSource(64)} }})
		case "close":
			var f MemDests
			TestDest(t, DestBackend{
				Header: func(*testing.T) *wire.DomainHeader {
					return &wire.DomainHeader{Backend: "mem", NumPages: 64, PageSize: 4096}
				},
				New: func(h *wire.DomainHeader) (engine.Dest, error) {
					d, err := f.New(h)
					if err != nil {
						return nil, err
					}
					return deafDest{d.(*MemDest)}, nil
				},
				BadHeader: func(*testing.T) *wire.DomainHeader { return &wire.DomainHeader{Backend: "xen"} },
				Leftovers: f.Leftovers,
			})
		}
		return
	}
	for _, c := range []struct{ broken, want string }{
		{"dirty", "DirtyPages overwrote the previous call's result"},
		{"close", "ReadFaults still blocked after Close"},
	} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestSuiteFailsBrokenBackends$", "-test.count=1")
		cmd.Env = append(os.Environ(), "ENGINETEST_BROKEN="+c.broken)
		out, err := cmd.CombinedOutput()
		require.Error(t, err, "the suite passed a backend whose %s is broken:\n%s", c.broken, out)
		require.Contains(t, string(out), c.want)
	}
}
