package xendom

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
)

// validConfig is a configuration decodeDomainConfig accepts for a domain
// of 48 pages (32 + 16 gfns).
func validConfig() DomainConfig {
	return DomainConfig{Name: "vm1", Kind: "pvh", VCPUs: 2, XLConfig: testXLConfig,
		GFNs:     []Range{{First: 0, Count: 32}, {First: 0x100, Count: 16}},
		Special:  map[string]uint64{"store": 0xfeffc, "console": 0xfeffd},
		Resident: []Range{{First: 3, Count: 2}, {First: 0x101, Count: 1}}, BalloonHold: "0123456789abcdef"}
}

const validPages = 48

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	require.NoError(t, err)
	return b
}

// The configuration and core state a Source sends are accepted as they
// are by the destination's decoders.
func TestSourceConfigAndCoreStateDecode(t *testing.T) {
	hv := newFakeHV()
	src := hv.newGuestDomain("src")
	s, err := NewSource(SourceOptions{HV: hv, XS: &fakeStore{h: hv}, XL: &fakeXL{h: hv}, Dom: src.id, Name: "vm1",
		XLConfig: []byte(testXLConfig), BalloonHold: "0123456789abcdef"})
	require.NoError(t, err)
	info := s.Info()
	cfg, err := decodeDomainConfig(info.Config, info.NumPages)
	require.NoError(t, err)
	require.Equal(t, s.cfg, cfg)
	core, err := s.CoreState()
	require.NoError(t, err)
	cs, err := decodeCoreState(core)
	require.NoError(t, err)
	require.Equal(t, src.hvm, cs.HVM)
	require.Equal(t, src.tsc, cs.TSC)
}

func TestDecodeDomainConfigAccepts(t *testing.T) {
	want := validConfig()
	got, err := decodeDomainConfig(mustJSON(t, want), validPages)
	require.NoError(t, err)
	require.Equal(t, want, got)
	// No resident hint, no special pages, no balloon hold; adjacent ranges.
	want = DomainConfig{Name: "vm1", Kind: "hvm", VCPUs: maxVCPUs, XLConfig: strings.Repeat("x", maxXLConfig),
		GFNs: []Range{{First: 0, Count: 4}, {First: 4, Count: 4}, {First: gfnLimit - 1, Count: 1}}}
	got, err = decodeDomainConfig(mustJSON(t, want), 9)
	require.NoError(t, err)
	require.Equal(t, want, got)
}

