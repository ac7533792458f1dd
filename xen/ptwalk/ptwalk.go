// Package ptwalk finds the page-table pages of an x86 guest by walking its
// paging structures from CR3, in pure Go over a caller-supplied page reader.
//
// Why it exists: Xen walks guest page tables in software whenever it has to
// translate a guest virtual address itself — copying hypercall arguments
// from guest buffers, emulating an MMIO or I/O instruction, injecting a
// fault. At a post-copy destination a page the guest has not received yet
// is paged out, and a software walk that meets one cannot simply block on
// it the way a vCPU's own access does: depending on the path Xen retries
// the instruction, fails the hypercall (-EFAULT/-ENOENT to the guest) or
// crashes the domain. So every page-table page must be resident before the
// guest resumes: the source walks each vCPU's CR3 with this package and
// sends the pages found ahead of the rest.
//
// Walk returns the tables themselves (root, intermediate levels and L1
// tables), never the data pages that leaf entries map: those follow the
// normal post-copy path. Large-page entries are leaves. The walk is
// defensive because guest memory is untrusted and may be changing under a
// live guest: each page is visited once (self-maps and cycles terminate),
// entries pointing beyond the guest's physmap are ignored and counted, and
// a table count limit bounds the work.
package ptwalk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// PageSize is the x86 base page size; every paging structure is one page.
const PageSize = 4096

// Mode is the guest's paging mode, which decides the number of levels and
// the entry format.
type Mode int

// Paging modes.
const (
	// PagingOff: CR0.PG clear, virtual = physical, no page tables.
	PagingOff Mode = iota
	// Legacy2 is 32-bit paging without CR4.PSE: two levels of 4-byte
	// entries, every present PDE points to a page table (bit 7 ignored).
	Legacy2
	// Legacy2PSE is 32-bit paging with CR4.PSE: a PDE with PS set maps a
	// 4 MiB page and is a leaf.
	Legacy2PSE
	// PAE3 is PAE paging: a 32-byte-aligned table of 4 PDPTEs at CR3, then
	// page directories (PS = 2 MiB leaf) and page tables, 8-byte entries.
	PAE3
	// LongMode4 is 4-level paging (IA-32e): PML4, PDPT (PS = 1 GiB leaf),
	// PD (PS = 2 MiB leaf), PT, 8-byte entries.
	LongMode4
	// Unsupported is a paging mode Walk cannot handle: 5-level paging
	// (CR4.LA57), or an inconsistent register set (long mode without PAE).
	Unsupported
)

