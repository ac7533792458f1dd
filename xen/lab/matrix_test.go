package lab

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// The record tap finds record boundaries in bytes cut anywhere.
func TestRecTapFollowsRecords(t *testing.T) {
	var buf bytes.Buffer
	require.NoError(t, wire.WriteHeader(&buf, wire.ChannelBulk))
	w := wire.NewWriter(&buf)
	require.NoError(t, w.WriteBlob(wire.TypeCoreState, bytes.Repeat([]byte{7}, 13)))
	require.NoError(t, w.WriteBlob(wire.TypeError, []byte("x")))
	require.NoError(t, w.WriteBlob(wire.TypeCoreState, nil))
	require.NoError(t, w.Flush())
	want := []wire.Type{wire.TypeCoreState, wire.TypeError, wire.TypeCoreState}
	for _, cut := range []int{1, 3, 8, 17, 1 << 20} {
		p := newRecTap()
		var got []wire.Type
		b := buf.Bytes()
		for len(b) > 0 {
			n := min(cut, len(b))
			p.feed(b[:n], func(t wire.Type) { got = append(got, t) })
			b = b[n:]
		}
		require.Equal(t, want, got, "cut %d", cut)
	}
}

func TestParseFaultPoints(t *testing.T) {
	all, err := ParseFaultPoints("all")
	require.NoError(t, err)
	require.Equal(t, FaultPoints, all)
	ps, err := ParseFaultPoints("setup,mid-push")
	require.NoError(t, err)
	require.Equal(t, []FaultPoint{AtSetup, AtMidPushByte}, ps)
	_, err = ParseFaultPoints("setup,nowhere")
	require.ErrorContains(t, err, `fault point "nowhere"`)
}

// Every protocol point once:
// a reset before GO leaves the guest running at the source only, a reset
// from GO on is recovered, verified, nothing placed twice or wrong. With
// recovery off, the same resets after GO are counted as not recovered:
// the matrix sees what it measures.
func TestFaultMatrixEveryPoint(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	logRun := func(p FaultPoint, run int, o RunOutcome) {
		t.Logf("%s: reached %v exactly-once %v recovered %v ran-on %v recoveries %d paused %.1f ms err %v",
			p, o.Reached, o.ExactlyOnce, o.Recovered, o.RanOn, o.Recoveries, o.PausedMs, o.Err)
	}
	// Post-copy for every point but the pre-copy round (a hybrid
	// migration may have no demand fault at all: its pre-copy sent the
	// working set).
	var pc []FaultPoint
	for _, p := range FaultPoints {
		if p != AtPrecopy {
			pc = append(pc, p)
		}
	}
	rows, err := RunMatrix(ctx, MatrixConfig{Domain: smallDomain("zipf"), Mode: wire.ModePostcopy, Points: pc, Runs: 1, Progress: logRun})
	require.NoError(t, err)
	hy, err := RunMatrix(ctx, MatrixConfig{Domain: smallDomain("zipf"), Mode: wire.ModeHybrid, Points: []FaultPoint{AtPrecopy}, Runs: 1, Progress: logRun})
	require.NoError(t, err)
	rows = append(rows, hy...)
	var out bytes.Buffer
	require.NoError(t, WriteMatrix(&out, rows))
	t.Log("\n" + out.String())
	for _, r := range rows {
		require.Zero(t, r.NotReached, "%s: the run passed the point without a reset (the test shows nothing)", r.Point)
		require.Zero(t, r.Failed, "%s: %s", r.Point, r.FirstFailure)
		require.Equal(t, 1, r.ExactlyOnce, r.Point)
		switch r.Point.Demand() {
		case DemandRecovered:
			require.Equal(t, 1, r.Recovered, r.Point)
		case DemandRanOn:
			require.Equal(t, 1, r.RanOn, r.Point)
		default:
			require.Equal(t, 1, r.Recovered+r.RanOn, r.Point)
		}
	}

	rows, err = RunMatrix(ctx, MatrixConfig{Domain: smallDomain("zipf"), Mode: wire.ModeHybrid, Points: []FaultPoint{AtGo, AtSetup}, Runs: 1, NoRecovery: true})
	require.NoError(t, err)
	require.Equal(t, 1, rows[0].Failed, "without recovery a reset right after GO is not recovered")
	require.Zero(t, rows[0].Recovered)
	require.Zero(t, rows[1].Failed, "before GO nothing changes without recovery")
}

// A reset after SWITCHOVER and before GO (the destination's READY lost in
// it): the source resumes its copy and says so on a new link, so the
// destination, which waits for the source after a break there, removes
// its copy at once instead of when its recovery time is over. (A reset at
// SWITCHOVER itself may race the destination's READY, which then starts
// a GO: that run recovers instead, which is right but not this test.)
func TestResetBeforeGoEndsTheWaitingDestination(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	res, err := Run(ctx, RunConfig{Domain: smallDomain("zipf"),
		Engine: engine.Options{Mode: wire.ModePostcopy, Prepaging: "dual", BatchPages: 16, ProgressTimeout: 10 * time.Second},
		Warmup: 200 * time.Millisecond, After: 100 * time.Millisecond, Recover: 30 * time.Second, ResetAt: []FaultPoint{AtReady}})
	require.Error(t, err)
	require.Equal(t, 1, res.Resets)
	require.Equal(t, engine.RunsAtSource, res.Where)
	require.True(t, res.SourceRuns)
	require.False(t, res.DestRuns)
	require.ErrorContains(t, err, "the source resumed its copy")
	require.Less(t, time.Since(start), 25*time.Second, "the destination did not wait out its 35 s")
}

// A silent link (no FIN, no RST) after GO: an outage of 2 s passes
// unnoticed, one longer than the link timeout is noticed by the source
// while the link is still down — by the silence, not by the end of the
// outage — and recovered once it is back, with the guest verified.
func TestOutageNoticedBySilence(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	run := func(outage time.Duration) (*Result, error) {
		return Run(ctx, RunConfig{Domain: smallDomain("zipf"),
			Engine: engine.Options{Mode: wire.ModePostcopy, Prepaging: "dual", BatchPages: 16, ProgressTimeout: 10 * time.Second, LinkTimeout: 4 * time.Second},
			Warmup: 200 * time.Millisecond, After: 100 * time.Millisecond, Recover: 40 * time.Second,
			ResetAt: []FaultPoint{AtFaultReply}, Outage: outage})
	}
	res, err := run(1 * time.Second)
	require.NoError(t, err)
	require.Equal(t, 1, res.Resets, "the outage did not happen: the test shows nothing")
	require.Zero(t, res.Stats.Recoveries, "a 1 s outage is not a broken link")
	require.Zero(t, res.DetectedAfter)
	require.True(t, res.Stats.Verified)

	const outage = 15 * time.Second
	res, err = run(outage)
	require.NoError(t, err)
	require.Equal(t, 1, res.Resets)
	require.Equal(t, 1, res.Stats.Recoveries)
	require.True(t, res.Stats.Verified)
	require.True(t, res.Continued)
	require.Positive(t, res.DetectedAfter, "the source noticed only once the link was back")
	require.Less(t, res.DetectedAfter, outage)
	require.GreaterOrEqual(t, res.DetectedAfter, 4*time.Second, "noticed before the link timeout")
	t.Logf("15 s outage noticed after %v, paused %.1f ms", res.DetectedAfter, res.Stats.PostcopyPausedMs)
}
