#!/bin/sh
# make lab-bench: a heavy writer (issue 12) — a PVH guest with 2 vCPUs and 192 MiB whose
# workload rewrites 48 MiB continuously (lab.rate pages a second, LAB_HW_RATE, default
# 12288: 48 MiB/s, faster than xl's local stream of ~11 MB/s, so xl migrate uses all its
# rounds), migrated with xl migrate and with xl-postcopy migrate (each policy of
# LAB_PC_POLICIES) in the same run, downtimes by the same outside ruler.
# LAB-RESULT heavy-writer PASS needs every migration sound (verified from memory, nothing
# sent twice, the counter going on with errors=0); the comparison is in its figures:
# xl_* and pc_* (the first policy), pc_<policy>_* for every policy, ram_bytes, and the
# ratios wall_ratio = pc_wall_s / xl_wall_s, downtime_ratio, bytes_ratio = pc_bytes / ram_bytes.
# lab-timeout: 2400
# shellcheck source-path=SCRIPTDIR source=../dom0/lab-lib.sh
. /lab/lab-lib.sh
n=lab-hw
rate=${LAB_HW_RATE:-12288}
lab_create_guest "$n" pvh 'tsc_mode="native"' 'on_reboot="preserve"' 'vcpus = 2' 'memory = 192' 'maxmem = 192' \
	"extra = \"console=hvc0 loglevel=6 lab.mib=48 lab.rate=$rate\"" || {
	lab_result heavy-writer FAIL reason=create
	exit 1
}
if ! lab_wait_progress "$(lab_console_log "$n")" 5 240 >/dev/null; then
	lab_result heavy-writer FAIL reason=no-progress-before
	_lab_dump "$n"
	exit 1
fi
# What the guest really dirties a second (the workload's own count, over 5 s).
d0=$(lab_progress_field "$(lab_console_log "$n")" dirtied)
sleep 5
d1=$(lab_progress_field "$(lab_console_log "$n")" dirtied)
dirty_mib_s=$(awk -v a="${d0:-0}" -v b="${d1:-0}" 'BEGIN { printf "%.1f", (b - a) * 4096 / 5 / 1048576 }')
ram_bytes=$((192 * 1048576))
st=0
kv="rate=$rate dirty_mib_s=$dirty_mib_s ram_bytes=$ram_bytes vcpus=2"

# xl migrate first: the guest is in the same state for both tools (no balloon on the way).
id=$(lab_domid "$n")
seq0=$(lab_last_progress "$(lab_console_log "$n")")
lab_watch_start "$id" hw-xl
t0=$(lab_now)
if lab_migrate_local "$n"; then
	xl_wall=$(lab_since "$t0")
	xl_dt=$(lab_watch_end hw-xl)
	xl_bytes=$(tr -dc 0-9 <"/tmp/migrate-$n.bytes" 2>/dev/null)
	if ! lab_progress_after "$n" "$seq0" >/dev/null; then
		kv="$kv reason=no-progress-after-xl"
		st=1
	fi
else
	lab_watch_end hw-xl >/dev/null
	kv="$kv reason=xl-migrate"
	st=1
fi
kv="$kv xl_wall_s=${xl_wall:-none} xl_downtime_ms=${xl_dt:-none} xl_bytes=${xl_bytes:-none}"
grep -E 'iteration|Saving memory|dirty' "/tmp/migrate-$n.log" 2>/dev/null | tail -n 8 | sed 's/^/lab: hw-xl: /'

first=
for p in $(echo "${LAB_PC_POLICIES:-dual}" | tr ':' ' '); do
	[ $st = 0 ] || break
	l=hw-$(echo "$p" | tr '+' '-')
	v=$(echo "$l" | tr -c 'a-z0-9\n' _)
	if ! lab_pc_migrate "$n" "$l" --prepaging "$p"; then
		st=1
		break
	fi
	j=/tmp/pc-$l.json
	eval "w=\${pc_dt_$v:-none} pw=\${pc_wall_$v:-none}"
	pkv="wall_s=$pw downtime_ms=$w bytes=$(jget "$j" total_bytes) network_faults=$(jget "$j" network_faults)"
	[ -n "$first" ] || { first=$p; kv="$kv $(echo " $pkv" | sed 's/ / pc_/g')"; }
	kv="$kv $(echo " $pkv" | sed "s/ / pc_${v}_/g")"
done
# Ratios of the first policy against xl (awk: busybox sh has integers only).
pcw=$(echo " $kv " | sed -n 's/.* pc_wall_s=\([0-9.]*\) .*/\1/p')
pcd=$(echo " $kv " | sed -n 's/.* pc_downtime_ms=\([0-9.]*\) .*/\1/p')
pcb=$(echo " $kv " | sed -n 's/.* pc_bytes=\([0-9]*\) .*/\1/p')
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "none"; else printf "%.3f", a / b }'; }
kv="$kv wall_ratio=$(ratio "$pcw" "$xl_wall") downtime_ratio=$(ratio "$pcd" "$xl_dt") bytes_ratio=$(ratio "$pcb" "$ram_bytes")"
# shellcheck disable=SC2086 # kv is a list of key=value words
if [ $st = 0 ]; then lab_result heavy-writer PASS $kv; else lab_result heavy-writer FAIL $kv; fi
[ "$LAB_KEEP_GUESTS" = 1 ] || { [ -n "$(lab_domid "$n")" ] && xl destroy "$n"; }
exit $st
