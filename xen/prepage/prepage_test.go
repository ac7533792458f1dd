package prepage

import (
	"math/rand"
	"testing"

	"github.com/stretchr/testify/require"
)

// event is one row of a fault table: either a fault at pfn, or a request
// for the next n pushed pages.
type event struct {
	fault int64 // -1: none
	next  int
}

func f(pfn int64) event { return event{fault: pfn} }
func n(k int) event     { return event{fault: -1, next: k} }

// presend lists the pfns lo..hi (already pushed, in flight).
func presend(lo, hi uint64) []uint64 {
	var out []uint64
	for p := lo; p <= hi; p++ {
		out = append(out, p)
	}
	return out
}

func run(t *testing.T, name string, npages uint64, presend []uint64, opt Options, evs ...event) []uint64 {
	t.Helper()
	p, err := New(name, npages, opt)
	require.NoError(t, err)
	for _, x := range presend {
		p.Sent(x)
	}
	var out []uint64
	for _, e := range evs {
		if e.fault >= 0 {
			p.Fault(uint64(e.fault))
		}
		for i := 0; i < e.next; i++ {
			pfn, ok := p.Next()
			if !ok {
				break
			}
			out = append(out, pfn)
		}
	}
	return out
}

func TestPolicyOrders(t *testing.T) {
	cases := []struct {
		name    string
		policy  string
		npages  uint64
		presend []uint64
		opt     Options
		evs     []event
		want    []uint64
	}{
		{"none scans", "none", 8, []uint64{2}, Options{}, []event{f(5), n(4)}, []uint64{0, 1, 3, 4}},
		{"forward after pivot", "forward", 16, nil, Options{}, []event{n(2), f(10), n(4)}, []uint64{0, 1, 11, 12, 13, 14}},
		{"forward skips sent, falls back to scan at the end", "forward", 8, []uint64{6}, Options{}, []event{f(5), n(4)}, []uint64{7, 0, 1, 2}},
		{"dual alternates", "dual", 16, nil, Options{}, []event{f(8), n(5)}, []uint64{9, 7, 10, 6, 11}},
		{"dual near the edge hands turns to the other side", "dual", 10, nil, Options{}, []event{f(8), n(5)}, []uint64{9, 7, 6, 5, 4}},
		{"dual skips sent pages", "dual", 16, []uint64{9, 7}, Options{}, []event{f(8), n(4)}, []uint64{10, 6, 11, 5}},
		{"new fault moves the pivot", "dual", 32, nil, Options{}, []event{f(8), n(2), f(20), n(3)}, []uint64{9, 7, 21, 19, 22}},
		{"multi interleaves newest first", "multi", 64, nil, Options{Pivots: 2}, []event{f(10), f(40), n(6)}, []uint64{41, 11, 39, 9, 42, 12}},
		{"multi drops the oldest pivot", "multi", 64, nil, Options{Pivots: 2}, []event{f(10), f(30), f(50), n(4)}, []uint64{51, 31, 49, 29}},
		{"priority first, then bubble/scan", "dual", 16, nil, Options{Priority: []uint64{5, 3, 5, 9}}, []event{n(5)}, []uint64{5, 3, 9, 0, 1}},
		// 4 is within FaultBurst/2 of 6: the plan covers that area.
		{"fault near the plan interleaves bubble with priority", "dual", 32, nil, Options{Priority: []uint64{1, 2, 3, 4}, FaultBurst: 4}, []event{f(6), n(6)}, []uint64{7, 1, 5, 2, 3, 4}},
		// Nothing listed near 20: the bubble alone for BlindBurst pages.
		{"blind fault gives the bubble the link", "dual", 32, nil, Options{Priority: []uint64{1, 2, 3, 4}, FaultBurst: 4, BlindBurst: 3}, []event{f(20), n(6)}, []uint64{21, 19, 22, 1, 2, 3}},
		// 20 was pushed already (in flight): the plan had it, no burst.
		{"fault on an in-flight page keeps the list going", "dual", 32, []uint64{20}, Options{Priority: []uint64{1, 2, 3, 4}, FaultBurst: 4}, []event{f(20), n(6)}, []uint64{1, 2, 3, 4, 0, 5}},
		// 14: a burst (dual). 20 is one step above 14: not yet a walk (a
		// guest accessing the listed region at random steps up like this
		// on every fifth fault), so 20 gets a dual burst too and the
		// listed pages below it stay listed.
		{"one step up is not a walk", "dual", 64, nil,
			Options{Priority: []uint64{10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26}, FaultBurst: 4},
			[]event{f(14), n(4), f(20), n(6)}, []uint64{15, 10, 13, 11, 21, 12, 19, 14, 16, 17}},
		// 30, 42, 54: each at most 4·FaultBurst above the last, none near
		// the plan. The third makes a walk: its bubble goes forward only
		// (dual would give 55, 53, 56, ...) and gets the link for a blind
		// burst, doubled because the walk goes on from a blind fault.
		{"three faults stepping up make a walk: forward bubble", "dual", 128, nil,
			Options{Priority: []uint64{1, 2, 3, 4}, FaultBurst: 4},
			[]event{f(30), f(42), f(54), n(5)}, []uint64{55, 56, 57, 58, 59}},
		// 60 is blind: its dual bubble gets BlindBurst = 16 pages, 61..68
		// and 59..52. The guest then faults on 69, the next page that
		// bubble would have sent: it consumed the bubble as fast as it
		// came, so the next blind burst is 32 pages before the list goes
		// on. (60 comes back on the way down because run, unlike the
		// engine, does not mark faulted pages sent.)
		{"a blind fault at the blind bubble's edge doubles the burst", "dual", 128, nil,
			Options{Priority: []uint64{1, 2, 3, 4}, FaultBurst: 4},
			[]event{f(60), n(16), f(69), n(34)}, []uint64{
				61, 59, 62, 58, 63, 57, 64, 56, 65, 55, 66, 54, 67, 53, 68, 52,
				70, 60, 71, 51, 72, 50, 73, 49, 74, 48, 75, 47, 76, 46, 77, 45,
				78, 44, 79, 43, 80, 42, 81, 41, 82, 40, 83, 39, 84, 38, 85, 37,
				1, 2}},
		// 90 is blind too but far from the bubble around 60: a burst of
		// the usual 16 pages, then the list.
		{"a blind fault away from the blind bubble's edge keeps the burst", "dual", 128, nil,
			Options{Priority: []uint64{1, 2, 3, 4}, FaultBurst: 4},
			[]event{f(60), n(16), f(90), n(18)}, []uint64{
				61, 59, 62, 58, 63, 57, 64, 56, 65, 55, 66, 54, 67, 53, 68, 52,
				91, 89, 92, 88, 93, 87, 94, 86, 95, 85, 96, 84, 97, 83, 98, 82,
				1, 2}},
		// 20..35 are in flight. Faults on 22, 26, 30, 34 step up by at most
		// 2·FaultBurst four times in a row: the guest is right behind the
		// push front, and a forward bubble from 34 moves the front ahead
		// of it (36, 37, ...) instead of the list (100, ...).
		{"in-flight faults walking up move the push front", "dual", 128, presend(20, 35),
			Options{Priority: []uint64{100, 101, 102, 103, 104}, FaultBurst: 4},
			[]event{f(22), f(26), f(30), f(34), n(4)}, []uint64{36, 37, 38, 39}},
		// The same in-flight pages faulted out of order: no walk, the list
		// goes on.
		{"in-flight faults out of order keep the list going", "dual", 128, presend(20, 35),
			Options{Priority: []uint64{100, 101, 102, 103, 104}, FaultBurst: 4},
			[]event{f(30), f(22), f(26), f(34), n(4)}, []uint64{100, 101, 102, 103}},
		{"a later fault on an unsent page still bursts", "dual", 32, []uint64{20}, Options{Priority: []uint64{1, 2, 3, 4}, FaultBurst: 4}, []event{f(20), n(1), f(6), n(4)}, []uint64{1, 7, 2, 5, 3}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := run(t, c.policy, c.npages, c.presend, c.opt, c.evs...)
			require.Equal(t, c.want, got)
		})
	}
}

