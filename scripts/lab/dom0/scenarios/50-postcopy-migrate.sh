#!/bin/sh
# Built-in: post-copy migration of a running PVH guest with xl-postcopy (issue 5), against
# xl migrate on the same guest in the same run, and the PV refusal.
#   1. xl-postcopy migrate with each --prepaging policy of LAB_PC_POLICIES (':'-separated,
#      default dual; the measurement run adds record+lr+dbscan): exit 0, verified, no
#      duplicate page, the guest's progress counter goes on from where it was;
#   2. xl migrate of the same guest: downtime and bytes side by side with ours, downtime
#      measured for both by the same outside ruler (`xl-postcopy lab-downtime`, polling
#      the hypervisor every millisecond) besides each tool's own figure;
#   3. a PV guest: --mode postcopy is refused naming the reason, --mode precopy migrates it.
# The receiver pages with the batched hypercalls of scripts/xen-patches (the lab's
# hypervisor carries them; paging_ops=batched is checked); scenario 51 takes the per-gfn
# path. `make lab-test` runs only dual by default.
# lab-timeout: 1500
# shellcheck source-path=SCRIPTDIR source=../lab-lib.sh
. /lab/lab-lib.sh
n=lab-pc
pv=lab-pcpv

pc_dump() {
	echo "--- xl-postcopy stderr ($1)"
	tail -n 60 "/tmp/pc-$1.err" 2>/dev/null
	xl list
	_lab_dump "$n"
	_f=$LAB_CONSOLE_DIR/guest-$n--incoming.log
	[ -f "$_f" ] && { echo "--- head $_f"; tr -d '\r' <"$_f" | grep -v '^progress ' | head -n 60; }
	if [ -f "$_f" ] && grep -q -E 'BUG|Oops|panic|WARNING|general protection' "$_f"; then
		echo "--- first oops in $_f"
		tr -d '\r' <"$_f" | grep -v '^progress ' | grep -n -E -A45 -B12 'BUG|Oops|panic|WARNING|general protection' | head -n 90
	fi
	_id=$(lab_domid "$n")
	if [ -n "$_id" ]; then
		# Is the guest alive without its console? guestprog dirties pages all the time.
		xl-postcopy trace "$_id" --interval 100ms --duration 3s -o /tmp/pc-alive.trace 2>&1 | tail -n 2 | sed 's/^/alive-trace: /'
		for _x in /usr/lib/xen-4.17/bin/xenctx xenctx; do
			[ -x "$_x" ] || command -v "$_x" >/dev/null 2>&1 || continue
			"$_x" -a "$_id" 0 2>&1 | head -n 30 | sed 's/^/xenctx: /'
			break
		done
		xenstore-ls "/local/domain/$_id" 2>&1 | head -n 40 | sed 's/^/xenstore: /'
	fi
	xl dmesg | grep -v 'HVM.*save:\|HVM.*restore:' | tail -n 25
}