func TestDecodeDomainConfigRejects(t *testing.T) {
	many := make([]Range, maxGFNRanges+1)
	for i := range many {
		many[i] = Range{First: uint64(2 * i), Count: 1}
	}
	bigHint := []Range{{First: 0, Count: maxResidentHint + 1}}
	special := map[string]uint64{}
	for i := 0; i <= maxSpecial; i++ {
		special[strings.Repeat("s", i+1)] = uint64(i)
	}
	for _, tc := range []struct {
		name  string
		edit  func(c *DomainConfig)
		pages uint64
		raw   []byte // instead of the edited configuration
		want  string
	}{
		{name: "too large", raw: append(append([]byte(`{"name":"`), bytes.Repeat([]byte("a"), maxDomainConfigSize)...), `"}`...), want: "bytes (at most"},
		{name: "not json", raw: []byte(`{"name":`), want: "unexpected end"},
		{name: "trailing data", raw: append(mustJSON(t, validConfig()), '{'), want: "after top-level value"},
		{name: "wrong type", raw: []byte(`{"vcpus":"two"}`), want: "cannot unmarshal"},
		{name: "null", raw: []byte(`null`), want: "name of 0 bytes"},
		{name: "no name", edit: func(c *DomainConfig) { c.Name = "" }, want: "name of 0 bytes"},
		{name: "long name", edit: func(c *DomainConfig) { c.Name = strings.Repeat("n", maxNameLen+1) }, want: "name of 257 bytes"},
		{name: "control in name", edit: func(c *DomainConfig) { c.Name = "vm\n1" }, want: "control character"},
		{name: "kind", edit: func(c *DomainConfig) { c.Kind = "pv" }, want: `kind "pv"`},
		{name: "no vcpus", edit: func(c *DomainConfig) { c.VCPUs = 0 }, want: "0 vCPUs"},
		{name: "many vcpus", edit: func(c *DomainConfig) { c.VCPUs = maxVCPUs + 1 }, want: "4097 vCPUs"},
		{name: "no xl config", edit: func(c *DomainConfig) { c.XLConfig = "" }, want: "xl configuration of 0 bytes"},
		{name: "big xl config", edit: func(c *DomainConfig) { c.XLConfig = strings.Repeat("x", maxXLConfig+1) }, want: "xl configuration of 1048577 bytes"},
		{name: "many gfn ranges", edit: func(c *DomainConfig) { c.GFNs = many }, pages: 1 << 20, want: "gfns: 65537 ranges"},
		{name: "empty gfn range", edit: func(c *DomainConfig) { c.GFNs[1].Count = 0 }, want: "gfns: range 1 (0x100+0) is empty"},
		{name: "gfn overflow", edit: func(c *DomainConfig) { c.GFNs[1] = Range{First: 1<<64 - 1, Count: 2} }, want: "goes beyond gfn"},
		{name: "gfn beyond 52 bits", edit: func(c *DomainConfig) { c.GFNs[1] = Range{First: gfnLimit - 8, Count: 16} }, want: "goes beyond gfn"},
		{name: "gfns out of order", edit: func(c *DomainConfig) { c.GFNs[0], c.GFNs[1] = c.GFNs[1], c.GFNs[0] }, want: "out of order"},
		{name: "gfns overlap", edit: func(c *DomainConfig) { c.GFNs[1].First = 31 }, want: "out of order or overlaps"},
		{name: "more gfns than pages", edit: func(c *DomainConfig) {}, pages: validPages - 1, want: "gfns: ranges hold more than 47 gfns"},
		{name: "empty resident range", edit: func(c *DomainConfig) { c.Resident[0].Count = 0 }, want: "resident gfns: range 0 (0x3+0) is empty"},
		{name: "resident overflow", edit: func(c *DomainConfig) { c.Resident[1] = Range{First: 1 << 63, Count: 1 << 63} }, want: "resident gfns: range 1"},
		{name: "resident overlap", edit: func(c *DomainConfig) { c.Resident[1] = Range{First: 4, Count: 1} }, want: "resident gfns: range 1 (0x4+1) is out of order"},
		{name: "resident beyond pages", edit: func(c *DomainConfig) { c.Resident = []Range{{First: 0, Count: validPages + 1}} }, want: "resident gfns: ranges hold more than 48"},
		{name: "resident beyond hint", edit: func(c *DomainConfig) { c.Resident = bigHint }, pages: 1 << 20, want: "resident gfns: ranges hold more than 8192"},
		{name: "many special", edit: func(c *DomainConfig) { c.Special = special }, want: "17 special pages"},
		{name: "special beyond gfns", edit: func(c *DomainConfig) { c.Special["store"] = gfnLimit }, want: "special page store at gfn"},
		{name: "long nonce", edit: func(c *DomainConfig) { c.BalloonHold = strings.Repeat("h", maxBalloonHold+1) }, want: "nonce of 65 bytes"},
		{name: "nonce with space", edit: func(c *DomainConfig) { c.BalloonHold = "a b" }, want: "not printable ASCII"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := tc.raw
			if b == nil {
				c := validConfig()
				tc.edit(&c)
				b = mustJSON(t, c)
			}
			pages := tc.pages
			if pages == 0 {
				pages = validPages
			}
			_, err := decodeDomainConfig(b, pages)
			require.ErrorIs(t, err, errBadConfig)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestDecodeCoreState(t *testing.T) {
	tsc := xenctrl.TSCInfo{Mode: xenctrl.TSCModeNeverEmulate, ElapsedNsec: 1, GTSCkHz: 2, Incarnation: 3}
	cs, err := decodeCoreState(mustJSON(t, coreState{TSC: tsc, HVM: make([]byte, maxHVMContext)}))
	require.NoError(t, err)
	require.Len(t, cs.HVM, maxHVMContext)
	require.Equal(t, tsc, cs.TSC)
	for _, tc := range []struct {
		name string
		b    []byte
		want string
	}{
		{"too large", bytes.Repeat([]byte(" "), maxCoreStateSize+1), "bytes (at most"},
		{"not json", []byte(`{"hvm":`), "unexpected end"},
		{"bad base64", []byte(`{"hvm":"!!"}`), "illegal base64"},
		{"null", []byte(`null`), "HVM context of 0 bytes"},
		{"no hvm", mustJSON(t, coreState{TSC: tsc}), "HVM context of 0 bytes"},
		{"big hvm", mustJSON(t, coreState{HVM: make([]byte, maxHVMContext+1)}), "HVM context of 1048577 bytes"},
		{"tsc mode", mustJSON(t, coreState{TSC: xenctrl.TSCInfo{Mode: 3}, HVM: []byte{1}}), "TSC mode 3"},
		{"negative", []byte(`{"tsc":{"Mode":-1},"hvm":"AQ=="}`), "cannot unmarshal"},
	} {
		_, err := decodeCoreState(tc.b)
		require.ErrorIs(t, err, errBadCoreState, tc.name)
		require.ErrorContains(t, err, tc.want, tc.name)
	}
}

// FuzzDomainConfig: any bytes give a configuration within its bounds or
// an error; an accepted one expands to at most numPages ascending gfns
// (what newDest does next) and survives a JSON round trip.
func FuzzDomainConfig(f *testing.F) {
	f.Add(mustJSON(f, validConfig()), uint64(validPages))
	c := validConfig()
	c.Resident, c.BalloonHold, c.Special = nil, "", nil
	f.Add(mustJSON(f, c), uint64(validPages))
	f.Add([]byte(`{"name":"a","kind":"hvm","vcpus":1,"xl_config":"x","gfns":[{"first":0,"count":1}]}`), uint64(1))
	f.Add([]byte(`{"gfns":[{"first":18446744073709551615,"count":2}]}`), uint64(1<<62))
	f.Add([]byte(`null`), uint64(0))
	f.Fuzz(func(t *testing.T, b []byte, numPages uint64) {
		cfg, err := decodeDomainConfig(b, numPages)
		if err != nil {
			return
		}
		if cfg.Name == "" || len(cfg.Name) > maxNameLen || cfg.VCPUs == 0 || cfg.VCPUs > maxVCPUs ||
			cfg.XLConfig == "" || len(cfg.XLConfig) > maxXLConfig || len(cfg.GFNs) > maxGFNRanges ||
			len(cfg.Special) > maxSpecial || len(cfg.BalloonHold) > maxBalloonHold {
			t.Fatalf("accepted a configuration beyond its bounds: %+v", cfg)
		}
		gfns, err := fromRanges(cfg.GFNs, numPages)
		if err != nil || uint64(len(gfns)) > numPages {
			t.Fatalf("accepted gfns %v that do not expand within %d pages: %v", cfg.GFNs, numPages, err)
		}
		if len(gfns) > 0 && gfns[len(gfns)-1] >= gfnLimit {
			t.Fatalf("accepted gfn %#x", gfns[len(gfns)-1])
		}
		resident, err := fromRanges(cfg.Resident, numPages)
		if err != nil || len(resident) > maxResidentHint {
			t.Fatalf("accepted resident gfns %v: %d of them, %v", cfg.Resident, len(resident), err)
		}
		again, err := decodeDomainConfig(mustJSON(t, cfg), numPages)
		if err != nil {
			t.Fatalf("re-encoded configuration refused: %v", err)
		}
		if !bytes.Equal(mustJSON(t, again), mustJSON(t, cfg)) {
			t.Fatalf("round trip changed the configuration: %+v -> %+v", cfg, again)
		}
	})
}

// FuzzCoreState: any bytes give a core state within its bounds or an
// error; an accepted one survives a JSON round trip.
func FuzzCoreState(f *testing.F) {
	hvm := hvmContext(ptCR3a, ptCR3b)
	f.Add(mustJSON(f, coreState{TSC: xenctrl.TSCInfo{Mode: 1, ElapsedNsec: 12345, GTSCkHz: 2000000, Incarnation: 3}, HVM: hvm[:64]}))
	f.Add([]byte(`{"tsc":{"Mode":2},"hvm":"AQ=="}`))
	f.Add([]byte(`{"hvm":""}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		cs, err := decodeCoreState(b)
		if err != nil {
			return
		}
		if len(cs.HVM) == 0 || len(cs.HVM) > maxHVMContext || cs.TSC.Mode > xenctrl.TSCModeNeverEmulate {
			t.Fatalf("accepted a core state beyond its bounds: mode %d, %d bytes", cs.TSC.Mode, len(cs.HVM))
		}
		again, err := decodeCoreState(mustJSON(t, cs))
		if err != nil || again.TSC != cs.TSC || !bytes.Equal(again.HVM, cs.HVM) {
			t.Fatalf("round trip changed the core state: %v", err)
		}
	})
}
