package xendom

import (
	"encoding/json"
	"fmt"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
	"github.com/xl-postcopy/xl-postcopy/xen/engine"
)

// Taking over a migration whose source process died after GO
// (engine.TakeOverSource): the source copy is paused or suspended, every
// page still in it, and the destination numbers pages by the page space
// the dead process sent in its DOMAIN_HEADER. That page space cannot be
// computed again from the paused domain (holes a balloon left count in
// it, as they were at the setup), so the source saves it (PageSpace) in
// its state record and the new process reopens the domain with it.

// PageSpace is the source's page space: page index i is the i-th gfn of
// these ranges. Saved with the migration's state so that a take-over
// numbers pages as the destination does.
func (s *Source) PageSpace() json.RawMessage {
	b, _ := json.Marshal(toRanges(s.gfns))
	return b
}

// ReopenSource opens the paused source copy of a migration that passed GO
// (opt.Dom, named current now: NAME--migratedaway, or NAME if the dead
// process had not renamed it yet; opt.Name is the domain's own name) with
// the page space its first source saved. It refuses a domain that runs:
// its memory would not be the one the destination resumed from.
func ReopenSource(opt SourceOptions, current string, space json.RawMessage) (*Source, error) {
	if opt.Logf == nil {
		opt.Logf = func(string, ...any) {}
	}
	var ranges []Range
	if err := json.Unmarshal(space, &ranges); err != nil {
		return nil, fmt.Errorf("the saved page space does not parse: %w", err)
	}
	gfns, err := fromRanges(ranges, engine.MaxPages)
	if err != nil {
		return nil, fmt.Errorf("the saved page space: %w", err)
	}
	if len(gfns) == 0 {
		return nil, fmt.Errorf("the saved page space is empty")
	}
	info, err := opt.HV.Domain(opt.Dom)
	if err != nil {
		return nil, fmt.Errorf("domain %d: %w", opt.Dom, err)
	}
	if err := RefusePostcopy(info); err != nil {
		return nil, err
	}
	suspended := info.Shutdown && info.ShutdownReason == xenctrl.ShutdownSuspend
	if info.Dying || (info.Shutdown && !suspended) {
		return nil, fmt.Errorf("domain %d is dying or shut down (not suspended): not the paused copy of a migration", opt.Dom)
	}
	if !suspended && !info.Paused {
		return nil, fmt.Errorf("domain %d runs (neither paused nor suspended): its memory is not the copy the destination resumed from, so the migration cannot be taken over from it", opt.Dom)
	}
	if max, err := opt.HV.MaxGPFN(opt.Dom); err == nil && gfns[len(gfns)-1] > max {
		return nil, fmt.Errorf("the saved page space reaches gfn %#x, beyond domain %d's highest (%#x): not this domain's", gfns[len(gfns)-1], opt.Dom, max)
	}
	kind := "hvm"
	if info.PVH {
		kind = "pvh"
	}
	s := &Source{opt: opt, info: info, gfns: gfns, maxGFN: gfns[len(gfns)-1],
		absent: make([]bool, len(gfns)), suspended: suspended,
		// Resume (only if the destination says it never ran the domain
		// and then fails to) renames it back and resumes it.
		renamed: current != opt.Name}
	// Holes in the page space (a balloon's, as at the pause) are absent:
	// the destination has them as such, and reading one fails.
	const batch = 1024
	for base := 0; base < len(gfns); base += batch {
		probe := gfns[base:min(base+batch, len(gfns))]
		types, err := opt.HV.PageTypes(opt.Dom, probe)
		if err != nil {
			return nil, fmt.Errorf("page types of gfns %#x..%#x: %w", probe[0], probe[len(probe)-1], err)
		}
		for i, t := range types {
			if t == xenctrl.PageInvalid || t == xenctrl.PageXAlloc || t == xenctrl.PageBroken {
				s.absent[base+i] = true
				s.stats.AbsentPages++
			}
		}
	}
	s.cfg = DomainConfig{Name: opt.Name, Kind: kind, VCPUs: info.MaxVCPUID + 1, GFNs: ranges}
	s.stats.RAMPages = uint64(len(gfns)) - s.stats.AbsentPages
	s.stats.GuestHints = "none (taken over after GO)"
	return s, nil
}
