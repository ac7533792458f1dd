// Package enginetest is a conformance suite for the engine's backends, in
// the spirit of testing/fstest.TestFS: every implementation of
// engine.Source and engine.Dest (the lab backend, the Xen backend over its
// fake hypervisor, the in-memory double of this package) runs the same
// checks of what the engine relies on and the interfaces only say in
// comments: DirtyPages results the next call does not overwrite, ReadPages
// safe from several goroutines, a paused domain's memory frozen, Resume
// after Pause, Close ending a blocked ReadFaults, Place overwriting before
// the resume, Destroy of a domain that never ran, and a failed creation
// that leaves nothing behind.
package enginetest

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// SourceBackend makes source domains for TestSource.
type SourceBackend struct {
	// New starts a running domain whose guest writes its memory on its
	// own, about every millisecond or faster. The suite pauses, resumes
	// and destroys it; New registers any other clean-up with t.Cleanup.
	New func(t *testing.T) engine.Source
}

// wait is how long the suite waits for a guest's writes to show.
const wait = 10 * time.Second

// TestSource runs the source checks against b.
func TestSource(t *testing.T, b SourceBackend) {
	t.Run("Info", func(t *testing.T) {
		s := b.New(t)
		defer destroy(t, s)
		in := s.Info()
		if in.NumPages == 0 || in.PageSize == 0 || in.PageSize&(in.PageSize-1) != 0 {
			t.Fatalf("Info: %d pages of %d bytes", in.NumPages, in.PageSize)
		}
		if !slices.IsSorted(in.Absent) {
			t.Fatalf("Info.Absent not ascending: %v", in.Absent)
		}
		for _, p := range in.Absent {
			if p >= in.NumPages {
				t.Fatalf("Info.Absent has pfn %#x beyond %d pages", p, in.NumPages)
			}
		}
	})
	t.Run("DirtyPagesResultIsTheCallers", func(t *testing.T) {
		s := b.New(t)
		defer destroy(t, s)
		must(t, "StartDirtyLog", s.StartDirtyLog())
		first := dirtySoon(t, s)
		keep := slices.Clone(first)
		second := dirtySoon(t, s)
		if !slices.Equal(first, keep) {
			t.Fatalf("DirtyPages overwrote the previous call's result (%d pfns then, %d pfns now)", len(keep), len(second))
		}
		n := s.Info().NumPages
		for _, p := range append(first, second...) {
			if p >= n {
				t.Fatalf("DirtyPages returned pfn %#x beyond %d pages", p, n)
			}
		}
		// The result starts at dst[:0]: the previous round's slice passed
		// back gets this round only.
		dst := []uint64{n + 7, n + 8}
		got, err := s.DirtyPages(dst)
		must(t, "DirtyPages", err)
		if slices.Contains(got, n+7) || slices.Contains(got, n+8) {
			t.Fatalf("DirtyPages kept dst's old contents: %v", got[:min(len(got), 4)])
		}
		must(t, "StopDirtyLog", s.StopDirtyLog())
	})
	t.Run("PausedMemoryIsFrozenAndReadsAreConcurrent", func(t *testing.T) {
		s := b.New(t)
		defer destroy(t, s)
		must(t, "Pause", s.Pause())
		pfns := present(s.Info(), 512)
		ps := int(s.Info().PageSize)
		ref := make([]byte, len(pfns)*ps)
		must(t, "ReadPages", readAll(s, pfns, ref))
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewSource(int64(g)))
				for range 20 {
					i := rng.Intn(len(pfns))
					j := min(len(pfns), i+1+rng.Intn(32))
					buf := make([]byte, (j-i)*ps)
					if err := readAll(s, pfns[i:j], buf); err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(buf, ref[i*ps:j*ps]) {
						errs <- fmt.Errorf("pages %#x..%#x of the paused domain read differently from another goroutine", pfns[i], pfns[j-1])
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	})
	t.Run("ResumeAfterPauseRunsAgain", func(t *testing.T) {
		s := b.New(t)
		defer destroy(t, s)
		must(t, "StartDirtyLog", s.StartDirtyLog())
		must(t, "Pause", s.Pause())
		_, err := s.DirtyPages(nil) // what was written before the pause
		must(t, "DirtyPages", err)
		time.Sleep(20 * time.Millisecond)
		if d, err := s.DirtyPages(nil); err != nil || len(d) != 0 {
			t.Fatalf("a paused domain wrote %d pages (err %v)", len(d), err)
		}
		// (Resume may end write tracking, as undoing a migration: the Xen
		// backend does. It is started again to see the guest run.)
		must(t, "StopDirtyLog", s.StopDirtyLog())
		must(t, "Resume", s.Resume())
		must(t, "StartDirtyLog", s.StartDirtyLog())
		dirtySoon(t, s) // it runs: it writes again
		must(t, "StopDirtyLog", s.StopDirtyLog())
	})
}

// DestBackend makes destination domains for TestDest.
type DestBackend struct {
	// Header is a valid domain header for this backend (a small domain).
	Header func(t *testing.T) *wire.DomainHeader
	// New creates the destination domain (engine.Factory).
	New engine.Factory
	// BadHeader is a header whose creation fails in the backend itself
	// (past the engine's checks: e.g. a configuration it cannot build).
	BadHeader func(t *testing.T) *wire.DomainHeader
	// Leftovers reports what the backend created and did not remove
	// (domains, processes); nil when nothing is left.
	Leftovers func() error
}

// TestDest runs the destination checks against b.
func TestDest(t *testing.T, b DestBackend) {
	t.Run("CreateFailureLeavesNothing", func(t *testing.T) {
		d, err := b.New(b.BadHeader(t))
		if err == nil {
			t.Fatal("creation from the bad header succeeded")
		}
		if !isNil(d) {
			t.Fatalf("a failed creation returned a domain (%T) beside its error %v", d, err)
		}
		if err := b.Leftovers(); err != nil {
			t.Fatalf("after a failed creation: %v", err)
		}
	})
	t.Run("DestroyNeverResumed", func(t *testing.T) {
		h := b.Header(t)
		d, err := b.New(h)
		must(t, "create", err)
		must(t, "Place", d.Place(pagesOf(h, 0, 3, 1)))
		must(t, "Destroy", d.Destroy())
		if err := b.Leftovers(); err != nil {
			t.Fatalf("after Destroy: %v", err)
		}
	})
	t.Run("CloseEndsABlockedReadFaults", func(t *testing.T) {
		h := b.Header(t)
		d, err := b.New(h)
		must(t, "create", err)
		defer func() {
			must(t, "Destroy", d.Destroy())
			if err := b.Leftovers(); err != nil {
				t.Errorf("after Destroy: %v", err)
			}
		}()
		done := make(chan error, 1)
		go func() {
			for {
				if _, err := d.ReadFaults(nil); err != nil {
					done <- err
					return
				}
			}
		}()
		time.Sleep(20 * time.Millisecond)
		must(t, "Close", d.Close())
		select {
		case err := <-done:
			if !errors.Is(err, engine.ErrClosed) {
				t.Fatalf("ReadFaults after Close: %v, want engine.ErrClosed", err)
			}
		case <-time.After(wait):
			t.Fatal("ReadFaults still blocked after Close")
		}
		if _, err := d.ReadFaults(nil); !errors.Is(err, engine.ErrClosed) {
			t.Fatalf("ReadFaults on a closed domain: %v, want engine.ErrClosed", err)
		}
	})
	t.Run("PlaceOverwritesBeforeResume", func(t *testing.T) {
		h := b.Header(t)
		d, err := b.New(h)
		must(t, "create", err)
		defer func() { must(t, "Destroy", d.Destroy()) }()
		rb, ok := d.(engine.ReadBacker)
		if !ok {
			return // nothing to read back with: what arrived is all that can be checked
		}
		ps := int(h.PageSize)
		first := pagesOf(h, 2, 5)
		must(t, "Place", d.Place(first))
		second := []engine.Page{{PFN: 2, Data: bytes.Repeat([]byte{0xa5}, ps)}, {PFN: 5}} // 5 becomes zeroes
		must(t, "Place again", d.Place(second))
		buf := make([]byte, 2*ps)
		written, err := rb.ReadBack([]uint64{2, 5}, buf)
		must(t, "ReadBack", err)
		if len(written) != 0 {
			t.Fatalf("ReadBack before any resume reports guest writes to %v", written)
		}
		if !bytes.Equal(buf[:ps], second[0].Data) || !bytes.Equal(buf[ps:], make([]byte, ps)) {
			t.Fatal("the second Place before the resume did not replace the first")
		}
	})
}

func must(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func destroy(t *testing.T, s engine.Source) {
	t.Helper()
	_ = s.Pause() // Destroy discards a paused copy
	if err := s.Destroy(); err != nil {
		t.Errorf("Destroy: %v", err)
	}
}

// dirtySoon waits for the guest's next writes.
func dirtySoon(t *testing.T, s engine.Source) []uint64 {
	t.Helper()
	end := time.Now().Add(wait)
	for time.Now().Before(end) {
		d, err := s.DirtyPages(nil)
		must(t, "DirtyPages", err)
		if len(d) > 0 {
			return d
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("the running guest wrote nothing the dirty log saw in %v", wait)
	return nil
}

// present lists up to n pfns that hold memory, spread over the domain.
func present(in engine.Info, n int) []uint64 {
	step := max(in.NumPages/uint64(n), 1)
	var out []uint64
	for p := uint64(0); p < in.NumPages && len(out) < n; p += step {
		if _, absent := slices.BinarySearch(in.Absent, p); !absent {
			out = append(out, p)
		}
	}
	return out
}

// readAll reads pages, treating pages the backend cannot read as zeroes
// on both sides of a comparison (they are reported, never sent).
func readAll(s engine.Source, pfns []uint64, buf []byte) error {
	err := s.ReadPages(pfns, buf)
	var ue *engine.UnreadableError
	if errors.As(err, &ue) {
		ps := len(buf) / len(pfns)
		for _, p := range ue.PFNs {
			if i := slices.Index(pfns, p); i >= 0 {
				clear(buf[i*ps : (i+1)*ps])
			}
		}
		return nil
	}
	return err
}

// pagesOf makes pages of recognisable content for pfns.
func pagesOf(h *wire.DomainHeader, pfns ...uint64) []engine.Page {
	var out []engine.Page
	for _, p := range pfns {
		data := make([]byte, h.PageSize)
		for i := range data {
			data[i] = byte(p*31 + uint64(i))
		}
		out = append(out, engine.Page{PFN: p, Data: data})
	}
	return out
}

// isNil reports whether d is nil, also behind a typed-nil interface
// (the engine tolerates one beside an error; a usable domain it is not).
func isNil(d engine.Dest) bool {
	if d == nil {
		return true
	}
	v := reflect.ValueOf(d)
	return v.Kind() == reflect.Pointer && v.IsNil()
}
