package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/lab"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// benchRow is one migration of the benchmark matrix.
type benchRow struct {
	Workload  string        `json:"workload"`
	Mode      string        `json:"mode"`
	Prepaging string        `json:"prepaging"`
	Stats     *engine.Stats `json:"stats,omitempty"`
	Continued bool          `json:"progress_continued"`
	Error     string        `json:"error,omitempty"`
}

type benchReport struct {
	Command string     `json:"command"`
	Date    string     `json:"date"`
	Link    string     `json:"link"`
	Mem     string     `json:"mem"`
	WS      string     `json:"working_set"`
	OpCost  int        `json:"op_cost"`
	Rows    []benchRow `json:"rows"`
}

func init() {
	var lf labFlags
	var out, workloads, policies, modes, plotWL string
	register(&command{
		name:    "bench",
		args:    "[options]",
		summary: "Run every mode × pre-paging policy × workload on the same link in one run; write a markdown table, JSON and a faults-over-time plot.",
		setup: func(fs *pflag.FlagSet) {
			lf.register(fs)
			fs.StringVar(&out, "out", "bench-out", "directory for results.md, results.json and faults.svg")
			fs.StringVar(&workloads, "workloads", "zipf,scan,stride,phases,multiproc,stream", "comma-separated workloads")
			fs.StringVar(&policies, "policies", strings.Join(engine.PolicyNames, ","), "comma-separated pre-paging policies (post-copy and hybrid)")
			fs.StringVar(&modes, "modes", "precopy,postcopy,hybrid", "comma-separated modes")
			fs.StringVar(&plotWL, "plot-workload", "zipf", "workload whose post-copy network faults over time are plotted")
		},
		run: func(fs *pflag.FlagSet, args []string) error {
			if len(args) != 0 {
				return usagef("unexpected argument %q", args[0])
			}
			var ms []wire.Mode
			for _, m := range splitList(modes) {
				mode, err := wire.ParseMode(m)
				if err != nil {
					return usagef("--modes: %v", err)
				}
				ms = append(ms, mode)
			}
			pols := splitList(policies)
			for _, p := range pols {
				if err := engine.ValidatePolicy(p); err != nil {
					return usagef("--policies: %v", err)
				}
			}
			wls := splitList(workloads)
			if len(wls) == 0 || len(ms) == 0 {
				return usagef("--workloads %q, --modes %q: want at least one of each", workloads, modes)
			}
			if err := lf.check("workloads", wls...); err != nil {
				return err
			}
			for _, w := range wls {
				if _, err := lf.domain(w); err != nil {
					return err
				}
			}
			if err := os.MkdirAll(out, 0o755); err != nil {
				return fmt.Errorf("create output directory: %w", err)
			}
			in := catchInterrupts("bench")
			defer in.stop()
			l, err := lf.openLink()
			if l != nil {
				in.setLink(l)
				defer l.Close()
			}
			if in.signal() != nil {
				return in.interrupted("while setting up the link", []string{"ran no migration"}, l, err, lf.debug)
			}
			if err != nil {
				return err
			}
			linkDesc := "loopback"
			if l.RateBps > 0 {
				linkDesc = lf.link + " (netns + veth + tbf)"
			}
			rep := benchReport{Command: "xl-postcopy " + strings.Join(os.Args[1:], " "), Date: time.Now().UTC().Format(time.RFC3339),
				Link: linkDesc, Mem: lf.mem, WS: lf.ws, OpCost: lf.opCost}
			type job struct {
				wl, pol string
				mode    wire.Mode
			}
			var jobs []job
			for _, w := range wls {
				for _, m := range ms {
					if m == wire.ModePrecopy {
						jobs = append(jobs, job{w, "-", m})
						continue
					}
					for _, p := range pols {
						jobs = append(jobs, job{w, p, m})
					}
				}
			}
			for i, j := range jobs {
				if in.signal() != nil {
					break
				}
				cfg, _ := lf.domain(j.wl)
				pol := j.pol
				if pol == "-" {
					pol = "none"
				}
				eo, err := lf.engine(j.mode, pol)
				if err != nil {
					return err
				}
				fmt.Fprintf(os.Stderr, "[%d/%d] %s %s %s ... ", i+1, len(jobs), j.wl, j.mode, j.pol)
				res, err := lab.Run(in.ctx, lab.RunConfig{Domain: cfg, Engine: eo, Link: l, Warmup: lf.warmup, After: lf.after})
				if in.signal() != nil {
					fmt.Fprintln(os.Stderr, "interrupted")
					if lf.debug && err != nil {
						fmt.Fprintf(os.Stderr, "debug: the interrupted migration ended with: %v\n", err)
					}
					break // the interrupted migration is no result
				}
				row := benchRow{Workload: j.wl, Mode: j.mode.String(), Prepaging: j.pol}
				if res != nil {
					row.Stats, row.Continued = res.Stats, res.Continued
				}
				if err != nil {
					row.Error = err.Error()
					fmt.Fprintf(os.Stderr, "FAILED: %v\n", err)
				} else {
					st := res.Stats
					fmt.Fprintf(os.Stderr, "%.0f ms, downtime %.2f ms, %d network faults / %d working set, verified %v\n",
						st.TotalTimeMs, st.DowntimeMs, st.NetworkFaults, st.WorkingSet, st.Verified)
				}
				rep.Rows = append(rep.Rows, row)
			}
			if err := writeBench(out, &rep, plotWL); err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "wrote %s\n", filepath.Join(out, "results.md"))
			if in.signal() != nil {
				when := fmt.Sprintf("during migration %d of %d", len(rep.Rows)+1, len(jobs))
				return in.interrupted(when, []string{"stopped it", "ended the lab guests",
					fmt.Sprintf("wrote the %d finished migrations to %s", len(rep.Rows), filepath.Join(out, "results.md"))}, l, nil, false)
			}
			for _, r := range rep.Rows {
				if r.Error != "" || r.Stats == nil || !r.Stats.Verified {
					return fmt.Errorf("some migrations failed or were not verified: see %s", filepath.Join(out, "results.md"))
				}
			}
			return nil
		},
	})
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func writeBench(dir string, rep *benchReport, plotWL string) error {
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), js, 0o644); err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	f, err := os.Create(filepath.Join(dir, "results.md"))
	if err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	defer f.Close()
	writeBenchMarkdown(f, rep)
	svg := faultsSVG(rep, plotWL)
	if err := os.WriteFile(filepath.Join(dir, "faults.svg"), []byte(svg), 0o644); err != nil {
		return fmt.Errorf("write plot: %w", err)
	}
	return f.Close()
}

