package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/migstate"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
	"github.com/xl-postcopy/xl-postcopy/xen/xendom"
	"github.com/xl-postcopy/xl-postcopy/xen/xenstore"
)

// `migrate --resume`: a new process takes over a migration whose source
// process died after the switchover (issue 13). The source copy is
// paused here with every page; the receiver at the destination keeps the
// domain and waits for a new link (--recover-timeout, a minute longer
// than the source's); the state record says how to reach it and how the
// pages are numbered.

// findSourceRecord picks the source record of name in records and checks
// what --resume (takeOver) and --abandon both need: its process is gone
// and it was going to host; a take-over also needs recovery (a receiver
// that waits) and the page space.
func findSourceRecord(records []migstate.Record, name, host string, takeOver bool) (migstate.Record, error) {
	for _, r := range records {
		if r.Domain != name || r.Role != migstate.Source {
			continue
		}
		switch {
		case !r.ProcessGone():
			return r, fmt.Errorf("the migration of %s is still run by process %d (state %s): it goes on by itself for its --recover-timeout; end that process first (kill %d; its copy stays paused)",
				name, r.PID, r.State, r.PID)
		case r.Peer != host:
			return r, fmt.Errorf("the migration of %s was going to %s, not %s", name, r.Peer, host)
		case len(r.PageSpace) == 0:
			return r, fmt.Errorf("the record of the migration of %s has no page space (written by an older xl-postcopy): its paused copy cannot be reopened", name)
		case takeOver && r.RecoverToken == "":
			return r, fmt.Errorf("the migration of %s ran without recovery (--recover-timeout 0): its receiver does not wait for a new link, so it cannot be taken over", name)
		}
		return r, nil
	}
	return migstate.Record{}, fmt.Errorf("no migration of %s from this host is recorded in %s (xl-postcopy list --all)", name, migstate.Dir())
}

// listRecords reads the state directory, saying on stderr which files it
// could not read.
func listRecords(cmd string) []migstate.Record {
	records, bad := migstate.List(migstate.Dir())
	for _, e := range bad {
		fmt.Fprintf(os.Stderr, "xl-postcopy %s: %v\n", cmd, e)
	}
	return records
}

// takeOverFigures are the JSON keys a take-over does not know: the
// process that measured them died.
var takeOverFigures = []string{"downtime_ms", "setup_time_ms", "precopy_bytes", "downtime_bytes", "precopy_rounds",
	"core_pages", "early_core_pages", "early_core_redirtied", "dropped_pages", "added_pages", "unreadable_reads"}

// withoutUnknown marshals v and drops the figures a take-over does not
// know (omitted, not zero).
func withoutUnknown(v any) (map[string]any, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	for _, k := range takeOverFigures {
		delete(m, k)
	}
	return m, nil
}

// printTakeOverStats is printXenStats for a take-over: what this process
// saw.
func printTakeOverStats(w io.Writer, st *engine.Stats) {
	fmt.Fprintf(w, "verified          %v from the destination's %s (%d pages compared, %d written by the guest first, %d mismatched)\n",
		st.Verified, st.VerifiedFrom, st.VerifiedPages, st.GuestWrittenPages, st.MismatchedPages)
	fmt.Fprintf(w, "time taken over   %.1f ms (the downtime and what came before were the dead process's)\n", st.TotalTimeMs)
	fmt.Fprintf(w, "bytes sent        %s\n", fmtBytes(st.TotalBytes))
	fmt.Fprintf(w, "pages sent        %d (zero %d, re-sent %d, redundant %d)\n", st.PagesSent, st.ZeroPages, st.ResentPages, st.RedundantPages)
	fmt.Fprintf(w, "recoveries        %d new links (the first is the take-over's); %.1f ms without a link\n", st.Recoveries, st.PostcopyPausedMs)
	fmt.Fprintf(w, "network faults    %d, p50 %.0f us, p99 %.0f us, waits summed %.1f ms\n", st.NetworkFaults, st.FaultLatencyP50Us, st.FaultLatencyP99Us, st.FaultWaitMs)
}