func (m Mode) String() string {
	switch m {
	case PagingOff:
		return "paging off"
	case Legacy2:
		return "32-bit"
	case Legacy2PSE:
		return "32-bit+PSE"
	case PAE3:
		return "PAE"
	case LongMode4:
		return "4-level"
	case Unsupported:
		return "unsupported"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Control-register bits that select the paging mode.
const (
	cr0PG   = 1 << 31
	cr4PSE  = 1 << 4
	cr4PAE  = 1 << 5
	cr4LA57 = 1 << 12
	eferLMA = 1 << 10 // long mode active, not merely enabled (LME)
)

// ModeOf decodes the paging mode from CR0, CR4 and EFER. ok is false when
// there are no page tables to walk (PagingOff) and when the mode is one
// Walk does not handle (Unsupported: 5-level paging, or long mode without
// CR4.PAE, which a real CPU refuses).
func ModeOf(cr0, cr4, efer uint64) (Mode, bool) {
	switch {
	case cr0&cr0PG == 0:
		return PagingOff, false
	case efer&eferLMA != 0:
		if cr4&cr4PAE == 0 || cr4&cr4LA57 != 0 {
			return Unsupported, false
		}
		return LongMode4, true
	case cr4&cr4PAE != 0:
		return PAE3, true
	case cr4&cr4PSE != 0:
		return Legacy2PSE, true
	}
	return Legacy2, true
}

// Result is what Walk found.
type Result struct {
	// Tables are the gfns of all page-table pages reachable from CR3, the
	// root included, sorted and unique.
	Tables []uint64
	// Skipped counts present entries ignored because they point beyond
	// maxGFN (garbage, or a table being rewritten under a live guest).
	Skipped int
}

// ErrLimit is matched (errors.Is) by Walk's error when more than limit
// tables are reachable.
var ErrLimit = errors.New("page-table limit exceeded")

// ErrUnsupportedMode is matched by Walk's error for PagingOff, Unsupported
// and unknown modes.
var ErrUnsupportedMode = errors.New("paging mode not walkable")

const (
	ptePresent = 1 << 0
	ptePS      = 1 << 7
	// addr64 keeps bits 12..51 of an 8-byte entry: above are NX (63),
	// protection keys and software bits, below are flags.
	addr64 = 0x000F_FFFF_FFFF_F000
	// addr32 keeps bits 12..31 of a 4-byte entry or a 32-bit CR3.
	addr32 = 0xFFFF_F000
	// paeCR3 keeps bits 5..31: the PDPT is 32-byte aligned below 4 GiB.
	paeCR3 = 0xFFFF_FFE0
)

// format describes one mode's paging structures.
type format struct {
	levels    int    // levels including the root; L1 tables are level 1
	entrySize int    // 4 or 8 bytes
	addrMask  uint64 // table address bits of an entry
	cr3Mask   uint64 // root address bits of CR3
	psLevels  uint   // bit n set: PS honoured at level n (a leaf)
}

func formatOf(m Mode) (format, bool) {
	switch m {
	case Legacy2:
		return format{levels: 2, entrySize: 4, addrMask: addr32, cr3Mask: addr32}, true
	case Legacy2PSE:
		return format{levels: 2, entrySize: 4, addrMask: addr32, cr3Mask: addr32, psLevels: 1 << 2}, true
	case PAE3:
		// PDPTEs have no PS bit; PAE ignores CR4.PSE for PDEs.
		return format{levels: 3, entrySize: 8, addrMask: addr64, cr3Mask: paeCR3, psLevels: 1 << 2}, true
	case LongMode4:
		// PS in a PML4E is reserved: following it anyway costs at most
		// a few extra pages, missing a table costs a failed walk later.
		return format{levels: 4, entrySize: 8, addrMask: addr64, cr3Mask: addr64, psLevels: 1<<2 | 1<<3}, true
	}
	return format{}, false
}

// Walk collects the page-table pages reachable from cr3 in the given mode.
//
// read returns the contents of one guest page (at least PageSize bytes); it
// is called once per table of level 2 and up, never for L1 tables (their
// entries map data pages, which Walk does not report). maxGFN is the
// highest valid gfn, 0 meaning no bound: entries beyond it are counted in
// Skipped and not followed, and a root beyond it is an error. limit bounds
// len(Tables) (0 or less: no limit): if more tables are reachable Walk
// stops with an error matching ErrLimit.
//
// On error the Result holds the tables found so far (sorted), so a caller
// may still use a partial walk.
func Walk(mode Mode, cr3, maxGFN uint64, read func(gfn uint64) ([]byte, error), limit int) (Result, error) {
	batch := func(gfns []uint64) ([][]byte, error) {
		out := make([][]byte, len(gfns))
		for i, g := range gfns {
			p, err := read(g)
			if err != nil {
				return out[:i], err
			}
			out[i] = p
		}
		return out, nil
	}
	return walk(mode, cr3, maxGFN, batch, limit, false)
}

// BatchReader returns the contents of several guest pages (each at least
// PageSize bytes); on error, the pages read before the failing one.
type BatchReader func(gfns []uint64) ([][]byte, error)

// WalkKernel walks only the kernel half of a 4-level long-mode address
// space (PML4 entries 256–511, shared by every process of a 64-bit
// kernel), reading each level's tables with one call of read. The tables
// of user processes are left out: the hypervisor walks guest page tables
// for the guest kernel's hypercall arguments, which live in kernel space.
func WalkKernel(cr3, maxGFN uint64, read BatchReader, limit int) (Result, error) {
	return walk(LongMode4, cr3, maxGFN, read, limit, true)
}

func walk(mode Mode, cr3, maxGFN uint64, read BatchReader, limit int, kernelOnly bool) (Result, error) {
	f, ok := formatOf(mode)
	if !ok {
		return Result{}, fmt.Errorf("ptwalk: %v: %w", mode, ErrUnsupportedMode)
	}
	root := (cr3 & f.cr3Mask) / PageSize
	if maxGFN != 0 && root > maxGFN {
		return Result{}, fmt.Errorf("ptwalk: %v: cr3 %#x: root gfn %#x beyond max gfn %#x", mode, cr3, root, maxGFN)
	}
	w := walker{f: f, mode: mode, maxGFN: maxGFN, limit: limit, seen: map[uint64]bool{root: true}}
	w.res.Tables = append(w.res.Tables, root)

	// Breadth-first, one level at a time, so a page reachable at several
	// levels (a self-map, a table reused by mistake) is first met, and
	// therefore read, at its highest level, whose walk reaches the most.
	frontier := []uint64{root}
	for lvl := f.levels; lvl >= 2 && len(frontier) > 0; lvl-- {
		var next []uint64
		pages, readErr := read(frontier)
		for k, gfn := range frontier {
			if k >= len(pages) {
				// The pages before the failed one still count: a caller
				// may use a partial walk.
				return w.done(), fmt.Errorf("ptwalk: %v: reading level-%d table at gfn %#x: %w", mode, lvl, gfn, readErr)
			}
			page := pages[k]
			if len(page) < PageSize {
				return w.done(), fmt.Errorf("ptwalk: %v: level-%d table at gfn %#x: read %d bytes, want %d", mode, lvl, gfn, len(page), PageSize)
			}
			off, n := 0, PageSize/f.entrySize
			if mode == PAE3 && lvl == f.levels {
				// The PDPT is only 4 entries, anywhere 32-byte aligned in
				// its page; the rest of the page is unrelated data.
				off, n = int(cr3&paeCR3&(PageSize-1)), 4
			}
			if kernelOnly && lvl == f.levels {
				off, n = PageSize/2, 256 // PML4 entries 256..511
			}
			var err error
			if next, err = w.entries(page[off:], n, lvl, gfn, next); err != nil {
				return w.done(), err
			}
		}
		if readErr != nil {
			return w.done(), fmt.Errorf("ptwalk: %v: reading level-%d tables: %w", mode, lvl, readErr)
		}
		frontier = next
	}
	return w.done(), nil
}

type walker struct {
	f      format
	mode   Mode
	maxGFN uint64
	limit  int
	seen   map[uint64]bool
	res    Result
}

// entries follows the n entries of one table at level lvl, appending newly
// found child tables to next.
func (w *walker) entries(b []byte, n, lvl int, gfn uint64, next []uint64) ([]uint64, error) {
	for i := 0; i < n; i++ {
		var e uint64
		if w.f.entrySize == 4 {
			e = uint64(binary.LittleEndian.Uint32(b[i*4:]))
		} else {
			e = binary.LittleEndian.Uint64(b[i*8:])
		}
		if e&ptePresent == 0 {
			continue
		}
		if e&ptePS != 0 && w.f.psLevels&(1<<lvl) != 0 {
			continue // large page: a leaf mapping data
		}
		child := (e & w.f.addrMask) / PageSize
		if w.maxGFN != 0 && child > w.maxGFN {
			w.res.Skipped++
			continue
		}
		if w.seen[child] {
			continue
		}
		if w.limit > 0 && len(w.res.Tables) >= w.limit {
			return next, fmt.Errorf("ptwalk: %v: more than %d tables (at level-%d table gfn %#x entry %d): %w",
				w.mode, w.limit, lvl, gfn, i, ErrLimit)
		}
		w.seen[child] = true
		w.res.Tables = append(w.res.Tables, child)
		next = append(next, child)
	}
	return next, nil
}

func (w *walker) done() Result {
	slices.Sort(w.res.Tables)
	return w.res
}
