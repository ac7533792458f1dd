package lab

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

func TestMain(m *testing.M) {
	if IsGuest() {
		os.Exit(GuestMain())
	}
	os.Exit(m.Run())
}

func smallDomain(workload string) Config {
	return Config{Name: "t-" + workload, Pages: 4096, Zero: 512, VCPUs: 1,
		Workload: WorkloadSpec{Name: workload, WSPages: 1024, Seed: 1, OpCost: 50}}
}

func TestLabMigrateModes(t *testing.T) {
	for _, mode := range []wire.Mode{wire.ModePostcopy, wire.ModePrecopy, wire.ModeHybrid} {
		for _, wl := range []string{"zipf", "scan"} {
			t.Run(mode.String()+"/"+wl, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				defer cancel()
				res, err := Run(ctx, RunConfig{Domain: smallDomain(wl), Engine: engine.Options{Mode: mode, Prepaging: "dual", MaxRounds: 5},
					Warmup: 200 * time.Millisecond, After: 100 * time.Millisecond})
				require.NoError(t, err)
				st := res.Stats
				require.True(t, st.Verified, "verified")
				require.Equal(t, "memory", st.VerifiedFrom, "verified from the destination's memory")
				require.Zero(t, st.RedundantPages)
				require.Zero(t, st.MismatchedPages)
				require.Zero(t, st.IntegrityErrors, "guest saw a page without its marker")
				require.Equal(t, uint64(512), st.ZeroPages, "pre-copy never re-sends the untouched zero tail")
				require.True(t, res.Continued, "guest progress continues at the destination")
				require.Greater(t, res.OpsAtEnd, res.OpsAtStart)
				if mode == wire.ModePostcopy {
					require.Equal(t, uint64(4096), st.PagesSent, "post-copy sends every page once")
					require.Greater(t, st.WorkingSet, uint64(0))
					require.Greater(t, st.NetworkFaults, uint64(0))
				}
				t.Logf("%s/%s: total %.1f ms downtime %.2f ms faults %d ws %d p50 %.0f us",
					mode, wl, st.TotalTimeMs, st.DowntimeMs, st.NetworkFaults, st.WorkingSet, st.FaultLatencyP50Us)
			})
		}
	}
}

// A recorded trace replays in a lab domain and migrates like any workload.
func TestLabMigrateTraceWorkload(t *testing.T) {
	var pfns []uint64
	for i := uint64(0); i < 600; i++ {
		pfns = append(pfns, 1000+(i*37)%900)
	}
	cfg := smallDomain("trace")
	cfg.Workload.TraceFile = writeTrace(t, 4096, pfns...)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := Run(ctx, RunConfig{Domain: cfg, Engine: engine.Options{Mode: wire.ModePostcopy, Prepaging: "multi"},
		Warmup: 200 * time.Millisecond, After: 100 * time.Millisecond})
	require.NoError(t, err)
	require.True(t, res.Stats.Verified)
	require.True(t, res.Continued)
	require.Zero(t, res.Stats.IntegrityErrors)
	require.LessOrEqual(t, res.Stats.WorkingSet, uint64(900))
}

// A lab domain whose link is reset after GO — once early, and three times
// across the push — recovers: real userfaultfd faults keep waiting while
// the link is down, the new link carries only what the destination
// lacks, and the guest's memory and progress are right at the end.
func TestLabMigrateRecoversResetLinks(t *testing.T) {
	for name, at := range map[string][]uint64{
		"once":        {256 << 10},
		"three-times": {128 << 10, 4 << 20, 9 << 20},
	} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			res, err := Run(ctx, RunConfig{Domain: smallDomain("zipf"),
				Engine: engine.Options{Mode: wire.ModePostcopy, Prepaging: "dual", BatchPages: 16, ProgressTimeout: 10 * time.Second},
				Warmup: 200 * time.Millisecond, After: 100 * time.Millisecond,
				Recover: 20 * time.Second, ResetAfterGo: at})
			require.NoError(t, err)
			st := res.Stats
			require.Equal(t, len(at), res.Resets, "every reset happened (else the test shows nothing)")
			require.Equal(t, len(at), st.Recoveries)
			require.True(t, st.Verified)
			require.Equal(t, "memory", st.VerifiedFrom)
			require.Zero(t, st.RedundantPages)
			require.Zero(t, st.IntegrityErrors)
			require.True(t, res.Continued)
			require.Positive(t, st.PostcopyPausedMs)
			t.Logf("%s: recoveries %d paused %.1f ms lost pages %d resent %d total %.1f ms",
				name, st.Recoveries, st.PostcopyPausedMs, st.LostPages, st.ResentPages, st.TotalTimeMs)
		})
	}
}