// Every policy, under any fault sequence, returns each unsent page exactly
// once and nothing else: the "every page crosses the wire once" property.
func TestEveryPageOnce(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for _, name := range Names {
		for trial := 0; trial < 20; trial++ {
			npages := uint64(1 + rng.Intn(700))
			var prio []uint64
			if trial%2 == 1 {
				for i := 0; i < 50; i++ {
					prio = append(prio, uint64(rng.Int63n(int64(npages))))
				}
			}
			p, err := New(name, npages, Options{Pivots: 3, Priority: prio, FaultBurst: 8})
			require.NoError(t, err)
			seen := map[uint64]bool{}
			for i := uint64(0); i < npages; i++ {
				if rng.Intn(5) == 0 {
					p.Sent(i)
					seen[i] = true
				}
			}
			// Some pages sent already are written again and must go once
			// more (the policy learns it from Unsent alone).
			again := map[uint64]bool{}
			for x := range seen {
				if rng.Intn(3) == 0 {
					p.Unsent(x)
					delete(seen, x)
					again[x] = true
				}
			}
			for {
				if rng.Intn(4) == 0 {
					pfn := uint64(rng.Int63n(int64(npages)))
					p.Fault(pfn)
					// The engine sends a faulted page directly and says so.
					if !seen[pfn] {
						p.Sent(pfn)
						seen[pfn] = true
					}
				}
				pfn, ok := p.Next()
				if !ok {
					break
				}
				require.Less(t, pfn, npages)
				require.False(t, seen[pfn], "%s: pfn %d returned twice", name, pfn)
				seen[pfn] = true
			}
			require.Len(t, seen, int(npages), name)
			for x := range again {
				require.True(t, seen[x], "%s: pfn %d unsent and never sent again", name, x)
			}
		}
	}
}

