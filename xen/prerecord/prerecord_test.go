package prerecord

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

// traj makes a trajectory from pfns, perRound accesses per log-dirty round
// of 50 ms, the way trace.Read returns one.
func traj(pfns []uint64, perRound int) []trace.Access {
	acc := make([]trace.Access, len(pfns))
	for i, p := range pfns {
		r := uint32(i / perRound)
		acc[i] = trace.Access{T: time.Duration(r) * 50 * time.Millisecond, Round: r, PFN: p, Write: true}
	}
	return acc
}

// span returns from, from+step, … (n values); step may be negative.
func span(from uint64, step int64, n int) []uint64 {
	out := make([]uint64, n)
	for i := range out {
		out[i] = uint64(int64(from) + step*int64(i))
	}
	return out
}

// bitmapOrder lists each round of perRound accesses in ascending pfn order,
// as a recorder reading a dirty bitmap does.
func bitmapOrder(pfns []uint64, perRound int) []uint64 {
	out := slices.Clone(pfns)
	for i := 0; i < len(out); i += perRound {
		slices.Sort(out[i:min(i+perRound, len(out))])
	}
	return out
}

func lrOnly() Options {
	o := DefaultOptions()
	o.DBSCAN = false
	return o
}

func TestBuildRegression(t *testing.T) {
	interleave := func(a, b []uint64) []uint64 {
		var out []uint64
		for i := range a {
			out = append(out, a[i], b[i])
		}
		return out
	}
	cases := []struct {
		name      string
		pfns      []uint64
		perRound  int
		npages    uint64
		wantPaths []Path // A, B, Dir, FirstPFN, LastPFN, Points, Window compared
		wantNext  []uint64
	}{
		{
			name: "sequential scan continues upward", pfns: span(1000, 1, 1000), perRound: 50, npages: 1 << 16,
			// 50 pages per round · 4 rounds = 200 pages after 1999.
			wantPaths: []Path{{A: 1000, B: 50, Dir: 1, FirstPFN: 1000, LastPFN: 1999, Points: 1000, Window: 200}},
			wantNext:  span(2000, 1, 200),
		},
		{
			name: "backward scan continues downward", pfns: span(5000, -1, 1000), perRound: 50, npages: 1 << 16,
			wantPaths: []Path{{A: 5000, B: -50, Dir: -1, FirstPFN: 5000, LastPFN: 4001, Points: 1000, Window: 200}},
			wantNext:  span(4000, -1, 200),
		},
		{
			// Each round lists its 50 pages ascending; the tracker reads
			// them descending because the next round lies just below.
			name: "backward scan in bitmap order continues downward", pfns: bitmapOrder(span(5000, -1, 1000), 50), perRound: 50, npages: 1 << 16,
			wantPaths: []Path{{A: 5000, B: -50, Dir: -1, FirstPFN: 5000, LastPFN: 4001, Points: 1000, Window: 200}},
			wantNext:  span(4000, -1, 200),
		},
		{
			name: "window stops at the top of the guest", pfns: span(900, 1, 100), perRound: 50, npages: 1010,
			wantPaths: []Path{{A: 900, B: 50, Dir: 1, FirstPFN: 900, LastPFN: 999, Points: 100, Window: 200}},
			wantNext:  span(1000, 1, 10),
		},
		{
			name: "slow scan gets the minimum window", pfns: span(100, 1, 40), perRound: 4, npages: 1 << 16,
			// 4 pages per round · 4 rounds = 16 < MinWindowPages 32.
			wantPaths: []Path{{A: 100, B: 4, Dir: 1, FirstPFN: 100, LastPFN: 139, Points: 40, Window: 32}},
			wantNext:  span(140, 1, 32),
		},
		{
			// A: 1000,1001,… at 20 pages/round; B: 30000,30002,… at 40
			// pages/round. B's last access is the most recent, so its window
			// (160 pages from 30799; its own even pages are not recorded
			// beyond 30798) comes first, then A's 80 pages from 1400.
			name:     "two interleaved streams give two paths, most recent first",
			pfns:     interleave(span(1000, 1, 400), span(30000, 2, 400)),
			perRound: 40, npages: 1 << 16,
			wantPaths: []Path{
				{A: 29999, B: 40, Dir: 1, FirstPFN: 30000, LastPFN: 30798, Points: 400, Window: 160},
				{A: 1000, B: 20, Dir: 1, FirstPFN: 1000, LastPFN: 1399, Points: 400, Window: 80},
			},
			wantNext: append(span(30799, 1, 160), span(1400, 1, 80)...),
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := Build(traj(tc.pfns, tc.perRound), tc.npages, lrOnly())
			require.Equal(t, len(tc.pfns), p.Recorded)
			require.Equal(t, tc.pfns, p.Order[:p.Recorded], "recorded pages first, in trajectory order")
			require.Len(t, p.Paths, len(tc.wantPaths))
			for i, w := range tc.wantPaths {
				g := p.Paths[i]
				assert.InDelta(t, w.A, g.A, 1e-6, "path %d A", i)
				assert.InDelta(t, w.B, g.B, 1e-9, "path %d B", i)
				assert.InDelta(t, 1, g.R2, 1e-9, "path %d R2", i)
				assert.Equal(t, w.Dir, g.Dir, "path %d Dir", i)
				assert.Equal(t, w.FirstPFN, g.FirstPFN, "path %d FirstPFN", i)
				assert.Equal(t, w.LastPFN, g.LastPFN, "path %d LastPFN", i)
				assert.Equal(t, w.Points, g.Points, "path %d Points", i)
				assert.Equal(t, w.Window, g.Window, "path %d Window", i)
			}
			require.Equal(t, tc.wantNext, p.Order[p.Recorded:])
			require.Equal(t, len(tc.wantNext), p.Predicted)
			require.Zero(t, p.Hotspot)
		})
	}
}

