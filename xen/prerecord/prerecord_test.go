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
	o.WindowRounds = 4 // small windows keep the tables readable
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
		// want is the start of Order. Every path is live, so its window
		// comes first and the pages it swept (all recorded once) follow,
		// demoted, in first-touch order.
		want []uint64
	}{
		{
			// Every round is ascending, so this is read as a dirty-bitmap
			// trajectory: one point per round, the head (top) of its
			// segment, 1049 + 50·round.
			name: "sequential scan continues upward", pfns: span(1000, 1, 1000), perRound: 50, npages: 1 << 16,
			wantPaths: []Path{{A: 1049, B: 50, Dir: 1, FirstPFN: 1000, LastPFN: 1999, Points: 1000, Window: 200}},
			want:      append(span(2000, 1, 200), span(1000, 1, 1000)...),
		},
		{
			// Time order (descending inside rounds): access by access.
			name: "backward scan continues downward", pfns: span(5000, -1, 1000), perRound: 50, npages: 1 << 16,
			wantPaths: []Path{{A: 5000, B: -50, Dir: -1, FirstPFN: 5000, LastPFN: 4001, Points: 1000, Window: 200}},
			want:      append(span(4000, -1, 200), span(5000, -1, 1000)...),
		},
		{
			// Each round lists its 50 pages ascending; across rounds the
			// segments move down, head (bottom) 4951 − 50·round.
			name: "backward scan in bitmap order continues downward", pfns: bitmapOrder(span(5000, -1, 1000), 50), perRound: 50, npages: 1 << 16,
			wantPaths: []Path{{A: 4951, B: -50, Dir: -1, FirstPFN: 5000, LastPFN: 4001, Points: 1000, Window: 200}},
			want:      append(span(4000, -1, 200), bitmapOrder(span(5000, -1, 1000), 50)...),
		},
		{
			name: "window stops at the top of the guest", pfns: span(900, 1, 100), perRound: 10, npages: 1010,
			wantPaths: []Path{{A: 909, B: 10, Dir: 1, FirstPFN: 900, LastPFN: 999, Points: 100, Window: 40}},
			want:      append(span(1000, 1, 10), span(900, 1, 100)...),
		},
		{
			name: "slow scan gets the minimum window", pfns: span(100, 1, 40), perRound: 4, npages: 1 << 16,
			// 4 pages per round · 4 rounds = 16 < MinWindowPages 32.
			wantPaths: []Path{{A: 103, B: 4, Dir: 1, FirstPFN: 100, LastPFN: 139, Points: 40, Window: 32}},
			want:      append(span(140, 1, 32), span(100, 1, 40)...),
		},
		{
			// A: 1000,1001,… at 20 pages/round; B: 30000,30002,… at 40
			// pages/round. B's last access is the most recent, so its path
			// is first. Window pages merge by when the path reaches them:
			// B's k-th page in k/40 rounds, A's j-th in j/20, so B gets two
			// pages for each of A's (ties go to B, the earlier path).
			name:     "two interleaved streams give two paths, merged by arrival time",
			pfns:     interleave(span(1000, 1, 400), span(30000, 2, 400)),
			perRound: 40, npages: 1 << 16,
			wantPaths: []Path{
				{A: 29999, B: 40, Dir: 1, FirstPFN: 30000, LastPFN: 30798, Points: 400, Window: 160},
				{A: 1000, B: 20, Dir: 1, FirstPFN: 1000, LastPFN: 1399, Points: 400, Window: 80},
			},
			want: []uint64{30799, 30800, 1400, 30801, 30802, 1401, 30803, 30804, 1402},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := Build(traj(tc.pfns, tc.perRound), tc.npages, lrOnly())
			require.Equal(t, len(tc.pfns), p.Recorded)
			require.Equal(t, len(tc.pfns), p.Demoted, "every recorded page was swept by a live path")
			require.Len(t, p.Paths, len(tc.wantPaths))
			win := 0
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
				assert.True(t, g.Live, "path %d Live", i)
				win += int(min(g.Window, tc.npages-1-min(g.LastPFN, tc.npages-1)))
			}
			require.Equal(t, tc.want, p.Order[:len(tc.want)])
			require.Equal(t, win, p.Predicted)
			require.Zero(t, p.Hotspot)
			checkPlan(t, p, tc.npages)
		})
	}
}

