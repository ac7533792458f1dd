package prerecord

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// benchSizes are the record counts the benchmarks compare; the guest grows
// with them (4 pages per record) so the trajectory's shape stays the same
// and only n changes.
var benchSizes = []int{1e4, 1e5, 1e6}

func BenchmarkISSDBSCAN(b *testing.B) {
	for _, n := range benchSizes {
		rng := rand.New(rand.NewPCG(9, uint64(n)))
		acc := randomTrajectory(rng, n, 4*uint64(n))
		p := make([]uint64, 0, n)
		for _, a := range acc {
			p = append(p, a.PFN)
		}
		slices.Sort(p)
		b.Run(fmt.Sprintf("n=%d", n), func(b *testing.B) {
			var clusters int
			for b.Loop() {
				clusters = len(ISSDBSCAN(p, 8, 8))
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/record")
			b.ReportMetric(float64(clusters), "clusters")
		})
	}
}

func BenchmarkBuild(b *testing.B) {
	for _, n := range benchSizes {
		rng := rand.New(rand.NewPCG(9, uint64(n)))
		npages := 4 * uint64(n)
		acc := randomTrajectory(rng, n, npages)
		b.Run(fmt.Sprintf("n=%d", n), func(b *testing.B) {
			var p Plan
			for b.Loop() {
				p = Build(acc, npages, DefaultOptions())
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/record")
			b.ReportMetric(float64(len(p.Paths)), "paths")
			b.ReportMetric(float64(len(p.Hotspots)), "hotspots")
			b.ReportMetric(float64(len(p.Order)), "pages")
		})
	}
}
