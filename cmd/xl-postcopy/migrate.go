package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/xl-postcopy/xl-postcopy/xen/dsb/control"
	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/engine/protocol"
	"github.com/xl-postcopy/xl-postcopy/xen/migstate"
	"github.com/xl-postcopy/xl-postcopy/xen/prepage"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
	"github.com/xl-postcopy/xl-postcopy/xen/xendom"
	"github.com/xl-postcopy/xl-postcopy/xen/xenstore"
)

// migrateFlags are `migrate`'s options.
type migrateFlags struct {
	ssh        string
	config     string
	mode       string
	prepaging  string
	asJSON     bool
	jsonProg   bool
	debug      bool
	balloon    bool
	receiver   string
	record     time.Duration
	recordInt  time.Duration
	suspendTO  time.Duration
	hybridRnds int
	hold       time.Duration
	xlTimeout  time.Duration
	progressTO time.Duration
	recoverTO  time.Duration
	linkTO     time.Duration
	destPaging string
	resume     bool
	abandon    bool
}

func init() {
	var f migrateFlags
	register(&command{
		name:    "migrate",
		args:    "[options] <domain> <host>",
		summary: "live-migrate a Xen domain to host with post-copy or hybrid (PVH with HAP) or pre-copy (any domain, done by xl migrate) (dom0)",
		setup: func(fs *pflag.FlagSet) {
			fs.StringVarP(&f.ssh, "ssh", "s", "ssh", "command that reaches host (the receiver runs as `CMD HOST xl-postcopy migrate-receive`); '' runs the receiver locally, host is then only a label")
			fs.StringVarP(&f.config, "config", "C", "", "xl config file the destination creates the domain from (default /etc/xen/NAME.cfg or /etc/xen/NAME)")
			fs.StringVar(&f.mode, "mode", "postcopy", "postcopy, hybrid or precopy (PV, HVM and non-HAP domains: precopy only, done by `xl migrate`)")
			fs.StringVar(&f.prepaging, "prepaging", "dual", "post-copy push order: "+strings.Join(engine.PolicyNames, ", "))
			fs.BoolVar(&f.balloon, "balloon", true, "if guest-balloon runs in the guest, ask it to give its free memory back first (those pages are then not sent)")
			fs.DurationVar(&f.record, "record", time.Second, "pre-record policies: longest recording of the trajectory before the switchover")
			fs.DurationVar(&f.recordInt, "record-interval", 20*time.Millisecond, "pre-record policies: dirty-log sampling interval")
			fs.IntVar(&f.hybridRnds, "hybrid-rounds", 1, "pre-copy rounds before a hybrid migration switches to post-copy")
			fs.DurationVar(&f.suspendTO, "suspend-timeout", 30*time.Second, "how long the guest may take to suspend")
			fs.DurationVar(&f.hold, "balloon-hold", 10*time.Minute, "with --balloon: guest-balloon keeps its target this long at most while the migration runs (the destination ends the hold when the domain is complete)")
			fs.DurationVar(&f.progressTO, "progress-timeout", engine.DefaultProgressTimeout, "give up on the other side after this long without a record from it (both sides send keepalives meanwhile); before the switchover the domain then runs on here")
			fs.DurationVar(&f.recoverTO, "recover-timeout", engine.DefaultRecoverTimeout, "after the switchover, how long a broken link to the destination is tried again through the same -s command (the migration is paused meanwhile: the guest runs at the destination and waits there for pages it lacks; every page stays here); 0 ends the migration at the first break (this side's copy paused with every page, the destination's waiting for the pages it lacks)")
			fs.DurationVar(&f.linkTO, "link-timeout", engine.DefaultLinkTimeout, "with recovery, after the switchover: the silence of the destination (both sides send keepalives) after which the link is taken as broken and the migration pauses to reconnect; the receiver uses the same (at most --progress-timeout)")
			fs.DurationVar(&f.xlTimeout, "xl-timeout", xendom.DefaultXLTimeout, "limit for each xl command here and at the destination (xl create of the destination domain, renames, destroy)")
			fs.StringVar(&f.destPaging, "dest-paging-ops", "auto", "how the destination pages: auto (one hypercall a batch where the hypervisor has scripts/xen-patches/0001-mem-paging-batch.patch, else one a page) or per-gfn (one a page always)")
			fs.StringVar(&f.receiver, "receiver", "xl-postcopy", "the xl-postcopy command on the destination host (ignored with -s '')")
			fs.BoolVar(&f.resume, "resume", false, "take over the migration of <domain> (its name) to <host> whose source process died after the switchover: the paused copy here (NAME--migratedaway) and the state record (xl-postcopy list) say where it stood; the receiver, which waits for a new link for its --recover-timeout (the source's plus a minute; 4 min by default), says which pages it holds, and only the others are sent. -s and --receiver default to the dead process's")
			fs.BoolVar(&f.abandon, "abandon", false, "give up the migration of <domain> (its name) to <host> after the switchover when the destination's copy is gone (its receiver died and the admin destroyed NAME--incoming there): resume the paused copy here, as it was at the switchover (what the guest did at the destination since is lost). Refused while <host> has NAME--incoming or NAME (checked through -s), or while a process still runs the migration")
			fs.BoolVar(&f.asJSON, "json", false, "print the statistics as one JSON object on stdout")
			fs.BoolVar(&f.jsonProg, "json-progress", false, "JSON lines on stdout while it runs (QEMU-like state, bytes, pages remaining, faults, downtime once known), the last one completed or failed with the statistics; instead of --json (post-copy and hybrid)")
			fs.BoolVar(&f.debug, "debug", false, "print the backend's and the engine's steps to stderr")
			addLogFormat(fs)
		},
		run: func(fs *pflag.FlagSet, args []string) error {
			if len(args) != 2 {
				return usagef("want <domain> <host>, got %d arguments", len(args))
			}
			for _, d := range []struct {
				name string
				v    time.Duration
			}{{"record", f.record}, {"record-interval", f.recordInt}, {"suspend-timeout", f.suspendTO}, {"balloon-hold", f.hold}, {"xl-timeout", f.xlTimeout}, {"progress-timeout", f.progressTO}, {"link-timeout", f.linkTO}} {
				if d.v <= 0 {
					return usagef("--%s %v: must be a positive duration", d.name, d.v)
				}
			}
			if f.recoverTO < 0 {
				return usagef("--recover-timeout %v: must be 0 (no recovery) or a positive duration", f.recoverTO)
			}
			if f.hybridRnds < 1 {
				return usagef("--hybrid-rounds %d: must be at least 1", f.hybridRnds)
			}
			if err := checkPagingOps("dest-paging-ops", f.destPaging); err != nil {
				return err
			}
			if f.asJSON && f.jsonProg {
				return usagef("--json and --json-progress: choose one (the last --json-progress line holds the statistics)")
			}
			if f.resume && f.abandon {
				return usagef("--resume and --abandon: choose one (--resume goes on with the migration, --abandon gives it up)")
			}
			if f.resume {
				return runTakeOver(fs, f, args[0], args[1])
			}
			if f.abandon {
				return runAbandon(fs, f, args[0], args[1])
			}
			return runMigrate(f, args[0], args[1])
		},
	})
	var urgentFD int
	var listenTok, attachTok, recoverTok, linkTok string
	var linkNo uint64
	var recvDebug bool
	var recvXLTimeout, recvProgressTO, recvRecoverTO, recvLinkTO time.Duration
	var recvPaging string
	register(&command{
		name:    "migrate-receive",
		args:    "[options]",
		summary: "receive a migration on stdin/stdout (started by `xl-postcopy migrate`, not by hand)",
		setup: func(fs *pflag.FlagSet) {
			fs.IntVar(&urgentFD, "urgent-fd", -1, "file descriptor of the urgent stream (local receiver)")
			fs.StringVar(&listenTok, "urgent-listen", "", "accept the urgent stream on the abstract socket @xl-postcopy-`TOKEN`")
			fs.StringVar(&attachTok, "urgent-attach", "", "relay stdin/stdout to the receiver waiting with --urgent-listen `TOKEN`")
			fs.StringVar(&recoverTok, "recover-token", "", "after a break, take the source's new link on the abstract socket @xl-postcopy-recover-`TOKEN`")
			fs.DurationVar(&recvRecoverTO, "recover-timeout", engine.DefaultRecoverTimeout+time.Minute, "after the switchover, how long to keep the domain and wait for the source on a new link when the link breaks (0: no recovery)")
			fs.DurationVar(&recvLinkTO, "link-timeout", engine.DefaultLinkTimeout, "with recovery, after the switchover: the silence of the source after which the link is taken as broken and this side waits for a new one (at most --progress-timeout)")
			fs.StringVar(&linkTok, "attach", "", "relay stdin/stdout to the receiver of --recover-token `TOKEN` (one connection of a new link after a break)")
			fs.Uint64Var(&linkNo, "link", 0, "with --attach: the source's reconnect attempt this connection belongs to")
			fs.BoolVar(&recvDebug, "debug", false, "print the backend's steps to stderr")
			addLogFormat(fs)
			fs.DurationVar(&recvProgressTO, "progress-timeout", engine.DefaultProgressTimeout, "give up on the source after this long without a record from it")
			fs.DurationVar(&recvXLTimeout, "xl-timeout", xendom.DefaultXLTimeout, "limit for each xl command (xl create of the new domain, renames, destroy)")
			fs.StringVar(&recvPaging, "paging-ops", "auto", "auto (batched paging hypercalls where the hypervisor has them) or per-gfn")
		},
		run: func(fs *pflag.FlagSet, args []string) error {
			if len(args) != 0 {
				return usagef("unexpected argument %q", args[0])
			}
			if err := checkLogFormat(); err != nil {
				return err
			}
			if attachTok != "" {
				return attachUrgent(attachTok, 30*time.Second)
			}
			if linkTok != "" {
				// Short: the source tries again with backoff.
				return attachLink(linkTok, linkNo, 2*time.Second)
			}
			if recvLinkTO <= 0 {
				return usagef("--link-timeout %v: must be a positive duration", recvLinkTO)
			}
			if recvRecoverTO < 0 {
				return usagef("--recover-timeout %v: must be 0 (no recovery) or a positive duration", recvRecoverTO)
			}
			if recvXLTimeout <= 0 || recvProgressTO <= 0 {
				return usagef("--xl-timeout %v, --progress-timeout %v: must be positive durations", recvXLTimeout, recvProgressTO)
			}
			if err := checkPagingOps("paging-ops", recvPaging); err != nil {
				return err
			}
			return runMigrateReceive(receiveOptions{urgentFD: urgentFD, listenTok: listenTok, recoverTok: recoverTok, debug: recvDebug,
				xlTimeout: recvXLTimeout, progressTO: recvProgressTO, recoverTO: recvRecoverTO, linkTO: recvLinkTO, perGFN: recvPaging == "per-gfn"})
		},
	})
}

