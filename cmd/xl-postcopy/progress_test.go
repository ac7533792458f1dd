package main

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

func decodeLines(t *testing.T, b []byte) []progressEvent {
	t.Helper()
	var out []progressEvent
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var ev progressEvent
		require.NoError(t, json.Unmarshal([]byte(l), &ev), l)
		out = append(out, ev)
	}
	return out
}

// --json-progress: QEMU's states for the engine's phases, downtime only
// once known, and a last line that is completed with the figures, or
// failed with where the domain is.
func TestJSONProgressLines(t *testing.T) {
	var buf bytes.Buffer
	jp := newJSONProgress(&buf, wire.ModePostcopy)
	jp.report(engine.Progress{Phase: "setup", Pages: 100, Remaining: 100})
	jp.report(engine.Progress{Phase: "stop", Pages: 100, Remaining: 100})
	jp.report(engine.Progress{Phase: "postcopy", Pages: 100, PagesSent: 60, Remaining: 40, Bytes: 4096 * 60, Faults: 3, Downtime: 1500 * time.Microsecond})
	st := &engine.Stats{Pages: 100, PagesSent: 100, TotalTimeMs: 812.5, DowntimeMs: 1.5, TotalBytes: 409600, NetworkFaults: 4}
	jp.end(st, st, nil)
	evs := decodeLines(t, buf.Bytes())
	require.Len(t, evs, 4)
	require.Equal(t, []string{"setup", "device", "postcopy-active", "completed"}, []string{evs[0].State, evs[1].State, evs[2].State, evs[3].State})
	require.Nil(t, evs[0].DowntimeMs, "no downtime before the switchover")
	require.InDelta(t, 1.5, *evs[2].DowntimeMs, 1e-9)
	require.Equal(t, uint64(40), evs[2].PagesRemaining)
	last := evs[3]
	require.Equal(t, "completed", last.Event)
	require.Equal(t, uint64(0), last.PagesRemaining)
	require.Equal(t, uint64(409600), last.Bytes)
	require.Equal(t, uint64(4), last.Faults)
	require.InDelta(t, 812.5, last.ElapsedMs, 1e-9)
	require.NotNil(t, last.Stats)

	buf.Reset()
	jp = newJSONProgress(&buf, wire.ModePostcopy)
	jp.report(engine.Progress{Phase: "precopy", Pages: 100, Remaining: 70})
	jp.end(nil, nil, &engine.Error{Domain: "vm1", Where: engine.RunsAtSource, Err: errors.New("link down")})
	evs = decodeLines(t, buf.Bytes())
	require.Equal(t, "active", evs[0].State)
	require.Equal(t, "failed", evs[1].State)
	require.Equal(t, "runs at the source", evs[1].Where)
	require.Contains(t, evs[1].Error, "link down")
	require.Nil(t, evs[1].Stats)
	require.Equal(t, uint64(70), evs[1].PagesRemaining, "a failure keeps the last figures")
}

// plot reads --json and --json-progress output alike and draws the
// cumulative bytes and faults; the curves end at the figures' maxima.
func TestPlotReadsBothOutputsAndDrawsTheTimeline(t *testing.T) {
	st := plotStats{Domain: "vm1", Mode: "postcopy", TotalTimeMs: 400, TotalBytes: 8e6, Timeline: []engine.Sample{
		{AtMs: 100, Phase: "postcopy", Bytes: 2e6, Faults: 5},
		{AtMs: 200, Phase: "postcopy", Bytes: 5e6, Faults: 9},
		{AtMs: 400, Phase: "done", Bytes: 8e6, Faults: 10},
	}}
	obj, err := json.Marshal(st)
	require.NoError(t, err)
	lines := `{"event":"progress","state":"postcopy-active"}` + "\n" + `{"event":"completed","stats":` + string(obj) + "}\n"
	for _, in := range [][]byte{obj, []byte(lines)} {
		pl, err := readPlotStats(in)
		require.NoError(t, err)
		require.Len(t, pl.Timeline, 3)
		var svg bytes.Buffer
		require.NoError(t, writePlot(&svg, pl))
		require.NoError(t, xml.Unmarshal(svg.Bytes(), new(struct{})), "well-formed SVG")
		require.Contains(t, svg.String(), "bytes sent (MB), max 8.0")
		require.Contains(t, svg.String(), "faults served, max 10.0")
		// Both curves reach the top of their panel at the last sample.
		require.Contains(t, svg.String(), "740.0,40.0\"")
		require.Contains(t, svg.String(), "740.0,270.0\"")
	}
	_, err = readPlotStats([]byte(`{"event":"failed","state":"failed","error":"x"}`))
	require.ErrorContains(t, err, "did not get to its end")
	_, err = readPlotStats([]byte(`{"mode":"precopy","total_time_ms":5}`))
	require.ErrorIs(t, err, errNoTimeline)
}

// The engine's phases to QEMU's states, postcopy-paused (a broken link
// being made again after the switchover) included.
func TestQEMUStates(t *testing.T) {
	for phase, want := range map[string]string{
		"setup": "setup", "record": "setup", "precopy": "active", "stop": "device",
		"postcopy": "postcopy-active", "postcopy-paused": "postcopy-paused", "verify": "postcopy-active",
	} {
		require.Equal(t, want, qemuState(phase, wire.ModePostcopy), phase)
	}
	require.Equal(t, "active", qemuState("verify", wire.ModePrecopy))
}
