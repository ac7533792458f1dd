#!/bin/sh
# Built-in: post-copy that survives broken links (issue 13). A running PVH guest is migrated
# by xl-postcopy through a transport that is a process, as ssh is (-s /tmp/lab-ssh: `CMD HOST
# COMMAND...` runs COMMAND, as ssh would at HOST). Mid post-copy the urgent stream's relay
# process is killed, and once the link is back, both relays of the new link: each break
# pauses the migration (postcopy-paused), the source runs the transport again, the
# destination says which pages it holds, and the migration goes on. Then the receiver is
# stopped (SIGSTOP) for 25 s: its link goes silent, with no FIN or RST, and the source must
# notice within its link timeout (10 s, the default), pause, and recover once the receiver
# runs again (SIGCONT) and sees the silence itself. recoveries equal to breaks also shows
# that the default link timeout raised no false alarm on this slow, emulated dom0. Checked: exit 0,
# recoveries equal to the breaks made, on both sides; verified from the destination's
# memory; no page placed twice; the guest's progress counter goes on; the domain is in
# `xl list` exactly once, with no --incoming or --migratedaway copy left.
# lab-timeout: 1200
# shellcheck source-path=SCRIPTDIR source=../lab-lib.sh
. /lab/lab-lib.sh
n=lab-pcr
j=/tmp/pc-recover.json
e=/tmp/pc-recover.err
lab_ssh_transport
lab_recovery_guest "$n" postcopy-recover || exit 1

# wait_log PATTERN COUNT TIMEOUT: until $e holds COUNT lines matching PATTERN and the
# migration still runs; fails otherwise.
wait_log() {
	_end=$(awk -v t="$3" '{ printf "%d\n", $1 + t }' /proc/uptime)
	while :; do
		_c=$(grep -c -E "$1" "$e" 2>/dev/null)
		[ "${_c:-0}" -lt "$2" ] || return 0
		kill -0 "$pid" 2>/dev/null || return 1
		[ "$(awk '{ printf "%d\n", $1 }' /proc/uptime)" -lt "$_end" ] || return 1
		sleep 1
	done
}

t0=$(lab_now)
xl-postcopy migrate -s /tmp/lab-ssh --receiver xl-postcopy -C "/tmp/$n.cfg" --json --debug \
	--recover-timeout 2m "$n" localhost >"$j" 2>"$e" &
pid=$!
breaks=0
stopped=no
listed=no
why=
# Break 1: the urgent stream's relay (the second "ssh") dies mid post-copy.
if wait_log 'resumed received' 1 600; then
	sleep 2
	if lab_kill_matching 'migrate-receive --urgent-attach'; then
		breaks=1
		lab_log "postcopy-recover: killed the urgent relay at +$(lab_since "$t0") s"
		# Break 2: both relays of the new link, once it is up.
		if wait_log 'link back after' 1 120; then
			sleep 2
			if kill -0 "$pid" 2>/dev/null && lab_kill_matching 'migrate-receive --attach'; then
				breaks=2
				lab_log "postcopy-recover: killed the new link's relays at +$(lab_since "$t0") s"
				# Break 3: the receiver stopped for 25 s, if post-copy still runs.
				if wait_log 'link back after' 2 120; then
					sleep 2
					if kill -0 "$pid" 2>/dev/null && lab_kill_matching 'migrate-receive --urgent-listen' STOP; then
						lab_log "postcopy-recover: stopped the receiver at +$(lab_since "$t0") s"
						# Meanwhile `xl-postcopy list` shows the source paused.
						sleep 18
						xl-postcopy list --json >/tmp/pc-list.json 2>&1
						xl-postcopy list 2>&1 | sed 's/^/lab: pc-recover list: /'
						grep -q '"state": "postcopy-paused"' /tmp/pc-list.json && listed=yes
						sleep 7
						lab_kill_matching 'migrate-receive --urgent-listen' CONT
						lab_log "postcopy-recover: continued the receiver at +$(lab_since "$t0") s"
						breaks=3
						stopped=yes
						# The source must have paused before the receiver ran again.
						if ! grep -q 'link to the destination broken after GO (.*no record from the peer' "$e"; then
							why=stop-not-noticed
						fi
					fi
				fi
			fi
		else
			why=no-first-recovery
		fi
	else
		why=no-relay-to-kill
	fi