func TestBitmapOrderUpAndDownStreams(t *testing.T) {
	// Stream A climbs from 1000, stream B descends from 40000, 20 pages
	// each per round; every round is listed in ascending pfn order (A's
	// pages, then B's). B's pages are later in each round, so its window
	// comes first, downward; then A's, upward.
	var pfns []uint64
	for r := range 20 {
		for j := range 20 {
			pfns = append(pfns, uint64(1000+20*r+j))
		}
		for j := 19; j >= 0; j-- {
			pfns = append(pfns, uint64(40000-20*r-j))
		}
	}
	p := Build(traj(pfns, 40), 1<<16, lrOnly())
	require.Len(t, p.Paths, 2)
	b, a := p.Paths[0], p.Paths[1]
	assert.Equal(t, -1, b.Dir)
	assert.EqualValues(t, 40000, b.FirstPFN)
	assert.EqualValues(t, 39601, b.LastPFN)
	assert.InEpsilon(t, -20, b.B, 0.05)
	assert.Greater(t, b.R2, 0.99)
	assert.Equal(t, 1, a.Dir)
	assert.EqualValues(t, 1399, a.LastPFN)
	assert.Equal(t, span(39600, -1, int(b.Window)), p.Order[p.Recorded:p.Recorded+int(b.Window)])
	assert.EqualValues(t, 1400, p.Order[p.Recorded+int(b.Window)])
}

func TestWindowSkipsRecordedPages(t *testing.T) {
	// A scan of 2000..2099 after an earlier touch of 2102 and 2104: the
	// window from 2100 skips them instead of sending them twice.
	pfns := append([]uint64{2102, 2104}, span(2000, 1, 100)...)
	p := Build(traj(pfns, 10), 1<<16, lrOnly())
	require.Len(t, p.Paths, 1)
	require.EqualValues(t, 40, p.Paths[0].Window) // 10 pages/round · 4
	want := []uint64{2100, 2101, 2103}
	want = append(want, span(2105, 1, 35)...)
	require.Equal(t, want, p.Order[p.Recorded:])
}