func TestBitmapOrderUpAndDownStreams(t *testing.T) {
	// Stream A climbs from 1000, stream B descends from 40000, 20 pages
	// each per round; every round is listed in ascending pfn order (A's
	// pages, then B's). B's head is listed after A's, so B's path is the
	// more recent; both move 20 pages a round, so their windows alternate,
	// B first.
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
	assert.InDelta(t, -20, b.B, 1e-9)
	assert.InDelta(t, 1, b.R2, 1e-9)
	assert.Equal(t, 1, a.Dir)
	assert.EqualValues(t, 1000, a.FirstPFN)
	assert.EqualValues(t, 1399, a.LastPFN)
	assert.InDelta(t, 20, a.B, 1e-9)
	assert.Equal(t, []uint64{39600, 1400, 39599, 1401, 39598, 1402}, p.Order[:6])
}

func TestWindowAndRecordedPageSentOnce(t *testing.T) {
	// Round 0 writes 2102 and 2104; rounds 1..10 scan 2000..2099, ten
	// pages a round (bitmap order). 2102 and 2104 are recorded (long ago,
	// low score) and in the window (soon, high score): each goes once, at
	// its window place. Then the pages the scan swept, demoted.
	acc := []trace.Access{{Round: 0, PFN: 2102}, {Round: 0, PFN: 2104}}
	for i, q := range span(2000, 1, 100) {
		acc = append(acc, trace.Access{Round: uint32(1 + i/10), PFN: q})
	}
	p := Build(acc, 1<<16, lrOnly())
	require.Len(t, p.Paths, 1)
	require.EqualValues(t, 40, p.Paths[0].Window) // 10 pages/round · 4
	require.Equal(t, append(span(2100, 1, 40), span(2000, 1, 100)...), p.Order)
	assert.Equal(t, 102, p.Recorded)
	assert.Equal(t, 38, p.Predicted)
	assert.Equal(t, 100, p.Demoted)
}

func TestStridedPathWindowSteps(t *testing.T) {
	// A column walk: every 16th page, 10 pages a round for 8 rounds, in
	// bitmap order. The path's stride is 16, and so is its window's.
	p := Build(traj(span(5000, 16, 80), 10), 1<<16, lrOnly())
	require.Len(t, p.Paths, 1)
	g := p.Paths[0]
	assert.EqualValues(t, 16, g.Stride)
	assert.InDelta(t, 160, g.B, 1e-9)
	assert.EqualValues(t, 40, g.Window) // 10 of its pages a round · 4
	assert.Equal(t, span(5000+16*80, 16, 40), p.Order[:40])
	// The same pages with every other step doubled are not a regular walk.
	var irregular []uint64
	q := uint64(5000)
	for i := range 80 {
		irregular = append(irregular, q)
		q += uint64(8 + 8*(i%2))
	}
	assert.Empty(t, Build(traj(irregular, 10), 1<<16, lrOnly()).Paths)
}