// checkPagingOps refuses a --paging-ops value other than auto and per-gfn.
func checkPagingOps(flag, v string) error {
	if v != "auto" && v != "per-gfn" {
		return usagef("--%s %q: want auto or per-gfn", flag, v)
	}
	return nil
}

// logFormat is --log-format of the command running: how --debug lines and
// the receiver's log look on stderr.
var logFormat = "text"

// addLogFormat declares --log-format.
func addLogFormat(fs *pflag.FlagSet) {
	fs.StringVar(&logFormat, "log-format", "text", "--debug lines on stderr as text (key=value) or json (one object a line, for log collectors)")
}

func checkLogFormat() error {
	if logFormat != "text" && logFormat != "json" {
		return usagef("--log-format %q: want text or json", logFormat)
	}
	return nil
}

// newLogger is the log of a command: slog on w, at debug level, with
// the part of the tool that speaks as "who".
func newLogger(w io.Writer, format, who string) *slog.Logger {
	opt := &slog.HandlerOptions{Level: slog.LevelDebug}
	var h slog.Handler = slog.NewTextHandler(w, opt)
	if format == "json" {
		h = slog.NewJSONHandler(w, opt)
	}
	return slog.New(h).With("who", who)
}

// debugf is the Logf callback the engine and the backends take: with
// --debug, each call is one debug record of the command's logger.
func debugf(on bool, who string) func(string, ...any) {
	if !on {
		return func(string, ...any) {}
	}
	l := newLogger(os.Stderr, logFormat, who)
	return func(format string, a ...any) {
		l.Debug(fmt.Sprintf(format, a...))
	}
}