func TestNoiseHasNoPath(t *testing.T) {
	for _, npages := range []uint64{4096, 1 << 20} {
		rng := rand.New(rand.NewPCG(1, npages))
		pfns := make([]uint64, 20000)
		for i := range pfns {
			pfns[i] = rng.Uint64N(npages)
		}
		p := Build(traj(pfns, 100), npages, lrOnly())
		assert.Empty(t, p.Paths, "npages %d", npages)
		assert.Zero(t, p.Predicted, "npages %d", npages)
	}
}

func TestCurvedPathRejectedByR2(t *testing.T) {
	// One page per round for 40 rounds, then 200 pages per round: strictly
	// monotone and within MaxStepPages, but not a line.
	var acc []trace.Access
	pfn := uint64(100)
	for r := range uint32(40) {
		acc = append(acc, trace.Access{Round: r, PFN: pfn})
		pfn++
	}
	for r := uint32(40); r < 42; r++ {
		for range 200 {
			acc = append(acc, trace.Access{Round: r, PFN: pfn})
			pfn++
		}
	}
	o := lrOnly()
	o.MinR2 = 0.99
	p := Build(acc, 1<<16, o)
	assert.Empty(t, p.Paths)
	o.MinR2 = -1 // every fit accepted: the same path now predicts
	p = Build(acc, 1<<16, o)
	require.Len(t, p.Paths, 1)
	assert.Less(t, p.Paths[0].R2, 0.99)
}

// processes builds the "many small processes" trajectory: process i owns the
// 16 even pages of [base_i, base_i+30] and runs cycles[i] cycles, one per
// round, all processes interleaved page by page.
func processes(bases []uint64, cycles []int) []trace.Access {
	var acc []trace.Access
	for r := range slices.Max(cycles) {
		for k := uint64(0); k < 16; k++ {
			for i, b := range bases {
				if r < cycles[i] {
					acc = append(acc, trace.Access{Round: uint32(r), PFN: b + 2*k})
				}
			}
		}
	}
	return acc
}

func TestHotspotsSmallProcesses(t *testing.T) {
	bases := []uint64{1000, 3000, 5000, 7000, 9000, 11000, 13000, 15000}
	cycles := []int{3, 5, 2, 9, 4, 6, 1, 7} // the busiest is index 3, base 7000
	acc := processes(bases, cycles)
	o := DefaultOptions()
	o.LR = false
	p := Build(acc, 1<<16, o)

	require.Equal(t, 8*16, p.Recorded)
	require.Len(t, p.Hotspots, len(bases), "one hotspot per process region")
	// Ranked by count: cycles 9, 7, 6, 5, 4, 3, 2, 1.
	wantBase := []uint64{7000, 15000, 11000, 3000, 9000, 1000, 5000, 13000}
	wantCycles := []int{9, 7, 6, 5, 4, 3, 2, 1}
	for i, h := range p.Hotspots {
		assert.Equal(t, wantBase[i], h.Start, "rank %d", i)
		assert.Equal(t, wantBase[i]+30, h.End, "rank %d", i)
		assert.Equal(t, 16*wantCycles[i], h.Count, "rank %d", i)
		assert.EqualValues(t, wantCycles[i]-1, h.LastRound, "rank %d", i)
		if i > 0 {
			assert.Less(t, h.Score, p.Hotspots[i-1].Score)
		}
	}
	// The busiest region's pfns all tie, so the first neighbourhood is
	// centred on its lowest pfn 7000 (h = 16) and goes outward both ways,
	// skipping the recorded even pages; then the centre 7018 takes the rest.
	first := []uint64{7001, 6999, 6998, 7003, 6997, 6996, 7005, 6995, 6994, 7007, 6993, 6992,
		7009, 6991, 6990, 7011, 6989, 6988, 7013, 6987, 6986, 7015, 6985, 6984}
	second := []uint64{7019, 7017, 7021, 7023, 7025, 7027, 7029, 7031, 7032, 7033, 7034}
	want := append(first, second...)
	require.Equal(t, want, p.Order[p.Recorded:p.Recorded+len(want)])
	// Each region contributes the same count: 16 below, 15 odd inside,
	// 4 above (7031..7034 lie within h of 7018).
	assert.Equal(t, len(bases)*len(want), p.Hotspot)
}