func TestPeriodicScanComesBack(t *testing.T) {
	// A scan wraps around its buffer 1000..1199, 20 pages a round: rounds
	// 0..9 cover it, rounds 10..14 cover 1000..1099 again. Page 5000 was
	// written once, in round 0. The live path's window (1100..1179) leads;
	// 1180..1199 follow (last written in round 9); then the pages the scan
	// walked past twice, 10 rounds apart: it comes back to 1000 first, 6
	// rounds from now, so they score 2^(−6/4) down to 2^(−10/4), above the
	// stale page 5000 (2^(−14/4)); passed once, they would have gone last.
	// The first sweep ended at 1199 long ago: its short window, at 0, last.
	var acc []trace.Access
	for r := range uint32(15) {
		base := 1000 + 20*uint64(r%10)
		for k := range uint64(20) {
			acc = append(acc, trace.Access{Round: r, PFN: base + k})
		}
		if r == 0 {
			acc = append(acc, trace.Access{Round: 0, PFN: 5000})
		}
	}
	p := Build(acc, 1<<16, lrOnly())
	require.Len(t, p.Paths, 2)
	assert.True(t, p.Paths[0].Live)
	assert.False(t, p.Paths[1].Live)
	want := append(span(1100, 1, 80), span(1180, 1, 20)...)
	want = append(want, span(1000, 1, 100)...)
	want = append(want, 5000)
	want = append(want, span(1200, 1, 32)...) // the dead first sweep's window
	require.Equal(t, want, p.Order)
	assert.Equal(t, 100, p.Demoted)

	// With a window of 64 rounds (1280 pages) the walker would run far
	// past its buffer; being periodic, its window stops at 1199, where the
	// recorded pages ahead of it end, and the wrapped pages follow.
	o := lrOnly()
	o.WindowRounds = 64
	p = Build(acc, 1<<16, o)
	require.True(t, p.Paths[0].Live)
	assert.EqualValues(t, 100, p.Paths[0].Window)
	want = append(span(1100, 1, 100), span(1000, 1, 100)...)
	require.Equal(t, want, p.Order[:200])
}

func TestDeadPathWindowLast(t *testing.T) {
	// A scan of 1000..1199 in rounds 0..9 (bitmap order), then ten rounds
	// of one busy page: the scan stopped long before recording did. Its
	// window is cut to MinWindowPages and scores 0, after the recorded
	// pages, which a dead path does not demote.
	var acc []trace.Access
	for r := range uint32(10) {
		for k := range uint64(20) {
			acc = append(acc, trace.Access{Round: r, PFN: 1000 + 20*uint64(r) + k})
		}
	}
	for r := uint32(10); r < 20; r++ {
		acc = append(acc, trace.Access{Round: r, PFN: 50})
	}
	p := Build(acc, 1<<16, lrOnly())
	require.Len(t, p.Paths, 1)
	assert.False(t, p.Paths[0].Live)
	assert.Zero(t, p.Demoted)
	require.Len(t, p.Order, 1+200+32)
	assert.EqualValues(t, 50, p.Order[0], "the busy page first")
	// The scan's pages by recency: the last round's first.
	assert.Equal(t, span(1180, 1, 20), p.Order[1:21])
	assert.Equal(t, span(1200, 1, 32), p.Order[201:])
}

// zipfRounds makes a bitmap-ordered trajectory of a key-value store: rounds
// of perRound random writes over a working set of ws pages at base, Zipf
// distributed, each round sorted and deduplicated.
func zipfRounds(rng *rand.Rand, rounds, perRound int, base, ws uint64) []trace.Access {
	z := rand.NewZipf(rng, 1.01, 1, ws-1)
	var acc []trace.Access
	for r := range rounds {
		var pf []uint64
		for range perRound {
			pf = append(pf, base+z.Uint64())
		}
		slices.Sort(pf)
		for _, q := range slices.Compact(pf) {
			acc = append(acc, trace.Access{Round: uint32(r), PFN: q})
		}
	}
	return acc
}

