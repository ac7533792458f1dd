package link

import (
	"fmt"
	"testing"
	"time"
)

// BenchmarkShaping measures a 64 MiB transfer at 1 gbit for several tbf
// bursts, queue bounds and congestion controls; it is how the defaults in
// defaultShaping were chosen. Run with
//
//	go test -run '^$' -bench Shaping -benchtime 1x ./xen/link
func BenchmarkShaping(b *testing.B) {
	if !hasNetAdmin() {
		b.Skip("needs root (CAP_NET_ADMIN) to create network namespaces")
	}
	const rate = 1_000_000_000
	for _, cc := range []string{"bbr", "cubic"} {
		for _, burst := range []uint64{64 << 10, 128 << 10, 256 << 10, 512 << 10} {
			for _, lat := range []time.Duration{time.Millisecond, 2 * time.Millisecond, 5 * time.Millisecond} {
				name := fmt.Sprintf("cc=%s/burst=%dk/latency=%v", cc, burst>>10, lat)
				b.Run(name, func(b *testing.B) {
					l, err := setup(rate, shaping{burst: burst, latency: lat})
					if err != nil {
						b.Fatal(err)
					}
					defer l.Close()
					var sum float64
					for range b.N {
						sum += transfer(b, l, 64<<20, cc)
					}
					b.ReportMetric(sum/float64(b.N)/rate, "x_rate")
				})
			}
		}
	}
}