func TestHotspotsRandomProcesses(t *testing.T) {
	// 12 processes, each writing random pages of its own 48-page region at
	// its own rate, interleaved at random: regression finds no path, while
	// every region becomes exactly one hotspot and the busiest ranks first.
	rng := rand.New(rand.NewPCG(5, 5))
	const regions, width = 12, 48
	weight := make([]int, regions)
	for i := range weight {
		weight[i] = 1 + i // region i is touched ~(i+1) times as often as region 0
	}
	base := func(i int) uint64 { return 4096 + uint64(i)*1024 }
	var pfns []uint64
	for range 6000 {
		x := rng.IntN(regions * (regions + 1) / 2)
		i := 0
		for x >= weight[i] {
			x -= weight[i]
			i++
		}
		pfns = append(pfns, base(i)+rng.Uint64N(width))
	}
	p := Build(traj(pfns, 200), 1<<16, DefaultOptions())
	assert.Empty(t, p.Paths)
	require.Len(t, p.Hotspots, regions)
	seen := make(map[int]bool)
	for k, h := range p.Hotspots {
		i := int((h.Start - 4096) / 1024)
		require.False(t, seen[i], "region %d split into two hotspots", i)
		seen[i] = true
		assert.GreaterOrEqual(t, h.Start, base(i), "rank %d", k)
		assert.Less(t, h.End, base(i)+width, "rank %d", k)
	}
	assert.EqualValues(t, base(regions-1), p.Hotspots[0].Start&^1023, "busiest region first")
	assert.EqualValues(t, base(0), p.Hotspots[regions-1].Start&^1023, "quietest region last")
}

func TestDensityFactorRejectsUniformNoise(t *testing.T) {
	// 8 records per page spread evenly over a 2048-page guest: every page
	// has ~136 records within ±8, far above MinPts 8, yet no region is
	// denser than any other. The density rule raises MinPts to
	// ceil(2·16384·17/2048) = 272 and finds nothing.
	rng := rand.New(rand.NewPCG(11, 11))
	pfns := make([]uint64, 16384)
	for i := range pfns {
		pfns[i] = rng.Uint64N(2048)
	}
	o := DefaultOptions()
	o.LR = false
	p := Build(traj(pfns, 500), 2048, o)
	assert.Equal(t, 272, p.MinPts)
	assert.Empty(t, p.Hotspots)
	o.DensityFactor = -1
	p = Build(traj(pfns, 500), 2048, o)
	assert.Equal(t, 8, p.MinPts)
	assert.Len(t, p.Hotspots, 1, "without the rule the whole guest is one hotspot")
}

func TestHotspotRecencyBreaksTies(t *testing.T) {
	// Two regions with equal counts; the one touched later ranks first.
	var acc []trace.Access
	for r := range uint32(10) {
		base := uint64(100)
		if r >= 5 {
			base = 900
		}
		for k := uint64(0); k < 10; k++ {
			acc = append(acc, trace.Access{Round: r, PFN: base + k})
		}
	}
	o := DefaultOptions()
	o.LR = false
	p := Build(acc, 4096, o)
	require.Len(t, p.Hotspots, 2)
	assert.EqualValues(t, 900, p.Hotspots[0].Start)
	assert.EqualValues(t, 100, p.Hotspots[1].Start)
	assert.InDelta(t, 50*math.Exp2(-5.0/16), p.Hotspots[1].Score, 1e-9)
}