// findConfig returns the xl config text of the domain.
func findConfig(path, name string) ([]byte, string, error) {
	cands := []string{path}
	if path == "" {
		cands = []string{"/etc/xen/" + name + ".cfg", "/etc/xen/" + name}
	}
	for _, p := range cands {
		b, err := os.ReadFile(p)
		if err == nil {
			return b, p, nil
		}
		if path != "" || !errors.Is(err, os.ErrNotExist) {
			return nil, "", fmt.Errorf("read the domain's xl config: %w", err)
		}
	}
	return nil, "", fmt.Errorf("no xl config for domain %s in %s: pass the file it was created from with -C FILE", name, strings.Join(cands, " or "))
}

// dsbReport is what the guest's balloon daemon did before the migration.
type dsbReport struct {
	Asked      bool   `json:"asked"`
	Running    bool   `json:"daemon_running"`
	OK         bool   `json:"ok"`
	ReleasedKB uint64 `json:"released_kb"`
	TargetKB   uint64 `json:"target_kb"`
	Error      string `json:"error,omitempty"`
	// Hold is the nonce of the hold: guest-balloon keeps its target until
	// the destination ends it (or it times out).
	Hold string `json:"hold,omitempty"`
}

// balloonFirst asks guest-balloon, if it runs, to release free memory now
// and then to hold its target (hold > 0) until the migration ends, so that
// the page set stays as the source lists it.
func balloonFirst(xs *xenstore.Client, dom uint32, hold time.Duration, logf func(string, ...any)) dsbReport {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var r dsbReport
	state, err := xs.Read(ctx, control.Path(dom, control.KeyState))
	if err != nil || state != "running" {
		logf("guest-balloon not running in domain %d (state %q, %v): no ballooning", dom, state, err)
		return r
	}
	r.Running, r.Asked = true, true
	var ack control.Ack
	if hold > 0 {
		ack, err = control.RequestHold(ctx, xs, dom, 10*time.Second, hold)
	} else {
		ack, err = control.RequestBalloon(ctx, xs, dom, 10*time.Second)
	}
	if err != nil {
		r.Error = err.Error()
		return r
	}
	r.OK, r.ReleasedKB, r.TargetKB = ack.OK, ack.ReleasedKB, ack.TargetKB
	if !ack.OK {
		r.Error = ack.Err
	} else if hold > 0 {
		r.Hold = ack.Nonce
	}
	return r
}