// reopenPausedCopy opens Xen and xenstore and the migration's paused
// source copy: renamed NAME--migratedaway before GO, or still NAME if the
// process died in between. closeXen closes the handles.
func reopenPausedCopy(f migrateFlags, name string, space json.RawMessage) (src *xendom.Source, dom uint32, current string, closeXen func(), err error) {
	x, err := xendom.OpenXen()
	if err != nil {
		return nil, 0, "", nil, err
	}
	xs, err := xenstore.Open()
	if err != nil {
		x.Close()
		return nil, 0, "", nil, err
	}
	closeXen = func() {
		xs.Close()
		x.Close()
	}
	for _, n := range []string{name + "--migratedaway", name} {
		d, lerr := resolveDomain(x, n)
		if lerr != nil {
			continue
		}
		src, err := xendom.ReopenSource(xendom.SourceOptions{HV: x, XS: xs, XL: xendom.XL{Timeout: f.xlTimeout}, Dom: d, Name: name,
			Logf: debugf(f.debug, "xen-source")}, n, space)
		if err != nil {
			closeXen()
			return nil, 0, "", nil, fmt.Errorf("domain %s (%d): %w", n, d, err)
		}
		return src, d, n, closeXen, nil
	}
	closeXen()
	return nil, 0, "", nil, fmt.Errorf("no domain %s--migratedaway or %s here: the paused source copy is gone", name, name)
}

// runTakeOver is `migrate --resume <domain> <host>`.
func runTakeOver(fs *pflag.FlagSet, f migrateFlags, name, host string) (err error) {
	if err := checkLogFormat(); err != nil {
		return err
	}
	if _, isID, _ := parseDomainArg(name); isID {
		return usagef("--resume: give the domain's name, not a domain id (the source copy is renamed %s--migratedaway)", name)
	}
	if f.recoverTO <= 0 {
		return usagef("--resume needs recovery (--recover-timeout > 0): it reaches the destination as a recovery does")
	}
	rec, err := findSourceRecord(listRecords("migrate --resume"), name, host, true)
	if err != nil {
		return err
	}
	mode, err := wire.ParseMode(rec.Mode)
	if err != nil || mode == wire.ModePrecopy {
		return fmt.Errorf("the migration of %s was a %q migration: nothing to take over after a switchover", name, rec.Mode)
	}
	prepaging := rec.Prepaging
	if fs.Changed("prepaging") || prepaging == "" {
		prepaging = f.prepaging
	}
	if err := engine.ValidatePolicy(prepaging); err != nil {
		return usagef("--prepaging: %v", err)
	}
	ssh, bin := rec.Transport, rec.Receiver
	if fs.Changed("ssh") {
		ssh = f.ssh
	}
	if fs.Changed("receiver") || bin == "" {
		bin = f.receiver
	}
	logf := debugf(f.debug, "migrate")
	src, dom, current, closeXen, err := reopenPausedCopy(f, name, rec.PageSpace)
	if err != nil {
		return err
	}
	defer closeXen()
	signal.Ignore(syscall.SIGPIPE)
	sigs := newMigrateSignals(fmt.Sprintf("domain %s", name), host)
	defer sigs.stop()
	// GO was the dead process's: from the start no signal may strand the
	// guest at the destination.
	sigs.passedGo()
	var recv *receiver
	if ssh == "" {
		self, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find this executable for the local relays: %w", err)
		}
		recv = attachOnlyLocal(self, rec.RecoverToken)
	} else {
		recv = attachOnlyRemote(ssh, host, bin, rec.RecoverToken)
	}
	tr := startRecord("migrate", migstate.Record{Domain: name, Role: migstate.Source, Peer: host, Mode: mode.String(),
		State: migstate.StatePostcopyPaused, Phase: "postcopy-paused", RecoverToken: rec.RecoverToken,
		Transport: ssh, Receiver: bin, Prepaging: prepaging, PageSpace: rec.PageSpace, Recoveries: rec.Recoveries})
	var st *engine.Stats
	defer func() { endSourceRecord(tr, st, err, engine.AfterGo.String()) }()
	eo := engine.Options{Mode: mode, Prepaging: prepaging, ProgressTimeout: f.progressTO,
		Reconnect: recv.reconnect, RecoverTimeout: f.recoverTO, LinkTimeout: f.linkTO}
	if f.debug {
		eo.Logf = debugf(true, "engine")
	}
	jp, progress := reportProgress(f, &eo, tr)
	if !f.asJSON && !f.jsonProg {
		fmt.Fprintf(os.Stderr, "taking over the migration of %s to %s (its source process %d is gone): paused copy %s (domain %d, %d pages), mode %s, pre-paging %s\n",
			name, host, rec.PID, current, dom, src.Info().NumPages, mode, prepaging)
	}
	logf("record %s: state %s, phase %s, token %s, transport %q", name, rec.State, rec.Phase, rec.RecoverToken, ssh)
	st, runErr := engine.TakeOverSource(sigs.ctx, src, eo)
	if progress {
		fmt.Fprintln(os.Stderr)
	}
	if werr := recv.wait(30 * time.Second); werr != nil {
		logf("relays: %v", werr)
	}
	out := struct {
		*engine.Stats
		Host string             `json:"host"`
		Xen  xendom.SourceStats `json:"xen"`
	}{st, host, src.Stats()}
	if runErr != nil {
		if jp != nil {
			m, _ := withoutUnknown(out)
			jp.end(st, m, runErr)
		}
		return fmt.Errorf("migrate --resume %s: %w", name, runErr)
	}
	notVerified := notVerifiedErr(st)
	switch {
	case jp != nil:
		out.Stats.FaultTimeline = nil
		m, err := withoutUnknown(out)
		if err != nil {
			return err
		}
		jp.end(st, m, notVerified)
	case f.asJSON:
		out.Stats.FaultTimeline = nil
		m, err := withoutUnknown(out)
		if err != nil {
			return err
		}
		if err := printJSON(m); err != nil {
			return err
		}
	default:
		printTakeOverStats(os.Stdout, st)
	}
	if notVerified == nil && !f.asJSON && !f.jsonProg {
		fmt.Fprintf(os.Stderr, "%s runs at %s; the source copy here is destroyed\n", name, strings.TrimSpace(host))
	}
	return notVerified
}

