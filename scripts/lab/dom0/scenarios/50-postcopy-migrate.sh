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

# pc_migrate LABEL [xl-postcopy option ...]: one post-copy migration of $n with checks
# (lab_pc_migrate in lab-lib.sh).
pc_migrate() { lab_pc_migrate "$n" "$@"; }

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
