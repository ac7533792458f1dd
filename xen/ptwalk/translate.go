package ptwalk

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// ErrNotMapped is matched by Translate's error when the address has no
// present mapping.
var ErrNotMapped = errors.New("address not mapped")

// Translate returns the gfn that the 4-level long-mode page tables rooted
// at cr3 map the virtual address va to (4 KiB, 2 MiB and 1 GiB pages).
// The source of a post-copy migration uses it to find guest pages the
// hypervisor itself will touch at resume (the guest's per-CPU area, which
// holds the vcpu_info Xen must map again) so they travel with the core.
func Translate(cr3, va uint64, read func(gfn uint64) ([]byte, error)) (uint64, error) {
	table := (cr3 & addr64) / PageSize
	for lvl := 4; lvl >= 1; lvl-- {
		page, err := read(table)
		if err != nil {
			return 0, fmt.Errorf("ptwalk: translate %#x: level-%d table at gfn %#x: %w", va, lvl, table, err)
		}
		if len(page) < PageSize {
			return 0, fmt.Errorf("ptwalk: translate %#x: level-%d table at gfn %#x: short read", va, lvl, table)
		}
		idx := (va >> (12 + 9*uint(lvl-1))) & 511
		e := binary.LittleEndian.Uint64(page[idx*8:])
		if e&ptePresent == 0 {
			return 0, fmt.Errorf("ptwalk: translate %#x at level %d: %w", va, lvl, ErrNotMapped)
		}
		addr := e & addr64
		if lvl == 1 {
			return addr / PageSize, nil
		}
		if (lvl == 2 || lvl == 3) && e&ptePS != 0 {
			span := uint64(1) << (12 + 9*uint(lvl-1))
			return (addr&^(span-1) + va&(span-1)) / PageSize, nil
		}
		table = addr / PageSize
	}
	return 0, errors.New("unreachable")
}