func writeBenchMarkdown(w io.Writer, rep *benchReport) {
	fmt.Fprintf(w, "Command: `%s`  \nDate: %s; link: %s; lab domain: %s memory, %s working set, op cost %d\n\n",
		rep.Command, rep.Date, rep.Link, rep.Mem, rep.WS, rep.OpCost)
	fmt.Fprintln(w, "| workload | mode | pre-paging | total ms | downtime ms | MiB sent | pages sent | redundant | net faults | working set | faults/WS | p50 µs | p99 µs | fault waits ms | record ms | time/link bound | verified |")
	fmt.Fprintln(w, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
	for _, r := range rep.Rows {
		s := r.Stats
		if s == nil || r.Error != "" {
			fmt.Fprintf(w, "| %s | %s | %s | failed: %s ||||||||||||||\n", r.Workload, r.Mode, r.Prepaging, strings.ReplaceAll(r.Error, "|", "/"))
			continue
		}
		fmt.Fprintf(w, "| %s | %s | %s | %.0f | %.2f | %.1f | %d | %d | %d | %d | %.3f | %.0f | %.0f | %.1f | %.0f | %.2f | %v |\n",
			r.Workload, r.Mode, r.Prepaging, s.TotalTimeMs, s.DowntimeMs, float64(s.TotalBytes)/(1<<20), s.PagesSent,
			s.RedundantPages, s.NetworkFaults, s.WorkingSet, s.FaultsPerWS, s.FaultLatencyP50Us, s.FaultLatencyP99Us,
			s.FaultWaitMs, s.RecordTimeMs, s.TimeOverLink, s.Verified && s.IntegrityErrors == 0 && r.Continued)
	}
}

// faultsSVG plots cumulative network faults over time after resume, one
// line per post-copy policy, for one workload.
func faultsSVG(rep *benchReport, wl string) string {
	type series struct {
		name string
		cum  []float64
	}
	var ss []series
	maxY, maxX := 1.0, 1
	for _, r := range rep.Rows {
		if r.Workload != wl || r.Mode != "postcopy" || r.Stats == nil {
			continue
		}
		var c []float64
		sum := 0.0
		for _, v := range r.Stats.FaultTimeline {
			sum += float64(v)
			c = append(c, sum)
		}
		ss = append(ss, series{r.Prepaging, c})
		maxY = max(maxY, sum)
		maxX = max(maxX, len(c))
	}
	const W, H, L, B = 720.0, 400.0, 60.0, 40.0
	colors := []string{"#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" font-family="sans-serif" font-size="12">`+"\n", W, H)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/><text x="%.0f" y="18" text-anchor="middle">%s: cumulative network faults after resume (post-copy, %s)</text>`+"\n", W/2, wl, rep.Link)
	pw, ph := W-L-20, H-B-40
	fmt.Fprintf(&b, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="black"/><line x1="%.0f" y1="30" x2="%.0f" y2="%.0f" stroke="black"/>`+"\n", L, H-B, L+pw, H-B, L, L, H-B)
	fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" text-anchor="middle">time since resume (ms), 0 – %d</text>`+"\n", L+pw/2, H-8, maxX*int(engine.TimelineBucket/time.Millisecond))
	fmt.Fprintf(&b, `<text x="14" y="%.0f" transform="rotate(-90 14 %.0f)" text-anchor="middle">network faults (max %.0f)</text>`+"\n", 30+ph/2, 30+ph/2, maxY)
	for i, s := range ss {
		col := colors[i%len(colors)]
		var pts []string
		pts = append(pts, fmt.Sprintf("%.1f,%.1f", L, H-B))
		for x, y := range s.cum {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", L+float64(x+1)/float64(maxX)*pw, H-B-y/maxY*ph))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", col, strings.Join(pts, " "))
		last := 0.0
		if len(s.cum) > 0 {
			last = s.cum[len(s.cum)-1]
		}
		fmt.Fprintf(&b, `<text x="%.0f" y="%d" fill="%s">%s (%.0f)</text>`+"\n", L+10, 45+16*i, col, s.name, last)
	}
	b.WriteString("</svg>\n")
	return b.String()
}