func runMigrate(f migrateFlags, domArg, host string) (err error) {
	if err := checkLogFormat(); err != nil {
		return err
	}
	mode, err := wire.ParseMode(f.mode)
	if err != nil {
		return usagef("--mode: %v", err)
	}
	if err := engine.ValidatePolicy(f.prepaging); err != nil {
		return usagef("--prepaging: %v", err)
	}
	logf := debugf(f.debug, "migrate")
	x, err := xendom.OpenXen()
	if err != nil {
		return err
	}
	defer x.Close()
	dom, err := resolveDomain(x, domArg)
	if err != nil {
		return err
	}
	info, err := x.Domain(dom)
	if err != nil {
		return fmt.Errorf("domain %d: %w", dom, err)
	}
	xs, err := xenstore.Open()
	if err != nil {
		return err
	}
	defer xs.Close()
	// A broken stream (the -s command died) is an EPIPE for the engine,
	// not a SIGPIPE that would end this process with the domain's memory.
	signal.Ignore(syscall.SIGPIPE)
	sigs := newMigrateSignals(fmt.Sprintf("domain %d", dom), host)
	defer sigs.stop()
	ctx := sigs.ctx
	name, err := xs.Read(ctx, fmt.Sprintf("/local/domain/%d/name", dom))
	if err != nil {
		return fmt.Errorf("name of domain %d: %w", dom, err)
	}
	if refuse := xendom.RefusePostcopy(info); refuse != nil {
		// No vm_event paging for this domain (PV, or shadow paging),
		// or an HVM device model whose state we do not move: post-copy
		// and hybrid are refused before anything is touched, pre-copy
		// is xl's.
		if mode != wire.ModePrecopy {
			return fmt.Errorf("domain %s: %w", name, refuse)
		}
		return migrateByXL(f, xs, dom, name, host, info.Kind(), logf)
	}
	cfgText, cfgPath, err := findConfig(f.config, name)
	if err != nil {
		return err
	}
	// From here the migration has a record (`xl-postcopy list`); until
	// the engine runs, a failure leaves the domain running here.
	tr := startRecord("migrate", migstate.Record{Domain: name, Role: migstate.Source, Peer: host, Mode: mode.String()})
	whereIfFailed := engine.RunsAtSource.String()
	var st *engine.Stats
	defer func() { endSourceRecord(tr, st, err, whereIfFailed) }()
	logf("domain %s (%d, %s), config %s, mode %s, pre-paging %s", name, dom, info.Kind(), cfgPath, mode, f.prepaging)
	var dsb dsbReport
	if f.balloon {
		dsb = balloonFirst(xs, dom, f.hold, logf)
		if dsb.Asked && !f.asJSON && !f.jsonProg {
			if dsb.OK {
				fmt.Fprintf(os.Stderr, "guest-balloon released %d kB before the migration (target %d kB)\n", dsb.ReleasedKB, dsb.TargetKB)
			} else {
				fmt.Fprintf(os.Stderr, "guest-balloon did not balloon (%s); migrating all memory\n", dsb.Error)
			}
		}
	}
	// The hold ends with the migration: at the destination when it
	// completes there, here when the domain stays here.
	endHoldHere := func() {
		if dsb.Hold == "" {
			return
		}
		hctx, hcancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer hcancel()
		if err := control.EndHold(hctx, xs, dom, dsb.Hold); err != nil {
			logf("end guest-balloon's hold: %v", err)
		}
	}
	src, err := xendom.NewSource(xendom.SourceOptions{HV: x, XS: xs, XL: xendom.XL{Timeout: f.xlTimeout}, Dom: dom, Name: name,
		XLConfig: cfgText, BalloonHold: dsb.Hold, SuspendTimeout: f.suspendTO, Logf: debugf(f.debug, "xen-source")})
	if err != nil {
		endHoldHere()
		return fmt.Errorf("domain %s: %w", name, err)
	}
	var recv *receiver
	extra := []string{"--xl-timeout", f.xlTimeout.String(), "--progress-timeout", f.progressTO.String()}
	if f.recoverTO > 0 {
		// The destination waits longer than this side tries, so that
		// the source gives up first and says so.
		extra = append(extra, "--recover-timeout", (f.recoverTO + time.Minute).String(), "--link-timeout", f.linkTO.String())
	} else {
		extra = append(extra, "--recover-timeout", "0s")
	}
	if f.destPaging != "auto" {
		// Only when asked: an older receiver without the flag still works.
		extra = append(extra, "--paging-ops", f.destPaging)
	}
	if f.debug {
		extra = append(extra, "--debug", "--log-format", logFormat)
	}
	if f.ssh == "" {
		self, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find this executable for the local receiver: %w", err)
		}
		recv, err = startLocalReceiver(self, extra)
		if err != nil {
			endHoldHere()
			return err
		}
	} else {
		recv, err = startRemoteReceiver(f.ssh, host, f.receiver, extra)
		if err != nil {
			endHoldHere()
			return err
		}
	}
	// What a take-over (--resume) needs if this process dies after GO.
	tr.Set(func(r *migstate.Record) {
		if f.recoverTO > 0 {
			r.RecoverToken = recv.token
		}
		r.Transport, r.Receiver, r.Prepaging, r.PageSpace = f.ssh, f.receiver, f.prepaging, src.PageSpace()
	})
	eo := engine.Options{Mode: mode, Prepaging: f.prepaging, Policy: prepage.Options{}, HybridRounds: f.hybridRnds,
		Record: f.record, RecordInterval: f.recordInt, ProgressTimeout: f.progressTO}
	if f.debug {
		eo.Logf = debugf(true, "engine")
	}
	eo.OnGo = sigs.passedGo
	if f.recoverTO > 0 {
		eo.Reconnect, eo.RecoverTimeout, eo.LinkTimeout = recv.reconnect, f.recoverTO, f.linkTO
	}
	jp, progress := reportProgress(f, &eo, tr)
	if !f.asJSON && !f.jsonProg {
		fmt.Fprintf(os.Stderr, "migrating %s (domain %d, %s, %d RAM pages) to %s: mode %s, pre-paging %s\n",
			name, dom, info.Kind(), src.Info().NumPages, host, mode, f.prepaging)
	}
	// The engine says where the domain is if it fails (engine.WhereOf).
	whereIfFailed = ""
	st, runErr := engine.RunSource(ctx, src, recv.bulk, recv.urgent, eo)
	if progress {
		fmt.Fprintln(os.Stderr)
	}
	if werr := recv.wait(30 * time.Second); werr != nil {
		logf("receiver: %v", werr)
	}
	if runErr != nil {
		if where, ok := engine.WhereOf(runErr); ok && (where == engine.RunsAtSource || where == engine.PausedAtSource) {
			endHoldHere()
		}
		if jp != nil {
			jp.end(st, struct {
				*engine.Stats
				Host string             `json:"host"`
				Xen  xendom.SourceStats `json:"xen"`
			}{st, host, src.Stats()}, runErr)
		} else if st != nil && st.TotalTimeMs > 0 && !f.asJSON {
			// It got to the end: the figures say what went wrong.
			printXenStats(os.Stdout, st, src.Stats())
		}
		if where, ok := engine.WhereOf(runErr); ok && where == engine.AfterGo && f.recoverTO > 0 {
			// The receiver waits a minute longer than this side tried.
			return fmt.Errorf("migrate %s: %w; once the destination can be reached again, and within a minute, `xl-postcopy migrate --resume %s %s` takes the migration over; if its receiver is gone (`xl-postcopy list` there), `xl destroy %s--incoming` there, then `xl-postcopy migrate --abandon %s %s` runs the guest here again as it was at the switchover",
				name, runErr, name, host, name, name, host)
		}
		return fmt.Errorf("migrate %s: %w", name, runErr)
	}
	if mode == wire.ModePrecopy {
		st.Prepaging = ""
	}
	out := struct {
		*engine.Stats
		Host string             `json:"host"`
		Xen  xendom.SourceStats `json:"xen"`
		DSB  dsbReport          `json:"dsb"`
	}{st, host, src.Stats(), dsb}
	notVerified := notVerifiedErr(st)
	switch {
	case jp != nil:
		out.Stats.FaultTimeline = nil
		jp.end(st, out, notVerified)
	case f.asJSON:
		out.Stats.FaultTimeline = nil
		if err := printJSON(out); err != nil {
			return err
		}
	default:
		printXenStats(os.Stdout, st, out.Xen)
	}
	if notVerified != nil {
		return notVerified
	}
	return nil
}