func TestBuildCombinedStages(t *testing.T) {
	// A scan plus a busy small region: recorded, then the scan window, then
	// the region's holes; the scan itself is one long hotspot whose lower
	// neighbourhood edge comes last.
	var pfns []uint64
	for i := range 500 {
		pfns = append(pfns, 10000+uint64(i))
		if i%5 == 0 {
			pfns = append(pfns, 200+uint64(i%40)) // region 200..235, every 5th page
		}
	}
	p := Build(traj(pfns, 60), 1<<16, DefaultOptions())
	require.Len(t, p.Paths, 1)
	assert.EqualValues(t, 10499, p.Paths[0].LastPFN)
	w := p.Paths[0].Window
	assert.Equal(t, span(10500, 1, int(w)), p.Order[p.Recorded:p.Recorded+int(w)])
	require.Equal(t, p.Recorded+p.Predicted+p.Hotspot, len(p.Order))
	assert.Positive(t, p.Hotspot)
	checkPlan(t, p, 1<<16)
}

func TestRecordedFirstTouchOrder(t *testing.T) {
	acc := traj([]uint64{5, 3, 5, 9, 3, 1, 9, 70}, 3)
	p := Build(acc, 64, Options{}) // neither predictor
	assert.Equal(t, []uint64{5, 3, 9, 1}, p.Order)
	assert.Equal(t, 4, p.Recorded)
	assert.Equal(t, 1, p.Dropped, "pfn 70 is beyond 64 pages")
	assert.Empty(t, Build(acc, 0, DefaultOptions()).Order)
}

func TestFitLine(t *testing.T) {
	ts := []float64{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}
	ys := make([]float64, len(ts))
	for i, x := range ts {
		ys[i] = 3 + 2.5*x
	}
	a, b, r2 := FitLine(ts, ys)
	assert.Equal(t, 3.0, a)
	assert.Equal(t, 2.5, b)
	assert.Equal(t, 1.0, r2)

	// Worked by hand: y = 1, 3, 2, 5 over t = 0..3; Stt = 5, Sty = 5.5,
	// Syy = 8.75 → b = 1.1, a = 2.75 − 1.1·1.5 = 1.1, r2 = 5.5²/(5·8.75).
	a, b, r2 = FitLine([]float64{0, 1, 2, 3}, []float64{1, 3, 2, 5})
	assert.InDelta(t, 1.1, a, 1e-12)
	assert.InDelta(t, 1.1, b, 1e-12)
	assert.InDelta(t, 30.25/43.75, r2, 1e-12)

	a, b, r2 = FitLine([]float64{2, 2, 2}, []float64{1, 2, 3})
	assert.Equal(t, []float64{2, 0, 0}, []float64{a, b, r2}, "no spread in t")
	a, b, r2 = FitLine([]float64{1, 2, 3}, []float64{7, 7, 7})
	assert.Equal(t, []float64{7, 0, 1}, []float64{a, b, r2}, "flat line")
}

func TestRunningMomentsMatchFitLine(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	ts := make([]float64, 1000)
	ys := make([]float64, 1000)
	var p openPath
	for i := range ts {
		ts[i] = float64(i)/10 + rng.Float64()
		ys[i] = 5e9 + 37*ts[i] + rng.NormFloat64()*50 // pfns in the billions
		p.add(ts[i], ys[i])
	}
	a1, b1, r1 := FitLine(ts, ys)
	a2, b2, r2 := lineFromMoments(p.mt, p.my, p.stt, p.syy, p.sty)
	assert.InEpsilon(t, a1, a2, 1e-9)
	assert.InEpsilon(t, b1, b2, 1e-6)
	assert.InDelta(t, r1, r2, 1e-9)
}

func TestRoundTimes(t *testing.T) {
	acc := []trace.Access{{Round: 0}, {Round: 0}, {Round: 0}, {Round: 0}, {Round: 3}, {Round: 5}, {Round: 5}}
	assert.Equal(t, []float64{0, 0.25, 0.5, 0.75, 3, 5, 5.5}, roundTimes(acc))
}

