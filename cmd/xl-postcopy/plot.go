package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
)

func init() {
	register(&command{
		name:    "plot",
		args:    "[-o FILE.svg] <STATS.json>",
		summary: "draw a migration's bytes and faults over time as SVG, from the statistics of migrate or lab migrate (--json, or the last --json-progress line)",
		setup: func(fs *pflag.FlagSet) {
			fs.StringP("output", "o", "", "SVG file to write (default: STATS.svg beside the input)")
		},
		run: func(fs *pflag.FlagSet, args []string) error {
			if len(args) != 1 {
				return usagef("want one statistics file")
			}
			out, _ := fs.GetString("output")
			if out == "" {
				out = strings.TrimSuffix(strings.TrimSuffix(args[0], ".json"), ".jsonl") + ".svg"
			}
			raw, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			pl, err := readPlotStats(raw)
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			if err := writeFile(out, func(w io.Writer) error { return writePlot(w, pl) }); err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "plot: %s (%d samples over %.1f s)\n", out, len(pl.Timeline), pl.TotalTimeMs/1000)
			return nil
		},
	})
}

// plotStats is what the plot needs of a migration's statistics.
type plotStats struct {
	Domain      string          `json:"domain"`
	Mode        string          `json:"mode"`
	Prepaging   string          `json:"prepaging"`
	TotalTimeMs float64         `json:"total_time_ms"`
	DowntimeMs  float64         `json:"downtime_ms"`
	TotalBytes  uint64          `json:"total_bytes"`
	Timeline    []engine.Sample `json:"timeline"`
}

// errNoTimeline: statistics from a version or a path (xl migrate) that
// records none.
var errNoTimeline = errors.New("no timeline in these statistics (they come from xl-postcopy migrate or lab migrate with --json or --json-progress; a pre-copy by xl migrate has none)")

// readPlotStats takes a --json object or --json-progress lines (the last
// line's stats).
func readPlotStats(raw []byte) (*plotStats, error) {
	raw = bytes.TrimSpace(raw)
	var pl plotStats
	if err := json.Unmarshal(raw, &pl); err == nil && (len(pl.Timeline) > 0 || pl.TotalTimeMs > 0) {
		if len(pl.Timeline) == 0 {
			return nil, errNoTimeline
		}
		return &pl, nil
	}
	var last []byte
	sc := bufio.NewScanner(bytes.NewReader(raw))
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		if l := bytes.TrimSpace(sc.Bytes()); len(l) > 0 {
			last = append(last[:0], l...)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	var ev struct {
		Event string     `json:"event"`
		Stats *plotStats `json:"stats"`
	}
	if err := json.Unmarshal(last, &ev); err != nil {
		return nil, fmt.Errorf("neither a statistics object nor --json-progress lines: %w", err)
	}
	if ev.Stats == nil {
		return nil, fmt.Errorf("the last --json-progress line (%q) has no statistics: the migration did not get to its end", ev.Event)
	}
	if len(ev.Stats.Timeline) == 0 {
		return nil, errNoTimeline
	}
	return ev.Stats, nil
}

// writePlot draws two panels sharing the time axis: bytes sent (MB) and
// faults served, cumulative, with the phases shaded by the sample that
// saw them.
func writePlot(w io.Writer, pl *plotStats) error {
	const W, L, R, top, panelH, gap = 760.0, 70.0, 20.0, 40.0, 180.0, 50.0
	H := top + 2*panelH + gap + 50
	tl := append([]engine.Sample{{AtMs: 0, Phase: "setup"}}, pl.Timeline...)
	maxT := max(tl[len(tl)-1].AtMs, pl.TotalTimeMs, 1)
	maxB, maxF := 1.0, 1.0
	for _, s := range tl {
		maxB = max(maxB, float64(s.Bytes)/1e6)
		maxF = max(maxF, float64(s.Faults))
	}
	pw := W - L - R
	x := func(t float64) float64 { return L + t/maxT*pw }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" font-family="sans-serif" font-size="12">`+"\n", W, H)
	title := fmt.Sprintf("%s: %s", pl.Domain, pl.Mode)
	if pl.Prepaging != "" {
		title += ", pre-paging " + pl.Prepaging
	}
	title += fmt.Sprintf(", %.1f s, downtime %.1f ms, %.1f MB", pl.TotalTimeMs/1000, pl.DowntimeMs, float64(pl.TotalBytes)/1e6)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/><text x="%.0f" y="20" text-anchor="middle">%s</text>`+"\n", W/2, xmlEscape(title))
	phaseColor := map[string]string{"setup": "#eeeeee", "record": "#e8e0f0", "precopy": "#e0ecf8", "stop": "#f8d0d0", "postcopy": "#e0f4e0", "verify": "#f4f0d8", "done": "#ffffff"}
	for p := 0; p < 2; p++ {
		y0 := top + float64(p)*(panelH+gap)
		// Phases as bands: each sample's phase from the previous sample's time.
		for i := 1; i < len(tl); i++ {
			if c, ok := phaseColor[tl[i].Phase]; ok {
				fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>`+"\n", x(tl[i-1].AtMs), y0, max(x(tl[i].AtMs)-x(tl[i-1].AtMs), 0.5), panelH, c)
			}
		}
		fmt.Fprintf(&b, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="black"/><line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="black"/>`+"\n",
			L, y0+panelH, L+pw, y0+panelH, L, y0, L, y0+panelH)
		name, maxY, col := "bytes sent (MB)", maxB, "#1f77b4"
		val := func(s engine.Sample) float64 { return float64(s.Bytes) / 1e6 }
		if p == 1 {
			name, maxY, col = "faults served", maxF, "#d62728"
			val = func(s engine.Sample) float64 { return float64(s.Faults) }
		}
		var pts []string
		for _, s := range tl {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(s.AtMs), y0+panelH-val(s)/maxY*panelH))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", col, strings.Join(pts, " "))
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" fill="%s">%s, max %.1f</text>`+"\n", L+8, y0+14, col, name, maxY)
	}
	fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" text-anchor="middle">time since the migration started (ms), 0 – %.0f</text>`+"\n", L+pw/2, H-24, maxT)
	lx := L
	for _, ph := range []string{"setup", "record", "precopy", "stop", "postcopy", "verify"} {
		fmt.Fprintf(&b, `<rect x="%.0f" y="%.0f" width="12" height="12" fill="%s" stroke="#999"/><text x="%.0f" y="%.0f">%s</text>`+"\n", lx, H-16, phaseColor[ph], lx+16, H-6, ph)
		lx += 90
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

var xmlEscaper = strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;")

func xmlEscape(s string) string { return xmlEscaper.Replace(s) }
