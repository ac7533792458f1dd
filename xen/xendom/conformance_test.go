package xendom

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/engine/enginetest"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// The Xen backend over its fake hypervisor passes the engine's backend
// conformance suite.
func TestXenConformance(t *testing.T) {
	hv := newFakeHV()
	xl := &fakeXL{h: hv}
	newSource := func(t *testing.T) *Source {
		src := hv.newGuestDomain("src")
		s, err := NewSource(SourceOptions{HV: hv, XS: &fakeStore{h: hv}, XL: xl, Dom: src.id, Name: "vm1",
			XLConfig: []byte(testXLConfig), SuspendTimeout: 3 * time.Second, Logf: t.Logf})
		if err != nil {
			t.Fatal(err)
		}
		hv.runGuest(src, 1, 50*time.Microsecond)
		t.Cleanup(func() {
			hv.mu.Lock()
			stop := src.stopGuest
			src.stopGuest, src.restartGuest = nil, nil
			hv.mu.Unlock()
			if stop != nil {
				stop()
			}
		})
		return s
	}
	enginetest.TestSource(t, enginetest.SourceBackend{New: func(t *testing.T) engine.Source { return newSource(t) }})

	info := newSource(t).Info()
	header := func(name string) *wire.DomainHeader {
		return &wire.DomainHeader{Mode: wire.ModePostcopy, PageSize: PageSize, NumPages: info.NumPages, VCPUs: info.VCPUs,
			Name: name, Backend: Backend, Config: info.Config, Absent: wire.RangesOf(info.Absent)}
	}
	factory := NewFactory(DestOptions{HV: hv, XL: xl, Poll: 2 * time.Millisecond, Logf: t.Logf})
	enginetest.TestDest(t, enginetest.DestBackend{
		Header: func(*testing.T) *wire.DomainHeader { return header("vm1") },
		New: func(h *wire.DomainHeader) (engine.Dest, error) {
			if h.Name == "bad" {
				// The domain is created, then paging cannot be enabled on
				// it (a hypervisor without MEM_PAGING).
				hv.mu.Lock()
				hv.enablePagingErr = errors.New("paging unavailable")
				hv.mu.Unlock()
				defer func() { hv.mu.Lock(); hv.enablePagingErr = nil; hv.mu.Unlock() }()
			}
			return factory(h)
		},
		BadHeader: func(*testing.T) *wire.DomainHeader { return header("bad") },
		Leftovers: func() error {
			xl.mu.Lock()
			ids := append([]uint32(nil), xl.ids...)
			xl.mu.Unlock()
			hv.mu.Lock()
			defer hv.mu.Unlock()
			var left []uint32
			for _, id := range ids {
				if d := hv.doms[id]; d != nil && !d.info.Dying {
					left = append(left, id)
				}
			}
			if len(left) > 0 {
				return fmt.Errorf("destination domains left (not destroyed): %v", left)
			}
			return nil
		},
	})
}