// notVerifiedErr is the error of a migration that got to its end with the
// destination's memory differing from the source's (nil if verified).
func notVerifiedErr(st *engine.Stats) error {
	if st.Verified {
		return nil
	}
	return errors.New("migration finished but the destination's memory does not match the source (see verified, mismatched_pages)")
}

// reportProgress sets eo's progress reports: JSON lines (--json-progress),
// a progress line on a terminal, and the state record either way. progress
// says the terminal line is on (it wants a newline at the end).
func reportProgress(f migrateFlags, eo *engine.Options, tr *migstate.Tracker) (jp *jsonProgress, progress bool) {
	progress = isTerminal(os.Stderr) && !f.debug && !f.jsonProg
	switch {
	case f.jsonProg:
		jp = newJSONProgress(os.Stdout, eo.Mode)
		eo.Progress = jp.report
	case progress:
		eo.Progress = func(p engine.Progress) { fmt.Fprint(os.Stderr, progressLine(p)) }
	}
	eo.Progress = recordProgress(tr, eo.Mode, eo.Progress)
	return jp, progress
}

func printXenStats(w io.Writer, st *engine.Stats, xs xendom.SourceStats) {
	fmt.Fprintf(w, "verified          %v from the destination's %s (%d pages compared, %d written by the guest first, %d mismatched)\n",
		st.Verified, st.VerifiedFrom, st.VerifiedPages, st.GuestWrittenPages, st.MismatchedPages)
	fmt.Fprintf(w, "total time        %.1f ms\n", st.TotalTimeMs)
	how := "polled"
	if xs.SuspendWatched {
		how = "seen on the @releaseDomain watch"
	}
	fmt.Fprintf(w, "downtime          %.2f ms (guest suspend %.1f ms, %s)\n", st.DowntimeMs, xs.SuspendMs, how)
	fmt.Fprintf(w, "bytes sent        %s (precopy %s, downtime %s, postcopy %s)\n", fmtBytes(st.TotalBytes), fmtBytes(st.PrecopyBytes), fmtBytes(st.DowntimeBytes), fmtBytes(st.PostcopyBytes))
	fmt.Fprintf(w, "pages sent        %d (zero %d, re-sent %d, redundant %d, pre-copy rounds %d)\n", st.PagesSent, st.ZeroPages, st.ResentPages, st.RedundantPages, st.PrecopyRounds)
	if st.DroppedPages+st.AddedPages+st.GuestDroppedPages+st.UnreadableReads > 0 {
		fmt.Fprintf(w, "page set          %d given back and %d taken again by the guest before the pause, %d given back after the resume, %d unreadable reads (none sent)\n",
			st.DroppedPages, st.AddedPages, st.GuestDroppedPages, st.UnreadableReads)
	}
	if st.Recoveries > 0 {
		fmt.Fprintf(w, "recoveries        %d broken links after the switchover recovered; %.1f ms without a link, %d pages sent again\n",
			st.Recoveries, st.PostcopyPausedMs, st.LostPages)
	}
	fmt.Fprintf(w, "core state        %d pages in the pause (%d page-table pages), %d sent before it (%d of them again in the pause); guest hints: %s\n",
		st.CorePages, xs.PageTablePages, st.EarlyCorePages, st.EarlyCoreRedirtied, xs.GuestHints)
	if st.Mode != "precopy" {
		fmt.Fprintf(w, "network faults    %d, p50 %.0f us, p99 %.0f us, waits summed %.1f ms\n", st.NetworkFaults, st.FaultLatencyP50Us, st.FaultLatencyP99Us, st.FaultWaitMs)
		if st.BlocktimeMs != nil {
			var per []string
			for _, v := range st.VCPUBlocktimeMs {
				per = append(per, fmt.Sprintf("%.1f", v))
			}
			fmt.Fprintf(w, "blocktime         %.1f ms all vCPUs blocked at once; per vCPU %s ms\n", *st.BlocktimeMs, strings.Join(per, ", "))
		}
	}
}

