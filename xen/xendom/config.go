package xendom

import (
	"encoding/json"
	"errors"
	"fmt"
	"unicode/utf8"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// The domain configuration (in the DOMAIN_HEADER) and the core state (the
// CORE_STATE record) cross the network as JSON. The destination decodes
// them with decodeDomainConfig and decodeCoreState, which bound every
// part of them before anything else uses it: the wire package checks only
// the framing of these blobs, not what is inside.
const (
	// maxDomainConfigSize bounds the JSON of a DomainConfig: what the
	// DOMAIN_HEADER can carry at most.
	maxDomainConfigSize = wire.MaxBlob
	// maxGFNRanges bounds the gfn ranges of a domain's page space. Real
	// domains have a few (RAM below and above the PCI hole, special pages
	// and grant frames cut out).
	maxGFNRanges = 1 << 16
	// maxNameLen bounds a domain's name (as the DOMAIN_HEADER's name).
	maxNameLen = 256
	// maxVCPUs bounds a domain's vCPUs (Xen's HVM_MAX_VCPUS is 128 on
	// x86; 4096 leaves room).
	maxVCPUs = 4096
	// maxXLConfig bounds the xl configuration file.
	maxXLConfig = 1 << 20
	// maxSpecial bounds the special pages (specialParams and shared_info).
	maxSpecial = 16
	// maxBalloonHold bounds the balloon-hold nonce (xen/dsb/control's
	// nonces: at most 64 printable ASCII characters).
	maxBalloonHold = 64

	// maxHVMContext bounds the HVM context of the core state.
	maxHVMContext = 1 << 20
	// maxCoreStateSize bounds the JSON of a core state: the HVM context in
	// base64 (4/3 of its size) and the few fields around it.
	maxCoreStateSize = 2 << 20
)

// gfnLimit is one past the highest x86 gfn (52-bit physical addresses of
// 4 KiB pages, wire.PFNMask).
const gfnLimit = wire.PFNMask + 1

var errBadConfig = errors.New("refused")

// decodeDomainConfig decodes the DomainConfig of a DOMAIN_HEADER for a
// domain of numPages pages, refusing a configuration that is too large or
// does not describe such a domain: its gfn ranges ascending, disjoint,
// non-empty, below gfnLimit and at most numPages gfns; its resident gfns
// as many ranges too, at most numPages and maxResidentHint of them (the
// source never sends a larger hint); a name, vCPU count, xl
// configuration, special pages and balloon-hold nonce within their
// bounds. The caller still checks what needs the domain (that the ranges
// hold exactly numPages gfns and the resident ones are among them).
func decodeDomainConfig(b []byte, numPages uint64) (DomainConfig, error) {
	if len(b) > maxDomainConfigSize {
		return DomainConfig{}, fmt.Errorf("%w: %d bytes (at most %d)", errBadConfig, len(b), maxDomainConfigSize)
	}
	var cfg DomainConfig
	if err := json.Unmarshal(b, &cfg); err != nil {
		return DomainConfig{}, fmt.Errorf("%w: %w", errBadConfig, err)
	}
	if err := checkConfig(&cfg, numPages); err != nil {
		return DomainConfig{}, fmt.Errorf("%w: %w", errBadConfig, err)
	}
	return cfg, nil
}

func checkConfig(cfg *DomainConfig, numPages uint64) error {
	if cfg.Name == "" || len(cfg.Name) > maxNameLen {
		return fmt.Errorf("name of %d bytes (1..%d)", len(cfg.Name), maxNameLen)
	}
	if !utf8.ValidString(cfg.Name) {
		return fmt.Errorf("name %q is not UTF-8", cfg.Name)
	}
	for _, c := range cfg.Name {
		if c < ' ' || c == 0x7f {
			return fmt.Errorf("name %q holds a control character", cfg.Name)
		}
	}
	if cfg.Kind != "pvh" && cfg.Kind != "hvm" {
		return fmt.Errorf("kind %q (want pvh or hvm)", cfg.Kind)
	}
	if cfg.VCPUs == 0 || cfg.VCPUs > maxVCPUs {
		return fmt.Errorf("%d vCPUs (1..%d)", cfg.VCPUs, maxVCPUs)
	}
	if cfg.XLConfig == "" || len(cfg.XLConfig) > maxXLConfig {
		return fmt.Errorf("xl configuration of %d bytes (1..%d)", len(cfg.XLConfig), maxXLConfig)
	}
	if _, err := checkGFNRanges("gfns", cfg.GFNs, maxGFNRanges, numPages); err != nil {
		return err
	}
	if _, err := checkGFNRanges("resident gfns", cfg.Resident, maxResidentHint, min(numPages, maxResidentHint)); err != nil {
		return err
	}
	if len(cfg.Special) > maxSpecial {
		return fmt.Errorf("%d special pages (at most %d)", len(cfg.Special), maxSpecial)
	}
	for name, g := range cfg.Special {
		if name == "" || len(name) > 32 {
			return fmt.Errorf("special page name of %d bytes (1..32)", len(name))
		}
		if g >= gfnLimit {
			return fmt.Errorf("special page %s at gfn %#x (beyond %#x)", name, g, uint64(gfnLimit))
		}
	}
	if h := cfg.BalloonHold; h != "" {
		if len(h) > maxBalloonHold {
			return fmt.Errorf("balloon-hold nonce of %d bytes (at most %d)", len(h), maxBalloonHold)
		}
		for i := 0; i < len(h); i++ {
			if h[i] <= ' ' || h[i] > '~' {
				return fmt.Errorf("balloon-hold nonce %q is not printable ASCII", h)
			}
		}
	}
	return nil
}

// checkGFNRanges holds r to at most maxRanges ranges, each non-empty and
// below gfnLimit, ascending and disjoint, holding at most maxTotal gfns
// in all; it returns how many they hold.
func checkGFNRanges(what string, r []Range, maxRanges int, maxTotal uint64) (uint64, error) {
	if len(r) > maxRanges {
		return 0, fmt.Errorf("%s: %d ranges (at most %d)", what, len(r), maxRanges)
	}
	var next, total uint64
	for i, x := range r {
		if x.Count == 0 {
			return 0, fmt.Errorf("%s: range %d (%#x+%d) is empty", what, i, x.First, x.Count)
		}
		if x.First >= gfnLimit || x.Count > gfnLimit-x.First {
			return 0, fmt.Errorf("%s: range %d (%#x+%d) goes beyond gfn %#x", what, i, x.First, x.Count, uint64(gfnLimit))
		}
		if x.First < next {
			return 0, fmt.Errorf("%s: range %d (%#x+%d) is out of order or overlaps the one before", what, i, x.First, x.Count)
		}
		if x.Count > maxTotal-total {
			return 0, fmt.Errorf("%s: ranges hold more than %d gfns", what, maxTotal)
		}
		next = x.First + x.Count
		total += x.Count
	}
	return total, nil
}

var errBadCoreState = errors.New("refused")

// decodeCoreState decodes a CORE_STATE body, refusing one that is too
// large, an HVM context that is empty or over maxHVMContext, and a TSC
// mode Xen does not have.
func decodeCoreState(b []byte) (coreState, error) {
	if len(b) > maxCoreStateSize {
		return coreState{}, fmt.Errorf("%w: %d bytes (at most %d)", errBadCoreState, len(b), maxCoreStateSize)
	}
	var cs coreState
	if err := json.Unmarshal(b, &cs); err != nil {
		return coreState{}, fmt.Errorf("%w: %w", errBadCoreState, err)
	}
	if len(cs.HVM) == 0 || len(cs.HVM) > maxHVMContext {
		return coreState{}, fmt.Errorf("%w: HVM context of %d bytes (1..%d)", errBadCoreState, len(cs.HVM), maxHVMContext)
	}
	if cs.TSC.Mode > xenctrl.TSCModeNeverEmulate {
		return coreState{}, fmt.Errorf("%w: TSC mode %d (0..%d)", errBadCoreState, cs.TSC.Mode, xenctrl.TSCModeNeverEmulate)
	}
	return cs, nil
}