// judgeDestCopy reads `xl list` as run at the destination host: nil only
// when it ran and lists neither NAME--incoming nor NAME.
func judgeDestCopy(name, host, out string, runErr error) error {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if runErr != nil || len(lines) == 0 || !strings.HasPrefix(strings.TrimSpace(lines[0]), "Name") {
		return fmt.Errorf("could not tell whether %s still has a copy of %s (xl list there: %v): nothing was done here; two running copies of one guest would be worse than none", host, name, runErr)
	}
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		if len(f) >= 2 && (f[0] == name || f[0] == name+"--incoming") {
			return fmt.Errorf("%s still has a copy of %s (%s, domain %s): destroy it there first (xl destroy %s), or, if its receiver still runs, go on with the migration (--resume)",
				host, name, f[0], f[1], f[0])
		}
	}
	return nil
}

// runAbandon is `migrate --abandon <domain> <host>`: the destination's
// copy is gone, so the paused copy here, the guest as it was at the
// switchover, runs again.
func runAbandon(fs *pflag.FlagSet, f migrateFlags, name, host string) error {
	if _, isID, _ := parseDomainArg(name); isID {
		return usagef("--abandon: give the domain's name, not a domain id")
	}
	rec, err := findSourceRecord(listRecords("migrate --abandon"), name, host, false)
	if err != nil {
		return err
	}
	ssh := rec.Transport
	if fs.Changed("ssh") {
		ssh = f.ssh
	}
	// `xl list` at the destination, through the migration's transport.
	check := exec.Command("xl", "list")
	check.Env = xendom.CleanEnv()
	if ssh != "" {
		check = shellCmd(fmt.Sprintf("%s %s xl list", ssh, shellQuote(host)))
	}
	check.Stderr = os.Stderr
	out, runErr := check.Output()
	if err := judgeDestCopy(name, host, string(out), runErr); err != nil {
		return err
	}
	src, dom, current, closeXen, err := reopenPausedCopy(f, name, rec.PageSpace)
	if err != nil {
		return err
	}
	defer closeXen()
	if err := src.Resume(); err != nil {
		return fmt.Errorf("resume %s (domain %d) here: %w", current, dom, err)
	}
	if err := migstate.Remove(migstate.Dir(), name, migstate.Source); err != nil {
		fmt.Fprintf(os.Stderr, "xl-postcopy migrate --abandon: remove the state record: %v\n", err)
	}
	fmt.Fprintf(os.Stderr, "%s (domain %d) runs here again, as it was at the switchover; what it did at %s since is lost\n", name, dom, host)
	return nil
}