// migrateByXL hands a domain without vm_event paging (PV, or HVM without
// HAP) to `xl migrate` for pre-copy, after ballooning.
func migrateByXL(f migrateFlags, xs *xenstore.Client, dom uint32, name, host, kind string, logf func(string, ...any)) error {
	var dsb dsbReport
	if f.balloon {
		dsb = balloonFirst(xs, dom, 0, logf)
	}
	args := []string{"migrate"}
	if f.config != "" {
		args = append(args, "-C", f.config)
	}
	target := host
	if f.ssh == "" {
		// xl's -s '' runs its last argument as the receiver command.
		target = "xl migrate-receive"
	}
	args = append(args, "-s", f.ssh, name, target)
	if !f.asJSON && !f.jsonProg {
		fmt.Fprintf(os.Stderr, "%s (%s) has no vm_event paging: pre-copy by xl %s\n", name, kind, strings.Join(args, " "))
	}
	tr := startRecord("migrate", migstate.Record{Domain: name, Role: migstate.Source, Peer: host, Mode: wire.ModePrecopy.String(),
		Phase: "xl migrate", State: migstate.StateActive})
	start := time.Now()
	elapsed := func() float64 { return float64(time.Since(start).Microseconds()) / 1000 }
	enc := json.NewEncoder(os.Stdout)
	if f.jsonProg {
		// xl reports no progress of its own: one line as it starts, one
		// at its end.
		_ = enc.Encode(progressEvent{Event: "progress", State: "active", Phase: "xl migrate"})
	}
	cmd := exec.Command("xl", args...)
	cmd.Env = xendom.CleanEnv()
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	err := cmd.Run()
	stats := struct {
		Mode        string    `json:"mode"`
		Domain      string    `json:"domain"`
		By          string    `json:"by"`
		TotalTimeMs float64   `json:"total_time_ms"`
		DSB         dsbReport `json:"dsb"`
	}{"precopy", name, "xl migrate", elapsed(), dsb}
	if err != nil {
		err = fmt.Errorf("xl migrate %s: %w", name, err)
		tr.Fail("as xl migrate left it (see its messages)", err.Error(), -1)
		if f.jsonProg {
			_ = enc.Encode(progressEvent{Event: "failed", State: "failed", ElapsedMs: elapsed(), Error: err.Error(),
				Where: "as xl migrate left it (see its messages above)"})
		}
		return err
	}
	tr.Done()
	switch {
	case f.jsonProg:
		return enc.Encode(progressEvent{Event: "completed", State: "completed", ElapsedMs: stats.TotalTimeMs, Stats: stats})
	case f.asJSON:
		return enc.Encode(stats)
	}
	return nil
}

