package enginetest

import (
	"errors"
	"fmt"
	"math/rand"
	"slices"
	"sync"
	"time"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// MemSource is the in-memory double of a source domain: pages in Go
// memory, a guest goroutine that rewrites random pages while it runs, and
// a dirty log. It is the reference the suite is checked against.
type MemSource struct {
	mu      sync.Mutex
	pages   [][]byte
	dirty   map[uint64]bool
	logging bool
	stop    chan struct{}
	done    chan struct{}
	gone    bool
}

// NewMemSource starts a running domain of n 4 KiB pages.
func NewMemSource(n int) *MemSource {
	s := &MemSource{pages: make([][]byte, n), dirty: map[uint64]bool{}}
	for i := range s.pages {
		s.pages[i] = make([]byte, 4096)
		s.pages[i][0] = byte(i)
	}
	s.run()
	return s
}

func (s *MemSource) run() {
	s.stop, s.done = make(chan struct{}), make(chan struct{})
	go func(stop, done chan struct{}) {
		defer close(done)
		rng := rand.New(rand.NewSource(time.Now().UnixNano()))
		for v := byte(1); ; v++ {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Microsecond):
			}
			p := rng.Intn(len(s.pages))
			s.mu.Lock()
			s.pages[p][1] = v
			if s.logging {
				s.dirty[uint64(p)] = true
			}
			s.mu.Unlock()
		}
	}(s.stop, s.done)
}

// Info implements engine.Source.
func (s *MemSource) Info() engine.Info {
	return engine.Info{Name: "mem", NumPages: uint64(len(s.pages)), PageSize: 4096, VCPUs: 1, Backend: "mem"}
}

// ReadPages implements engine.Source.
func (s *MemSource) ReadPages(pfns []uint64, buf []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, p := range pfns {
		if p >= uint64(len(s.pages)) {
			return fmt.Errorf("pfn %#x beyond %d pages", p, len(s.pages))
		}
		copy(buf[i*4096:(i+1)*4096], s.pages[p])
	}
	return nil
}

// StartDirtyLog implements engine.Source.
func (s *MemSource) StartDirtyLog() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.logging, s.dirty = true, map[uint64]bool{}
	return nil
}

// DirtyPages implements engine.Source.
func (s *MemSource) DirtyPages(dst []uint64) ([]uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.logging {
		return nil, errors.New("dirty log not started")
	}
	dst = dst[:0]
	for p := range s.dirty {
		dst = append(dst, p)
	}
	slices.Sort(dst)
	s.dirty = map[uint64]bool{}
	return dst, nil
}

// StopDirtyLog implements engine.Source.
func (s *MemSource) StopDirtyLog() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.logging = false
	return nil
}

// Pause implements engine.Source.
func (s *MemSource) Pause() error {
	if s.stop != nil {
		close(s.stop)
		<-s.done
		s.stop = nil
	}
	return nil
}

// CoreState implements engine.Source.
func (s *MemSource) CoreState() ([]byte, error) { return []byte("mem"), nil }

// CorePFNs implements engine.Source.
func (s *MemSource) CorePFNs() ([]uint64, error) { return nil, nil }

// Resume implements engine.Source.
func (s *MemSource) Resume() error {
	if s.gone {
		return errors.New("destroyed")
	}
	if s.stop == nil {
		s.run()
	}
	return nil
}

// Destroy implements engine.Source.
func (s *MemSource) Destroy() error {
	if s.stop != nil {
		return errors.New("destroy of a running domain")
	}
	s.gone = true
	return nil
}

// MemDest is the in-memory double of a destination: placed pages in a
// map, faults fed by Touch.
type MemDest struct {
	mu      sync.Mutex
	pages   map[uint64][]byte
	faults  chan uint64
	closed  chan struct{}
	once    sync.Once
	live    *int // domains not destroyed, shared with the factory
	dropped bool
}

// MemDests is a factory of MemDests that counts the live ones.
type MemDests struct {
	mu   sync.Mutex
	live int
}

// New implements engine.Factory: a header with Backend other than "mem"
// is refused.
func (f *MemDests) New(h *wire.DomainHeader) (engine.Dest, error) {
	if h.Backend != "mem" {
		return nil, fmt.Errorf("backend %q: this host runs mem domains", h.Backend)
	}
	f.mu.Lock()
	f.live++
	f.mu.Unlock()
	return &MemDest{pages: map[uint64][]byte{}, faults: make(chan uint64, 16), closed: make(chan struct{}), live: &f.live}, nil
}

// Leftovers reports domains neither destroyed nor closed.
func (f *MemDests) Leftovers() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.live != 0 {
		return fmt.Errorf("%d mem domains left", f.live)
	}
	return nil
}

// Place implements engine.Dest.
func (d *MemDest) Place(pages []engine.Page) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, p := range pages {
		b := make([]byte, 4096)
		copy(b, p.Data)
		d.pages[p.PFN] = b
	}
	return nil
}

// Discard implements engine.Dest.
func (d *MemDest) Discard(pfns []uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, p := range pfns {
		delete(d.pages, p)
	}
	return nil
}

// ReadFaults implements engine.Dest.
func (d *MemDest) ReadFaults(dst []uint64) ([]uint64, error) {
	select {
	case p := <-d.faults:
		return append(dst[:0], p), nil
	case <-d.closed:
		return nil, engine.ErrClosed
	}
}

// ReadBack implements engine.ReadBacker.
func (d *MemDest) ReadBack(pfns []uint64, buf []byte) ([]uint64, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i, p := range pfns {
		dst := buf[i*4096 : (i+1)*4096]
		clear(dst)
		copy(dst, d.pages[p])
	}
	return nil, nil
}

// Resume implements engine.Dest.
func (d *MemDest) Resume([]byte) error { return nil }

// Destroy implements engine.Dest.
func (d *MemDest) Destroy() error {
	d.Close()
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.dropped {
		d.dropped = true
		*d.live--
	}
	return nil
}

// Close implements engine.Dest.
func (d *MemDest) Close() error {
	d.once.Do(func() { close(d.closed) })
	return nil
}