# pc_migrate LABEL [xl-postcopy option ...]: one post-copy migration of $n with checks.
pc_migrate() {
	_l=$1
	shift
	_id=$(lab_domid "$n")
	_seq0=$(lab_last_progress "$(lab_console_log "$n")")
	lab_watch_start "$_id" "$_l"
	_t0=$(lab_now)
	xl-postcopy migrate -s '' -C "/tmp/$n.cfg" --json --debug $PC_MIGRATE_OPTS "$@" "$n" localhost >"/tmp/pc-$_l.json" 2>"/tmp/pc-$_l.err"
	_rc=$?
	_wall=$(lab_since "$_t0")
	_dt=$(lab_watch_end "$_l")
	_j=/tmp/pc-$_l.json
	_kv="wall_s=$_wall watched_downtime_ms=${_dt:-none} downtime_ms=$(jget "$_j" downtime_ms) total_ms=$(jget "$_j" total_time_ms)"
	_kv="$_kv bytes=$(jget "$_j" total_bytes) pages=$(jget "$_j" pages) pages_sent=$(jget "$_j" pages_sent)"
	_kv="$_kv core_pages=$(jget "$_j" core_pages) network_faults=$(jget "$_j" network_faults) faults=$(jget "$_j" faults)"
	_kv="$_kv resent_pages=$(jget "$_j" resent_pages) redundant_pages=$(jget "$_j" redundant_pages) verified=$(jget "$_j" verified)"
	_kv="$_kv verified_from=$(jget "$_j" verified_from) verified_pages=$(jget "$_j" verified_pages) guest_written_pages=$(jget "$_j" guest_written_pages) seq_before=$_seq0"
	_kv="$_kv ram_pages=$(jget2 "$_j" ram_pages) page_table_pages=$(jget2 "$_j" page_table_pages) per_cpu_pages=$(jget2 "$_j" per_cpu_pages)"
	_kv="$_kv suspend_ms=$(jget2 "$_j" suspend_ms) balloon_released_kb=$(jget2 "$_j" released_kb)"
	_kv="$_kv resident_hint=$(jget2 "$_j" resident_hint) hint_stale=$(jget2 "$_j" hint_stale) hint_missed=$(jget2 "$_j" hint_missed)"
	_kv="$_kv $(lab_dest_kv "/tmp/pc-$_l.err")"
	if [ "$_rc" != 0 ]; then
		lab_result "postcopy-$_l" FAIL reason=exit-$_rc $_kv
		pc_dump "$_l"
		return 1
	fi
	if [ "$(jget "$_j" verified)" != true ] || [ "$(jget "$_j" verified_from)" != memory ] ||
		[ "$(jget "$_j" resent_pages)" != 0 ] || [ "$(jget "$_j" redundant_pages)" != 0 ]; then
		lab_result "postcopy-$_l" FAIL reason=unsound-stats $_kv
		return 1
	fi
	# The fast path: the lab's hypervisor carries scripts/xen-patches (LAB_XEN_PATCHES=1).
	_want=$(lab_want_paging_ops)
	case " $_kv " in
	*" paging_ops=$_want "*) ;;
	*)
		lab_result "postcopy-$_l" FAIL reason=paging-ops-not-$_want $_kv
		return 1
		;;
	esac
	if ! _after=$(lab_progress_after "$n" "$_seq0"); then
		lab_result "postcopy-$_l" FAIL reason=no-progress-after $_kv
		pc_dump "$_l"
		return 1
	fi
	lab_result "postcopy-$_l" PASS $_kv seq_after=$_after
	# Where the downtime went (the engine's --debug timeline of the pause).
	grep -E 'since pause' "/tmp/pc-$_l.err" | head -n 25 | sed "s/^/lab: pc-$_l: /"
	eval "pc_dt_$(echo "$_l" | tr -c 'a-z0-9\n' _)=\${_dt:-none}"
	return 0
}

# Extra options for every xl-postcopy migrate (e.g. --balloon=false).
PC_MIGRATE_OPTS=${PC_MIGRATE_OPTS:-}
st=0
# The guest kernel logs at loglevel 6 here: its resume messages are the evidence when a
# resumed guest does not go on.
lab_create_guest "$n" pvh 'tsc_mode="native"' 'on_reboot="preserve"' \
	"extra = \"console=hvc0 loglevel=6 lab.mib=16 lab.rate=256\"" || {
	lab_result postcopy-dual FAIL reason=create
	exit 1
}
if ! lab_wait_progress "$(lab_console_log "$n")" 3 180 >/dev/null; then
	lab_result postcopy-dual FAIL reason=no-progress-before
	_lab_dump "$n"
	exit 1
fi
# pc_label POLICY: the result label (postcopy-dual, postcopy-record for record+lr+dbscan).
pc_label() {
	case $1 in
	record+lr+dbscan) echo record ;;
	*) echo "$1" | tr '+' '-' ;;
	esac
}
policies=$(echo "${LAB_PC_POLICIES:-dual}" | tr ':' ' ')
for p in $policies; do
	[ $st = 0 ] || break
	pc_migrate "$(pc_label "$p")" --prepaging "$p" || st=1