else
	why=no-resume
fi
wait "$pid"
rc=$?
wall=$(lab_since "$t0")
dl=$(grep -E 'msg="domain [0-9]+ complete: .* who=migrate-receive' "$e" | tail -n 1)
dest_rec=$(echo "$dl" | sed -n 's/.* recoveries \([0-9]*\) .*/\1/p')
dest_paused=$(echo "$dl" | sed -n 's/.* postcopy_paused_ms \([0-9.]*\).*/\1/p')
kv="breaks=$breaks receiver_stopped=$stopped listed_paused=$listed recoveries=$(jget "$j" recoveries) dest_recoveries=${dest_rec:-none} paused_ms=$(jget "$j" postcopy_paused_ms)"
kv="$kv dest_paused_ms=${dest_paused:-none} lost_pages=$(jget "$j" recovery_lost_pages) resent_pages=$(jget "$j" resent_pages)"
kv="$kv early_core_redirtied=$(jget "$j" early_core_redirtied) redundant_pages=$(jget "$j" redundant_pages) verified=$(jget "$j" verified)"
kv="$kv verified_from=$(jget "$j" verified_from) verified_pages=$(jget "$j" verified_pages) total_ms=$(jget "$j" total_time_ms) wall_s=$wall seq_before=$seq0"
st=0
if [ -n "$why" ]; then
	lab_result postcopy-recover FAIL "reason=$why" "rc=$rc" $kv
	st=1
elif [ "$rc" != 0 ]; then
	lab_result postcopy-recover FAIL "reason=exit-$rc" $kv
	st=1
elif [ "$stopped" = yes ] && [ "$listed" != yes ]; then
	lab_result postcopy-recover FAIL reason=list-not-paused $kv
	cat /tmp/pc-list.json
	st=1
elif [ -n "$(xl-postcopy list --all --json 2>/dev/null | grep '"domain": "'"$n"'"')" ]; then
	lab_result postcopy-recover FAIL reason=state-record-left $kv
	xl-postcopy list --all
	st=1
elif [ "$(jget "$j" recoveries)" != "$breaks" ] || [ "$dest_rec" != "$breaks" ]; then
	lab_result postcopy-recover FAIL reason=recoveries-not-breaks $kv
	st=1
elif [ "$(jget "$j" verified)" != true ] || [ "$(jget "$j" verified_from)" != memory ] ||
	[ "$(jget "$j" redundant_pages)" != 0 ] ||
	[ "$(jget "$j" recovery_lost_pages)" -gt "$(jget "$j" resent_pages)" ]; then
	lab_result postcopy-recover FAIL reason=unsound-stats $kv
	st=1
elif [ "$(xl list | awk -v n="$n" '$1 == n || $1 == n"--incoming" || $1 == n"--migratedaway"' | wc -l)" != 1 ] ||
	[ -z "$(lab_domid "$n")" ]; then
	lab_result postcopy-recover FAIL reason=not-exactly-once $kv
	xl list
	st=1
elif ! after=$(lab_progress_after "$n" "$seq0"); then
	lab_result postcopy-recover FAIL reason=no-progress-after $kv
	st=1
else
	lab_result postcopy-recover PASS $kv seq_after="$after"
fi
if [ $st != 0 ]; then
	echo "--- xl-postcopy stderr (recover)"
	grep -v 'since pause' "$e" | tail -n 80
	xl list
	_lab_dump "$n"
fi
grep -E 'link broken|link back|reconnect attempt|postcopy-paused|source is back|new link' "$e" | head -n 20 | sed 's/^/lab: pc-recover: /'
[ "$LAB_KEEP_GUESTS" = 1 ] || { [ -n "$(lab_domid "$n")" ] && xl destroy "$n"; }
for d in "$n--incoming" "$n--migratedaway"; do
	[ -n "$(lab_domid "$d")" ] && xl destroy "$d"
done
exit $st