// checkPlan asserts the invariants every plan keeps.
func checkPlan(t testing.TB, p Plan, npages uint64) {
	t.Helper()
	seen := make(map[uint64]bool, len(p.Order))
	for i, q := range p.Order {
		if q >= npages {
			t.Fatalf("Order[%d] = %d is not below npages %d", i, q, npages)
		}
		if seen[q] {
			t.Fatalf("Order[%d] = %d is a duplicate", i, q)
		}
		seen[q] = true
	}
	if p.Recorded+p.Predicted+p.Hotspot != len(p.Order) {
		t.Fatalf("stage counts %d+%d+%d != len(Order) %d", p.Recorded, p.Predicted, p.Hotspot, len(p.Order))
	}
}

// randomTrajectory mixes scans (up and down, strided), small busy regions
// and noise, with rounds advancing irregularly.
func randomTrajectory(rng *rand.Rand, n int, npages uint64) []trace.Access {
	acc := make([]trace.Access, 0, n)
	var round uint32
	for len(acc) < n {
		if rng.IntN(8) == 0 {
			round += uint32(rng.IntN(3))
		}
		switch rng.IntN(3) {
		case 0: // scan
			p := rng.Uint64N(npages)
			step := int64(rng.IntN(5) - 2)
			for k := rng.IntN(200); k > 0 && len(acc) < n; k-- {
				acc = append(acc, trace.Access{Round: round, PFN: p})
				p = uint64(int64(p) + step)
				if rng.IntN(40) == 0 {
					round++
				}
			}
		case 1: // busy region
			b := rng.Uint64N(npages)
			for k := rng.IntN(100); k > 0 && len(acc) < n; k-- {
				acc = append(acc, trace.Access{Round: round, PFN: b + rng.Uint64N(64)})
			}
		default: // noise, including out-of-range pfns
			acc = append(acc, trace.Access{Round: round, PFN: rng.Uint64N(npages + npages/50 + 1)})
		}
	}
	return acc
}

func TestPlanInvariantsRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(42, 1))
	for iter := range 200 {
		npages := []uint64{1, 7, 300, 1 << 12, 1 << 18, flatLimit + 1, 1 << 36}[iter%7]
		acc := randomTrajectory(rng, rng.IntN(3000), npages)
		opt := DefaultOptions()
		if iter%3 == 1 {
			opt.MinR2, opt.MinPathPoints, opt.MinPts = -1, 2, 1
		}
		p := Build(acc, npages, opt)
		checkPlan(t, p, npages)
	}
}

func FuzzBuild(f *testing.F) {
	f.Add(uint16(100), []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, uint8(0))
	f.Add(uint16(0), []byte{}, uint8(1))
	f.Add(uint16(65535), []byte{255, 255, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4}, uint8(7))
	f.Fuzz(func(t *testing.T, np uint16, data []byte, knobs uint8) {
		npages := uint64(np)
		if knobs&8 != 0 {
			npages <<= 24 // exercise the sparse page set and big pfns
		}
		var acc []trace.Access
		var round uint32
		for i := 0; i+1 < len(data); i += 2 {
			v := uint64(data[i])<<8 | uint64(data[i+1])
			if knobs&8 != 0 {
				v <<= 24
			}
			if v%7 == 0 {
				round++
			}
			acc = append(acc, trace.Access{Round: round, PFN: v})
		}
		opt := DefaultOptions()
		if knobs&1 != 0 {
			opt.MinR2, opt.MinPathPoints = -1, 2
		}
		if knobs&2 != 0 {
			opt.MinPts = 1
		}
		if knobs&4 != 0 {
			opt.NeighbourhoodPages = 1
		}
		checkPlan(t, Build(acc, npages, opt), npages)
	})
}
