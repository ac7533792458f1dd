#!/bin/sh
# Built-in: a source process that dies after the switchover (issue 13). A running PVH guest
# is migrated by xl-postcopy through a transport that is a process (-s /tmp/lab-ssh, as in
# 52); mid post-copy the source's xl-postcopy is killed (SIGKILL). The guest runs on at the
# destination, waiting for the pages it lacks; the receiver keeps it and waits for a new
# link; `xl-postcopy list` shows the source's record with its process gone. Then
# `xl-postcopy migrate --resume` takes the migration over from the paused copy
# (NAME--migratedaway) and the state record: checked exit 0, taken_over, verified from the
# destination's memory, no page placed twice, the receiver's one recovery, the guest's
# progress counter going on, the domain in `xl list` exactly once and no state record left.
# lab-timeout: 1200
# shellcheck source-path=SCRIPTDIR source=../lab-lib.sh
. /lab/lab-lib.sh
n=lab-pct
e=/tmp/pc-takeover.err
j2=/tmp/pc-takeover2.json
e2=/tmp/pc-takeover2.err
lab_ssh_transport
lab_recovery_guest "$n" postcopy-takeover || exit 1

# wait_log PATTERN TIMEOUT: until $e holds a line matching PATTERN while the first source
# runs; fails otherwise.
wait_log() {
	_end=$(awk -v t="$2" '{ printf "%d\n", $1 + t }' /proc/uptime)
	while :; do
		grep -q -E "$1" "$e" 2>/dev/null && return 0
		kill -0 "$pid" 2>/dev/null || return 1
		[ "$(awk '{ printf "%d\n", $1 }' /proc/uptime)" -lt "$_end" ] || return 1
		sleep 1
	done
}

t0=$(lab_now)
xl-postcopy migrate -s /tmp/lab-ssh --receiver xl-postcopy -C "/tmp/$n.cfg" --json --debug \
	--recover-timeout 2m "$n" localhost >/dev/null 2>"$e" &
pid=$!
why=
gone=no
rc=none
if ! wait_log 'resumed received' 600; then
	why=no-resume
else
	sleep 2
	kill -9 "$pid"
	wait "$pid" 2>/dev/null
	lab_log "postcopy-takeover: killed the source process $pid at +$(lab_since "$t0") s"
	sleep 2
	xl-postcopy list 2>&1 | sed 's/^/lab: pc-takeover list: /'
	# The source's record: its process gone (the receiver's runs).
	xl-postcopy list 2>/dev/null | awk -v n="$n" '$1 == n && $2 == "source"' | grep -q 'process gone' && gone=yes
	xl list | sed 's/^/lab: pc-takeover xl list: /'
	xl-postcopy migrate --resume --json --debug "$n" localhost >"$j2" 2>"$e2"
	rc=$?
fi
wall=$(lab_since "$t0")
dl=$(grep -E 'msg="domain [0-9]+ complete: .* who=migrate-receive' "$e" "$e2" 2>/dev/null | tail -n 1)
dest_rec=$(echo "$dl" | sed -n 's/.* recoveries \([0-9]*\) .*/\1/p')
kv="listed_gone=$gone rc=$rc taken_over=$(jget "$j2" taken_over) recoveries=$(jget "$j2" recoveries) dest_recoveries=${dest_rec:-none}"
kv="$kv paused_ms=$(jget "$j2" postcopy_paused_ms) pages_sent=$(jget "$j2" pages_sent) redundant_pages=$(jget "$j2" redundant_pages)"
kv="$kv verified=$(jget "$j2" verified) verified_from=$(jget "$j2" verified_from) verified_pages=$(jget "$j2" verified_pages) wall_s=$wall seq_before=$seq0"
st=0
if [ -n "$why" ]; then
	lab_result postcopy-takeover FAIL "reason=$why" $kv
	st=1
elif [ "$rc" != 0 ]; then
	lab_result postcopy-takeover FAIL "reason=exit-$rc" $kv
	st=1
elif [ "$gone" != yes ]; then
	lab_result postcopy-takeover FAIL reason=list-not-gone $kv
	st=1
elif [ "$(jget "$j2" taken_over)" != true ] || [ "$dest_rec" != 1 ]; then
	lab_result postcopy-takeover FAIL reason=not-taken-over $kv
	st=1
elif [ "$(jget "$j2" verified)" != true ] || [ "$(jget "$j2" verified_from)" != memory ] ||
	[ "$(jget "$j2" redundant_pages)" != 0 ] || [ -n "$(jget "$j2" downtime_ms)" ]; then
	lab_result postcopy-takeover FAIL reason=unsound-stats $kv
	st=1
elif [ "$(xl list | awk -v n="$n" '$1 == n || $1 == n"--incoming" || $1 == n"--migratedaway"' | wc -l)" != 1 ] ||
	[ -z "$(lab_domid "$n")" ]; then
	lab_result postcopy-takeover FAIL reason=not-exactly-once $kv
	xl list
	st=1
elif [ -n "$(xl-postcopy list --all --json 2>/dev/null | grep '"domain": "'"$n"'"')" ]; then
	lab_result postcopy-takeover FAIL reason=state-record-left $kv
	xl-postcopy list --all
	st=1
elif ! after=$(lab_progress_after "$n" "$seq0"); then
	lab_result postcopy-takeover FAIL reason=no-progress-after $kv
	st=1
else
	lab_result postcopy-takeover PASS $kv seq_after="$after"
fi
if [ $st != 0 ]; then
	echo "--- first source's stderr (takeover)"
	grep -v 'since pause' "$e" | tail -n 60
	echo "--- take-over's stderr"
	grep -v 'since pause' "$e2" | tail -n 60
	xl list
	_lab_dump "$n"
fi
grep -E 'link broken|link back|reconnect attempt|postcopy-paused|source is back|new link|taking over' "$e" "$e2" 2>/dev/null | head -n 20 | sed 's/^/lab: pc-takeover: /'
[ "$LAB_KEEP_GUESTS" = 1 ] || { [ -n "$(lab_domid "$n")" ] && xl destroy "$n"; }
for d in "$n--incoming" "$n--migratedaway"; do
	[ -n "$(lab_domid "$d")" ] && xl destroy "$d"
done
# A receiver left waiting (a failed take-over) would hold the next scenarios' memory.
lab_kill_matching migrate-receive
exit $st
