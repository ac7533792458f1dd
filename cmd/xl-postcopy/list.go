package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/xen/migstate"
)

func init() {
	var all, asJSON, clean bool
	register(&command{
		name: "list",
		args: "[--all] [--json] [--clean]",
		summary: "list the migrations in flight or paused on this host, from their state records in " + migstate.DefaultDir +
			" ($" + migstate.EnvDir + " moves them); a record whose xl-postcopy process died says \"process gone\"",
		setup: func(fs *pflag.FlagSet) {
			fs.BoolVar(&all, "all", false, "also the migrations that ended (failed ones keep their record, with where the domain is and what to do, until --clean)")
			fs.BoolVar(&asJSON, "json", false, "print the records as one JSON array (each with process_gone)")
			fs.BoolVar(&clean, "clean", false, "first remove the records of ended migrations whose process is gone (a migration whose process died mid-way stays)")
		},
		run: func(fs *pflag.FlagSet, args []string) error {
			if len(args) != 0 {
				return usagef("unexpected argument %q", args[0])
			}
			return runList(os.Stdout, os.Stderr, migstate.Dir(), all, asJSON, clean, time.Now())
		},
	})
}

// listed is a record as list prints it with --json.
type listed struct {
	migstate.Record
	ProcessGone bool `json:"process_gone"`
}

// runList prints the records of dir on out (messages on errw): those not
// ended, or all. Files that do not parse are named on errw and make it
// fail after the others are printed.
func runList(out, errw io.Writer, dir string, all, asJSON, clean bool, now time.Time) error {
	var cleanErrs []error
	if clean {
		var removed []migstate.Record
		removed, cleanErrs = migstate.Clean(dir)
		for _, r := range removed {
			fmt.Fprintf(errw, "removed the record of %s (%s, %s)\n", r.Domain, r.Role, r.State)
		}
	}
	recs, bad := migstate.List(dir)
	if clean {
		// Clean listed too: its errors hold the same unreadable files,
		// and the records it could not remove.
		bad = cleanErrs
	}
	shown := []listed{}
	hidden := 0
	for _, r := range recs {
		if r.Ended() && !all {
			hidden++
			continue
		}
		shown = append(shown, listed{Record: r, ProcessGone: r.ProcessGone()})
	}
	if asJSON {
		b, err := json.MarshalIndent(shown, "", "  ")
		if err != nil {
			return fmt.Errorf("encode the records: %w", err)
		}
		fmt.Fprintf(out, "%s\n", b)
	} else {
		printList(out, shown, now)
		if len(shown) == 0 {
			fmt.Fprintf(errw, "no migrations in flight or paused on this host (records in %s)\n", dir)
		}
		if hidden > 0 {
			fmt.Fprintf(errw, "%d ended migration(s) not shown: xl-postcopy list --all\n", hidden)
		}
	}
	for _, err := range bad {
		fmt.Fprintf(errw, "xl-postcopy list: %v\n", err)
	}
	if len(bad) > 0 {
		return fmt.Errorf("%d state file(s) could not be read or removed (above)", len(bad))
	}
	return nil
}

// printList writes the table, then where each ended domain is and what to
// do.
func printList(w io.Writer, recs []listed, now time.Time) {
	if len(recs) == 0 {
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "DOMAIN\tROLE\tPEER\tSTATE\tPHASE\tAGE\tPID\tRECOVERIES")
	for _, r := range recs {
		pid := strconv.Itoa(r.PID)
		if r.ProcessGone {
			pid = "process gone"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", r.Domain, r.Role, orDash(r.Peer), r.State, orDash(r.Phase),
			fmtAge(now.Sub(r.StartedAt)), pid, r.Recoveries)
	}
	tw.Flush()
	for _, r := range recs {
		if r.Where == "" && r.WhatToDo == "" {
			continue
		}
		fmt.Fprintf(w, "\n%s (%s): %s\n", r.Domain, r.Role, orDash(r.Where))
		if r.WhatToDo != "" {
			fmt.Fprintf(w, "  %s\n", r.WhatToDo)
		}
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// fmtAge is a duration in the two largest units: 42s, 3m05s, 2h10m, 3d04h.
func fmtAge(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	s := int64(d / time.Second)
	switch {
	case s < 60:
		return fmt.Sprintf("%ds", s)
	case s < 3600:
		return fmt.Sprintf("%dm%02ds", s/60, s%60)
	case s < 86400:
		return fmt.Sprintf("%dh%02dm", s/3600, s%3600/60)
	}
	return fmt.Sprintf("%dd%02dh", s/86400, s%86400/3600)
}