// stdioConn is the bulk stream of a receiver: stdin and stdout.
type stdioConn struct{ r, w *os.File }

func (s stdioConn) Read(b []byte) (int, error)  { return s.r.Read(b) }
func (s stdioConn) Write(b []byte) (int, error) { return s.w.Write(b) }
func (s stdioConn) Close() error                { return errors.Join(s.r.Close(), s.w.Close()) }

// receiveOptions are migrate-receive's options.
type receiveOptions struct {
	urgentFD                                 int
	listenTok, recoverTok                    string
	debug, perGFN                            bool
	xlTimeout, progressTO, recoverTO, linkTO time.Duration
}

func runMigrateReceive(o receiveOptions) (err error) {
	urgentFD, listenTok, debug := o.urgentFD, o.listenTok, o.debug
	logf := debugf(debug, "migrate-receive")
	// The streams are pipes or sockets that may break (an ssh that
	// dies): a write then fails with EPIPE, which the engine handles,
	// instead of SIGPIPE ending this process and the domain's pages
	// with it.
	// (newMigrateSignals below takes SIGHUP like SIGTERM.)
	signal.Ignore(syscall.SIGPIPE)
	if urgentFD < 0 && listenTok == "" {
		return usagef("migrate-receive needs --urgent-fd or --urgent-listen (it is started by `xl-postcopy migrate`)")
	}
	var bulk io.ReadWriteCloser = stdioConn{r: os.Stdin, w: os.Stdout}
	// Nothing else may write to stdout: it is the stream.
	os.Stdout = os.Stderr
	var urgent io.ReadWriteCloser
	switch {
	case urgentFD >= 0:
		c, err := fileConn(os.NewFile(uintptr(urgentFD), "urgent"))
		if err != nil {
			return err
		}
		urgent = c
	case listenTok != "":
		c, err := listenUrgent(listenTok, 60*time.Second)
		if err != nil {
			return err
		}
		urgent = c
	default:
		return usagef("migrate-receive needs --urgent-fd or --urgent-listen (it is started by `xl-postcopy migrate`)")
	}
	do := engine.DestOptions{Logf: logf, ProgressTimeout: o.progressTO}
	// The record starts with the domain's header (its name) and follows
	// the events this side sees: resume, break, new link.
	var trp atomic.Pointer[migstate.Tracker]
	var st *engine.DestStats
	defer func() { endDestRecord(trp.Load(), st, err) }()
	if o.recoverTok != "" && o.recoverTO > 0 {
		rl, err := listenReattach(o.recoverTok, func(format string, args ...any) {
			fmt.Fprintf(os.Stderr, "xl-postcopy migrate-receive: "+format+"\n", args...)
		})
		if err != nil {
			return err
		}
		defer rl.Close()
		do.Reattach, do.RecoverTimeout = func(ctx context.Context) (io.ReadWriteCloser, io.ReadWriteCloser, error) {
			trp.Load().Mark("postcopy-paused", migstate.StatePostcopyPaused)
			c1, c2, err := rl.Reattach(ctx)
			if err == nil {
				// A new link; should its handshake be refused, the
				// next call marks the pause again (and this counted
				// one recovery too many until the end's figures).
				trp.Load().Mark("postcopy", migstate.StatePostcopyActive)
			}
			return c1, c2, err
		}, o.recoverTO
		do.LinkTimeout = o.linkTO
	}
	recoverTok := ""
	if do.Reattach != nil {
		recoverTok = o.recoverTok
	}
	x, err := xendom.OpenXen()
	if err != nil {
		return err
	}
	defer x.Close()
	x.SetPerGFN(o.perGFN)
	var dest *xendom.Dest
	inner := xendom.NewFactory(xendom.DestOptions{HV: x, XL: xendom.XL{Timeout: o.xlTimeout}, Logf: debugf(debug, "xen-dest")})
	factory := func(h *wire.DomainHeader) (engine.Dest, error) {
		if trp.Load() == nil {
			trp.Store(startRecord("migrate-receive", migstate.Record{Domain: h.Name, Role: migstate.Dest,
				Peer: receiverPeer(urgentFD >= 0), Mode: h.Mode.String(), RecoverToken: recoverTok}))
		}
		d, err := inner(h)
		if err == nil {
			dest = d.(*xendom.Dest)
		}
		return d, err
	}
	sigs := newMigrateSignals("the incoming domain", "this host")
	defer sigs.stop()
	do.OnResume = func() {
		sigs.passedGo()
		if tr := trp.Load(); tr != nil {
			mode, _ := wire.ParseMode(tr.Record().Mode)
			tr.Mark(destPhase(mode), qemuState(destPhase(mode), mode))
		}
	}
	st, err = engine.RunDest(sigs.ctx, bulk, urgent, factory, do)
	var de *engine.DestError
	if err != nil && errors.As(err, &de) && de.Complete && de.Where == protocol.RunsHere && dest != nil {
		// Every page is here and the ACK went out; only the source's
		// word that it had it (BYE) never came, and the source tried for
		// less long than this side waited. It then either had the ACK and
		// destroyed its copy, or gave up with its copy paused, never to
		// be resumed: this copy is the domain either way, so it gets
		// its name.
		if rerr := dest.Rename(); rerr != nil {
			return fmt.Errorf("receive: %w; renaming domain %d from %s failed too: %v", err, dest.DomID(), dest.Name(), rerr)
		}
		return fmt.Errorf("receive: %w; domain %d is complete and now named as at the source; if %s--migratedaway is still there, the source never had the ACK: destroy that paused copy, never resume it", err, dest.DomID(), strings.TrimSuffix(dest.Name(), "--incoming"))
	}
	if err != nil {
		return fmt.Errorf("receive: %w", err)
	}
	if dest != nil {
		logf("domain %d complete: %+v; engine: faults %d network %d recoveries %d postcopy_paused_ms %.1f",
			dest.DomID(), dest.Stats(), st.Faults, st.NetworkFaults, st.Recoveries, st.PostcopyPausedMs)
		if err := dest.Rename(); err != nil {
			return fmt.Errorf("domain %d received, but renaming it from %s failed: %w", dest.DomID(), dest.Name(), err)
		}
		if nonce := dest.BalloonHold(); nonce != "" {
			endHold(dest.DomID(), nonce, logf)
		}
	}
	return nil
}

