package xendom

import (
	"errors"
	"fmt"
	"slices"

	"github.com/xl-postcopy/xl-postcopy/xen/ptwalk"
)

// Core pages: what the destination must hold before the guest runs (the
// page tables of every vCPU, the per-CPU areas), found by walking the
// paused vCPUs' CR3, and the resident hint taken at setup.

// residentHint walks the running domain's core pages (Xen pauses it for
// the moment it takes to save the HVM context) so that the destination
// can keep them resident. Without a hint every core page is paged in one
// hypercall at a time during the downtime; a failed walk only costs that.
func (s *Source) residentHint() {
	ctx, err := s.opt.HV.HVMContext(s.opt.Dom)
	if err != nil {
		s.opt.Logf("no resident hint (HVM context of the running domain: %v): core pages will be paged in", err)
		return
	}
	tables, percpu, _, err := s.walkCore(ctx)
	if err != nil {
		s.opt.Logf("no resident hint (walk of the running domain: %v): core pages will be paged in", err)
		return
	}
	hint := slices.Compact(slices.Sorted(slices.Values(append(tables, percpu...))))
	if len(hint) > maxResidentHint {
		s.opt.Logf("no resident hint: the walk of the running domain found %d pages (more than %d)", len(hint), maxResidentHint)
		return
	}
	gfns := make([]uint64, len(hint))
	for i, p := range hint {
		gfns[i] = s.gfns[p]
	}
	s.hint = hint
	s.cfg.Resident = toRanges(gfns)
	s.stats.ResidentHint = uint64(len(hint))
}

// EarlyCorePFNs implements engine.EarlyCorer: the resident hint, the core
// pages found at setup, which the engine sends before the pause.
func (s *Source) EarlyCorePFNs() []uint64 { return slices.Clone(s.hint) }

// CorePFNs implements engine.Source: the page-table pages of every vCPU,
// found by walking from its CR3. The guest's own accesses fault their
// page tables in like any page, but the hypervisor walks them in software
// (hypercall arguments, instruction emulation) and a paged-out table there
// makes the hypercall fail instead of waiting.
func (s *Source) CorePFNs() ([]uint64, error) {
	if s.hvmContext == nil {
		return nil, errors.New("core pages asked before the core state")
	}
	tables, percpu, skipped, err := s.walkCore(s.hvmContext)
	if err != nil {
		return nil, err
	}
	out := make([]uint64, 0, len(tables)+len(percpu)+len(s.hint))
	out = append(out, tables...)
	out = append(out, percpu...)
	found := slices.Sorted(slices.Values(out))
	// The destination kept the hint's pages resident with the content its
	// domain builder left there: every one must come now, core or not.
	var stale, missed uint64
	for _, p := range s.hint {
		if _, ok := slices.BinarySearch(found, p); !ok {
			out = append(out, p)
			stale++
		}
	}
	if s.hint != nil {
		for _, p := range slices.Compact(found) {
			if _, ok := slices.BinarySearch(s.hint, p); !ok {
				missed++
			}
		}
	}
	s.mu.Lock()
	s.stats.PageTablePages = uint64(len(tables))
	s.stats.PerCPUPages = uint64(len(percpu))
	s.stats.WalkSkipped = skipped
	s.stats.HintStale, s.stats.HintMissed = stale, missed
	s.mu.Unlock()
	s.opt.Logf("core pages: %d page-table pages and %d per-CPU pages; resident hint %d pages (%d no longer core, %d core pages it lacked)",
		len(tables), len(percpu), len(s.hint), stale, missed)
	return out, nil
}