func TestUnknownPolicy(t *testing.T) {
	_, err := New("bogus", 4, Options{})
	require.ErrorContains(t, err, "unknown pre-paging policy")
	_, err = New("dual", 4, Options{Priority: []uint64{9}})
	require.ErrorContains(t, err, "beyond")
}

func TestBitmapScans(t *testing.T) {
	b := NewBitmap(200)
	for i := uint64(0); i < 200; i++ {
		if i != 3 && i != 64 && i != 130 && i != 199 {
			b.Set(i)
		}
	}
	next := func(from uint64) int64 {
		p, ok := b.NextClear(from)
		if !ok {
			return -1
		}
		return int64(p)
	}
	prev := func(from uint64) int64 {
		p, ok := b.PrevClear(from)
		if !ok {
			return -1
		}
		return int64(p)
	}
	require.Equal(t, int64(3), next(0))
	require.Equal(t, int64(64), next(4))
	require.Equal(t, int64(130), next(65))
	require.Equal(t, int64(199), next(131))
	require.Equal(t, int64(-1), next(200))
	require.Equal(t, int64(130), prev(198))
	require.Equal(t, int64(64), prev(129))
	require.Equal(t, int64(3), prev(63))
	require.Equal(t, int64(-1), prev(2))
	require.Equal(t, uint64(196), b.Count())
	b.Set(199)
	require.Equal(t, int64(-1), next(131))
}

func BenchmarkDualWithFaults(b *testing.B) {
	const npages = 1 << 18
	rng := rand.New(rand.NewSource(2))
	for i := 0; i < b.N; i++ {
		p, _ := New("multi", npages, Options{})
		for k := 0; ; k++ {
			if k%64 == 0 {
				p.Fault(uint64(rng.Intn(npages)))
			}
			if _, ok := p.Next(); !ok {
				break
			}
		}
	}
}