// endHold ends guest-balloon's migration hold in domain dom.
func endHold(dom uint32, nonce string, logf func(string, ...any)) {
	xs, err := xenstore.Open()
	if err != nil {
		logf("end guest-balloon's hold in domain %d: %v", dom, err)
		return
	}
	defer xs.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := control.EndHold(ctx, xs, dom, nonce); err != nil {
		logf("end guest-balloon's hold in domain %d: %v", dom, err)
	}
}

// migrateSignals turns SIGINT and SIGTERM into a cancel of the migration
// while it can still be undone, and into a message afterwards: once the
// destination may run the domain (GO), its memory is still here, and
// stopping would strand the guest, so the migration goes on.
type migrateSignals struct {
	ctx    context.Context
	cancel context.CancelFunc
	ch     chan os.Signal
	gone   atomic.Bool
	what   string
	host   string
}

func newMigrateSignals(what, host string) *migrateSignals {
	m := &migrateSignals{ch: make(chan os.Signal, 4), what: what, host: host}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	// SIGHUP too: the terminal of an admin whose ssh to dom0 dropped
	// must not end a migration past GO.
	signal.Notify(m.ch, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		for sig := range m.ch {
			if m.gone.Load() {
				fmt.Fprintf(os.Stderr, "\n%v: not stopping: %s already runs at %s and its memory is still arriving; stopping now would strand it. The migration goes on until every page is there.\n", sig, m.what, m.host)
				continue
			}
			fmt.Fprintf(os.Stderr, "\n%v: stopping the migration; %s stays where it ran\n", sig, m.what)
			m.cancel()
		}
	}()
	return m
}

// passedGo marks the point after which a signal no longer stops anything.
func (m *migrateSignals) passedGo() { m.gone.Store(true) }

func (m *migrateSignals) stop() {
	signal.Stop(m.ch)
	close(m.ch)
	m.cancel()
}