func TestBitmapRandomRoundsHaveNoPath(t *testing.T) {
	// A dense random round in bitmap order is one long ascending run: an
	// access-level fit takes it for a scan. Across rounds such runs
	// overlap instead of following each other, so nothing is accepted.
	rng := rand.New(rand.NewPCG(3, 3))
	acc := zipfRounds(rng, 50, 3000, 20480, 16384)
	require.True(t, bitmapOrdered(acc))
	p := Build(acc, 1<<16, DefaultOptions())
	assert.Empty(t, p.Paths)
	assert.Zero(t, p.Predicted)
	assert.Zero(t, p.Demoted)
	// Sparse noise, a few hundred random pages a round, at the densities
	// of a lab guest and of a large one.
	for _, npages := range []uint64{1 << 14, 1 << 16, 1 << 20} {
		var acc []trace.Access
		for r := range uint32(50) {
			var pf []uint64
			for range 300 {
				pf = append(pf, rng.Uint64N(npages))
			}
			slices.Sort(pf)
			for _, q := range slices.Compact(pf) {
				acc = append(acc, trace.Access{Round: r, PFN: q})
			}
		}
		p := Build(acc, npages, lrOnly())
		assert.Empty(t, p.Paths, "npages %d", npages)
	}
}

func TestRecordedHotAndRecentFirst(t *testing.T) {
	// Rounds 0..2 (time order): 5,3,5 | 9,3,1 | 9. Scores with the
	// half-life of 4 rounds, age from round 2: 9 = 2^(−1/4)+1 = 1.84,
	// 3 = 2^(−2/4)+2^(−1/4) = 1.55, 5 = 2·2^(−2/4) = 1.41, 1 = 0.84.
	acc := traj([]uint64{5, 3, 5, 9, 3, 1, 9, 70}, 3)
	p := Build(acc, 64, Options{}) // neither predictor
	assert.Equal(t, []uint64{9, 3, 5, 1}, p.Order)
	assert.Equal(t, 4, p.Recorded)
	assert.Equal(t, 1, p.Dropped, "pfn 70 is beyond 64 pages")
	assert.Empty(t, Build(acc, 0, DefaultOptions()).Order)

	// Equal scores keep first-touch order.
	assert.Equal(t, []uint64{7, 2, 4}, Build(traj([]uint64{7, 2, 4}, 3), 64, Options{}).Order)

	// A job that wrote its 4 pages in rounds 0..9 and one that has written
	// its own in rounds 10..14: the running job first (3.64 against 2.18),
	// although the finished one has twice the records.
	var jobs []trace.Access
	for r := range uint32(15) {
		base := uint64(100)
		if r >= 10 {
			base = 200
		}
		for k := range uint64(4) {
			jobs = append(jobs, trace.Access{Round: r, PFN: base + k})
		}
	}
	p = Build(jobs, 1024, Options{})
	assert.Equal(t, []uint64{200, 201, 202, 203, 100, 101, 102, 103}, p.Order)
}

func TestAdvanceMovesPassedWindowPagesLast(t *testing.T) {
	// A bitmap-ordered scan reached 1999; while the plan was built it went
	// on to 2049 (one more round). Those 50 window pages go to the end; the
	// window from 2050 now leads.
	p := Build(traj(span(1000, 1, 1000), 50), 1<<16, lrOnly())
	require.Equal(t, span(2000, 1, 200), p.Order[:200])
	n := len(p.Order)
	moved := p.Advance(span(2000, 1, 50), lrOnly())
	assert.Equal(t, 50, moved)
	require.Len(t, p.Order, n)
	assert.Equal(t, span(2050, 1, 150), p.Order[:150])
	assert.Equal(t, span(2000, 1, 50), p.Order[n-50:])
	assert.EqualValues(t, 2049, p.Paths[0].LastPFN)
	checkPlan(t, p, 1<<16)
	// Writes elsewhere move nothing.
	assert.Zero(t, p.Advance([]uint64{7, 9000}, lrOnly()))
}