done
if [ $st = 0 ]; then
	# The same guest with xl migrate, measured by the same ruler.
	id=$(lab_domid "$n")
	seq0=$(lab_last_progress "$(lab_console_log "$n")")
	lab_watch_start "$id" xl
	t0=$(lab_now)
	if lab_migrate_local "$n"; then
		wall=$(lab_since "$t0")
		xdt=$(lab_watch_end xl)
		xbytes=$(tr -dc 0-9 <"/tmp/migrate-$n.bytes" 2>/dev/null)
		if after=$(lab_progress_after "$n" "$seq0"); then
			_kv=
			for p in $policies; do
				l=$(pc_label "$p")
				v=$(echo "$l" | tr -c 'a-z0-9\n' _)
				w=none
				eval "w=\${pc_dt_$v:-none}"
				_kv="$_kv postcopy_${v}_downtime_ms=$(jget "/tmp/pc-$l.json" downtime_ms) postcopy_${v}_watched_ms=$w"
				_kv="$_kv postcopy_${v}_bytes=$(jget "/tmp/pc-$l.json" total_bytes) ${v}_network_faults=$(jget "/tmp/pc-$l.json" network_faults)"
			done
			# shellcheck disable=SC2086 # _kv is a list of key=value words
			lab_result xl-vs-postcopy PASS "xl_downtime_ms=${xdt:-none}" "xl_bytes=${xbytes:-unknown}" "xl_wall_s=$wall" $_kv seq_after="$after"
		else
			lab_watch_end xl >/dev/null
			lab_result xl-vs-postcopy FAIL reason=no-progress-after-xl-migrate
			st=1
		fi
	else
		lab_watch_end xl >/dev/null
		lab_result xl-vs-postcopy FAIL reason=xl-migrate
		st=1
	fi
fi
[ "$LAB_KEEP_GUESTS" = 1 ] || { [ -n "$(lab_domid "$n")" ] && xl destroy "$n"; }

# PV: post-copy refused with the reason, pre-copy done by xl migrate.
if lab_create_guest "$pv" pv && lab_wait_progress "$(lab_console_log "$pv")" 3 180 >/dev/null; then
	if xl-postcopy migrate -s '' -C "/tmp/$pv.cfg" --mode postcopy "$pv" localhost >/tmp/pv-refuse.out 2>&1; then
		lab_result pv-refusal FAIL reason=postcopy-accepted
		st=1
	elif ! grep -q -- '--mode precopy' /tmp/pv-refuse.out; then
		lab_result pv-refusal FAIL reason=message
		cat /tmp/pv-refuse.out
		st=1
	else
		seq0=$(lab_last_progress "$(lab_console_log "$pv")")
		if xl-postcopy migrate -s '' -C "/tmp/$pv.cfg" --mode precopy "$pv" localhost >/tmp/pv-pre.out 2>&1; then
			_log=$(lab_console_log "$pv")
			if s=$(lab_wait_progress "$_log" $((seq0 + 2)) 90); then
				lab_result pv-refusal PASS "refusal=$(head -n 1 /tmp/pv-refuse.out | tr ' ' _ | cut -c1-120)" precopy=ok seq_before="$seq0" seq_after="$s"
			else
				lab_result pv-refusal FAIL reason=no-progress-after-precopy "log=$_log" "seq=$s"
				tail -n 20 /tmp/pv-pre.out
				xl list
				_lab_dump "$pv"
				st=1
			fi
		else
			lab_result pv-refusal FAIL reason=precopy-failed
			tail -n 20 /tmp/pv-pre.out
			st=1
		fi
	fi
else
	lab_result pv-refusal FAIL reason=create
	st=1
fi
[ "$LAB_KEEP_GUESTS" = 1 ] || { [ -n "$(lab_domid "$pv")" ] && xl destroy "$pv"; }
exit $st
