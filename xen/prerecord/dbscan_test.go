package prerecord

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestISSDBSCANTable(t *testing.T) {
	cases := []struct {
		name   string
		pfns   []uint64
		eps    uint64
		minPts int
		want   []Cluster
	}{
		{name: "empty", eps: 2, minPts: 2},
		{
			name: "two groups and noise", eps: 2, minPts: 3,
			// 10,11,12 core; 30 noise; 50,50,51,53 core-ish; 90 noise.
			pfns: []uint64{10, 11, 12, 30, 50, 50, 51, 53, 90},
			want: []Cluster{
				{Lo: 0, Hi: 3, Start: 10, End: 12, Cores: 3},
				{Lo: 4, Hi: 8, Start: 50, End: 53, Cores: 3}, // 53 has only 51,53 within 2: border
			},
		},
		{
			name: "multiplicity makes a core", eps: 0, minPts: 3,
			pfns: []uint64{5, 5, 5, 6, 7, 7},
			want: []Cluster{{Lo: 0, Hi: 3, Start: 5, End: 5, Cores: 3}},
		},
		{
			name: "chain of cores is one cluster", eps: 3, minPts: 2,
			pfns: []uint64{0, 3, 6, 9, 12, 20},
			want: []Cluster{{Lo: 0, Hi: 5, Start: 0, End: 12, Cores: 5}},
		},
		{
			// Blocks 8..14 and 20..26 (eps 4, minPts 6): cores 9..14 and
			// 20..25, 6 apart, so two clusters. 17 sees only 5 records: a
			// border point 3 from both, so it joins the lower.
			name: "border point equidistant from two clusters joins the lower", eps: 4, minPts: 6,
			pfns: []uint64{8, 9, 10, 11, 12, 13, 14, 17, 20, 21, 22, 23, 24, 25, 26},
			want: []Cluster{
				{Lo: 0, Hi: 8, Start: 8, End: 17, Cores: 6},
				{Lo: 8, Hi: 15, Start: 20, End: 26, Cores: 6},
			},
		},
		{
			// As above with 18: 4 from 14 but 2 from 20, so it joins the upper.
			name: "border point between two clusters joins the nearer", eps: 4, minPts: 6,
			pfns: []uint64{8, 9, 10, 11, 12, 13, 14, 18, 20, 21, 22, 23, 24, 25, 26},
			want: []Cluster{
				{Lo: 0, Hi: 7, Start: 8, End: 14, Cores: 6},
				{Lo: 7, Hi: 15, Start: 18, End: 26, Cores: 6},
			},
		},
		{
			name: "minPts 1 makes every point a core", eps: 1, minPts: 1,
			pfns: []uint64{1, 5, 6, 10},
			want: []Cluster{
				{Lo: 0, Hi: 1, Start: 1, End: 1, Cores: 1},
				{Lo: 1, Hi: 3, Start: 5, End: 6, Cores: 2},
				{Lo: 3, Hi: 4, Start: 10, End: 10, Cores: 1},
			},
		},
		{
			name: "top of the pfn space does not overflow", eps: 5, minPts: 2,
			pfns: []uint64{1<<64 - 3, 1<<64 - 1},
			want: []Cluster{{Lo: 0, Hi: 2, Start: 1<<64 - 3, End: 1<<64 - 1, Cores: 2}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := ISSDBSCAN(tc.pfns, tc.eps, tc.minPts)
			if len(tc.want) == 0 {
				assert.Empty(t, got)
				return
			}
			assert.Equal(t, tc.want, got)
		})
	}
}

// bruteDBSCAN labels each record by the textbook definition, O(n²): cores
// by counting, clusters as connected components of cores at most eps
// apart, each non-core within eps of a core joining the nearest core's
// cluster (the lower on a tie). −1 is noise.
func bruteDBSCAN(p []uint64, eps uint64, minPts int) []int {
	n := len(p)
	dist := func(i, j int) uint64 {
		if p[i] > p[j] {
			return p[i] - p[j]
		}
		return p[j] - p[i]
	}
	core := make([]bool, n)
	for i := range n {
		c := 0
		for j := range n {
			if dist(i, j) <= eps {
				c++
			}
		}
		core[i] = c >= minPts
	}
	label := make([]int, n)
	for i := range label {
		label[i] = -1
	}
	next := 0
	for i := range n {
		if !core[i] || label[i] >= 0 {
			continue
		}
		stack := []int{i}
		label[i] = next
		for len(stack) > 0 {
			x := stack[len(stack)-1]
			stack = stack[:len(stack)-1]
			for j := range n {
				if core[j] && label[j] < 0 && dist(x, j) <= eps {
					label[j] = next
					stack = append(stack, j)
				}
			}
		}
		next++
	}
	for i := range n {
		if core[i] {
			continue
		}
		best := -1
		for j := range n {
			if !core[j] || dist(i, j) > eps {
				continue
			}
			if best < 0 || dist(i, j) < dist(i, best) || (dist(i, j) == dist(i, best) && p[j] < p[best]) {
				best = j
			}
		}
		if best >= 0 {
			label[i] = label[best]
		}
	}
	return label
}

func TestISSDBSCANMatchesBruteForce(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for iter := range 300 {
		n := rng.IntN(120)
		space := uint64(1 + rng.IntN(400))
		p := make([]uint64, n)
		for i := range p {
			p[i] = rng.Uint64N(space)
		}
		slices.Sort(p)
		eps := uint64(rng.IntN(6))
		minPts := 1 + rng.IntN(6)
		want := bruteDBSCAN(p, eps, minPts)
		got := make([]int, n)
		for i := range got {
			got[i] = -1
		}
		for k, c := range ISSDBSCAN(p, eps, minPts) {
			require.Equal(t, p[c.Lo], c.Start)
			require.Equal(t, p[c.Hi-1], c.End)
			for i := c.Lo; i < c.Hi; i++ {
				got[i] = k
			}
		}
		// Brute-force labels are numbered in ascending order of their
		// first core, as ISSDBSCAN's clusters are.
		require.Equal(t, want, got, "iter %d eps %d minPts %d pfns %v", iter, eps, minPts, p)
	}
}