func TestBitmapOrderedTolerance(t *testing.T) {
	// Two ascending passes in a round (a scan that restarted) still read
	// as a bitmap; genuine time order does not.
	twoPass := []trace.Access{{Round: 0, PFN: 5}, {Round: 0, PFN: 9}, {Round: 0, PFN: 2}, {Round: 0, PFN: 9},
		{Round: 1, PFN: 1}, {Round: 1, PFN: 3}}
	assert.True(t, bitmapOrdered(twoPass))
	want := []trace.Access{{Round: 0, PFN: 2}, {Round: 0, PFN: 5}, {Round: 0, PFN: 9}, {Round: 1, PFN: 1}, {Round: 1, PFN: 3}}
	assert.Equal(t, want, sortRounds(twoPass))
	assert.False(t, bitmapOrdered(traj([]uint64{5, 3, 8, 1, 9, 2, 7, 4}, 4)))
	assert.False(t, bitmapOrdered(traj([]uint64{5, 3, 8}, 1)), "one page per round carries its own order")
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
	// The order merges page scores (half-life 4 rounds, age from round 8):
	// a process that wrote its pages in its c last-but rounds scores
	// Σ 2^(−age/4): 4.96 (7000, c=9), 3.12 (15000), 2.42 (11000), 1.82
	// (3000), 1.32 (9000), …; a neighbourhood page scores half its busy
	// pfn, a hotspot margin page a quarter of the hotspot's best.
	// The busiest region's pfns all tie, so its first neighbourhood is
	// centred on its lowest pfn 7000 (h = 16), walked outward both ways,
	// skipping the recorded even pages; then 7018 opens the next.
	nb7000 := []uint64{7001, 6999, 6998, 7003, 6997, 6996, 7005, 6995, 6994, 7007, 6993, 6992,
		7009, 6991, 6990, 7011, 6989, 6988, 7013, 6987, 6986, 7015, 6985, 6984,
		7019, 7017, 7021, 7023, 7025, 7027, 7029, 7031, 7032, 7033, 7034}
	var want []uint64
	want = append(want, span(7000, 2, 16)...)  // 4.96
	want = append(want, span(15000, 2, 16)...) // 3.12
	want = append(want, nb7000...)             // 2.48
	want = append(want, span(11000, 2, 16)...) // 2.42
	want = append(want, span(3000, 2, 16)...)  // 1.82
	for _, q := range nb7000 {                 // 1.56
		want = append(want, q+8000)
	}
	want = append(want, span(9000, 2, 16)...) // 1.32
	want = append(want, span(7035, 1, 12)...) // 1.24: 7000's margin up to End+h
	require.Equal(t, want, p.Order[:len(want)])
	// Each region adds 35 neighbourhood and 12 margin pages.
	assert.Equal(t, len(bases)*47, p.Hotspot)
	checkPlan(t, p, 1<<16)
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
	assert.InDelta(t, 50*math.Exp2(-5.0/4), p.Hotspots[1].Score, 1e-9)
}

func TestBuildCombinedStages(t *testing.T) {
	// A scan of 10000..10499 plus a busy small region (200..235, every 5th
	// page, each written about 1.3 times a round), in time order.
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
	require.Len(t, p.Hotspots, 2)
	n := len(p.Order)
	// First the busy region's pages (score ≈ 8), then its hotspot: 28
	// holes and 32 margin pages (half or a quarter of that), then the scan
	// window (score 1 and falling). The swept scan pages come last.
	assert.ElementsMatch(t, span(200, 5, 8), p.Order[:8])
	hole := slices.Index(p.Order, 201)
	assert.True(t, hole >= 8 && hole < 68, "region hole at %d", hole)
	assert.EqualValues(t, 10500, p.Order[68])
	assert.Equal(t, span(10000, 1, 500), p.Order[n-500:])
	assert.Equal(t, 500, p.Demoted)
	// The scan's own hotspot adds its lower margin, at half the score of
	// its oldest page: among the far window pages.
	assert.Greater(t, slices.Index(p.Order, 9999), slices.Index(p.Order, 10600))
	assert.Equal(t, 508, p.Recorded)
	assert.Equal(t, 3200, p.Predicted) // 50 pages a round · 64 rounds
	assert.Equal(t, 60+16, p.Hotspot)
	checkPlan(t, p, 1<<16)
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