// walkCore finds the core pages of the domain whose HVM context is
// hvmCtx: the kernel-half page tables of every vCPU and the start of each
// vCPU's per-CPU area. It returns page indexes, each list ascending and
// without repeats (a per-CPU page may also be a table).
func (s *Source) walkCore(hvmCtx []byte) (tables, percpu []uint64, skipped uint64, err error) {
	cpus, err := ParseCPUs(hvmCtx)
	if err != nil {
		return nil, nil, 0, err
	}
	// Tables are read once each: the walk and the per-CPU translations
	// share most of them, and every read is a foreign mapping.
	cache := map[uint64][]byte{}
	readBatch := func(gfns []uint64) ([][]byte, error) {
		var miss []uint64
		for _, g := range gfns {
			if _, ok := cache[g]; !ok {
				if _, ram := s.index(g); !ram {
					return nil, fmt.Errorf("gfn %#x is not RAM", g)
				}
				miss = append(miss, g)
			}
		}
		if len(miss) > 0 {
			buf := make([]byte, len(miss)*PageSize)
			failed, err := s.opt.HV.ReadPages(s.opt.Dom, miss, buf)
			if err != nil {
				return nil, err
			}
			if len(failed) > 0 {
				return nil, fmt.Errorf("gfn %#x not mappable", miss[failed[0]])
			}
			for i, g := range miss {
				cache[g] = buf[i*PageSize : (i+1)*PageSize]
			}
		}
		out := make([][]byte, len(gfns))
		for i, g := range gfns {
			out[i] = cache[g]
		}
		return out, nil
	}
	read := func(gfn uint64) ([]byte, error) {
		p, err := readBatch([]uint64{gfn})
		if err != nil {
			return nil, err
		}
		return p[0], nil
	}
	var tgfns, pgfns []uint64
	for _, c := range cpus {
		mode, ok := ptwalk.ModeOf(c.CR0, c.CR4, c.EFER)
		if !ok {
			s.opt.Logf("vcpu %d: paging off or unsupported (cr0=%#x cr4=%#x efer=%#x): no page tables", c.VCPU, c.CR0, c.CR4, c.EFER)
			continue
		}
		var res ptwalk.Result
		if mode == ptwalk.LongMode4 {
			// A 64-bit kernel: only the kernel half, a level per mapping.
			res, err = ptwalk.WalkKernel(c.CR3, s.maxGFN, readBatch, 1<<16)
		} else {
			res, err = ptwalk.Walk(mode, c.CR3, s.maxGFN, read, 1<<16)
		}
		if err != nil {
			return nil, nil, 0, fmt.Errorf("walk the page tables of vcpu %d (cr3 %#x): %w", c.VCPU, c.CR3, err)
		}
		tgfns = append(tgfns, res.Tables...)
		skipped += uint64(res.Skipped)
		if mode == ptwalk.LongMode4 {
			pgfns = append(pgfns, s.perCPUPages(c, read)...)
		}
	}
	for _, g := range slices.Compact(slices.Sorted(slices.Values(tgfns))) {
		if i, ok := s.index(g); ok {
			tables = append(tables, i)
		}
	}
	for _, g := range slices.Compact(slices.Sorted(slices.Values(pgfns))) {
		if i, ok := s.index(g); ok {
			percpu = append(percpu, i)
		}
	}
	return tables, percpu, skipped, nil
}

// PerCPUSpan is how much of each vCPU's per-CPU area goes with the core
// state. The resumed guest registers its vcpu_info again (Linux:
// VCPUOP_register_vcpu_info on a per-CPU variable), and Xen maps that
// page itself: if it is paged out the hypercall fails and Linux panics
// ("register_vcpu_info failed"). Without the guest's symbols the exact
// page is unknown; the static per-CPU variables sit at the start of the
// area, within its first 256 KiB on Debian's kernels.
const PerCPUSpan = 256 << 10

// perCPUPages returns the gfns of the first PerCPUSpan bytes of the
// per-CPU area of a 64-bit kernel vCPU (its kernel GS base).
func (s *Source) perCPUPages(c CPURegs, read func(uint64) ([]byte, error)) []uint64 {
	const kernelHalf = 0xffff_8000_0000_0000
	base := c.GSBase
	if base < kernelHalf {
		base = c.ShadowGS
	}
	if base < kernelHalf {
		s.opt.Logf("vcpu %d: no kernel GS base (gs %#x, shadow %#x): no per-CPU pages", c.VCPU, c.GSBase, c.ShadowGS)
		return nil
	}
	var out []uint64
	for off := uint64(0); off < PerCPUSpan; off += PageSize {
		g, err := ptwalk.Translate(c.CR3, base+off, read)
		if err != nil {
			continue
		}
		out = append(out, g)
	}
	return out
}
