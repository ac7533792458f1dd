#!/bin/sh
# Built-in: a receiver process that dies after the switchover (issue 13). Xen 4.17 refuses a
# second vm_event paging agent while the dead one's ring exists (docs/RELIABILITY.md), so the
# destination's copy cannot get its missing pages any more; what must hold is that the guest
# is not lost. A running PVH guest is migrated as in 52 (-s /tmp/lab-ssh, recovery for 20 s);
# mid post-copy the receiver is killed (SIGKILL). The source tries again for 20 s, gives up
# with its copy paused with every page, and says so. `xl-postcopy migrate --abandon` must
# refuse while the destination still has lab-prd--incoming; once the admin destroyed it, it
# resumes the paused copy here, the guest as it was at the switchover. Checked: the refusal,
# exit 0, the domain in `xl list` exactly once as lab-prd, its progress counter going on from
# where it was at the switchover with errors=0, and no source state record left.
# lab-timeout: 900
# shellcheck source-path=SCRIPTDIR source=../lab-lib.sh
. /lab/lab-lib.sh
n=lab-prd
e=/tmp/pc-rdeath.err
lab_ssh_transport
lab_recovery_guest "$n" postcopy-receiver-death || exit 1

t0=$(lab_now)
xl-postcopy migrate -s /tmp/lab-ssh --receiver xl-postcopy -C "/tmp/$n.cfg" --json --debug \
	--recover-timeout 20s "$n" localhost >/dev/null 2>"$e" &
pid=$!
why=
refused=no
rc1=none
rc=none
_end=$(awk '{ printf "%d\n", $1 + 600 }' /proc/uptime)
while ! grep -q 'resumed received' "$e" 2>/dev/null; do
	if ! kill -0 "$pid" 2>/dev/null || [ "$(awk '{ printf "%d\n", $1 }' /proc/uptime)" -ge "$_end" ]; then
		why=no-resume
		break
	fi
	sleep 1
done
if [ -z "$why" ]; then
	sleep 2
	lab_kill_matching 'migrate-receive --urgent-listen' || why=no-receiver-to-kill
	lab_log "postcopy-receiver-death: killed the receiver at +$(lab_since "$t0") s"
fi
wait "$pid"
rc1=$?
lab_log "postcopy-receiver-death: the source ended (exit $rc1) at +$(lab_since "$t0") s"
grep -E 'no new link|gave up|PAUSED|resume' "$e" | grep -v DEBUG | tail -n 3 | sed 's/^/lab: pc-rdeath: /'
xl list | sed 's/^/lab: pc-rdeath xl list: /'
if [ -z "$why" ]; then
	# The destination's copy is still there: --abandon must refuse.
	if xl-postcopy migrate --abandon "$n" localhost >/tmp/pc-rdeath-1.out 2>&1; then
		why=abandon-not-refused
	elif grep -q 'still has a copy' /tmp/pc-rdeath-1.out; then
		refused=yes
	fi
	sed 's/^/lab: pc-rdeath refused: /' /tmp/pc-rdeath-1.out
	xl destroy "$n--incoming"
	xl-postcopy migrate --abandon "$n" localhost >/tmp/pc-rdeath-2.out 2>&1
	rc=$?
	sed 's/^/lab: pc-rdeath abandon: /' /tmp/pc-rdeath-2.out
fi
log=$LAB_CONSOLE_DIR/guest-$n.log
base=$(lab_last_progress "$log")
kv="source_rc=$rc1 refused=$refused rc=$rc seq_before=$seq0 seq_at_abandon=${base:-none} wall_s=$(lab_since "$t0")"
st=0
if [ -n "$why" ]; then
	lab_result postcopy-receiver-death FAIL "reason=$why" $kv
	st=1
elif [ "$rc1" = 0 ]; then
	lab_result postcopy-receiver-death FAIL reason=source-said-ok $kv
	st=1
elif [ "$refused" != yes ]; then
	lab_result postcopy-receiver-death FAIL reason=not-refused $kv
	st=1
elif [ "$rc" != 0 ]; then
	lab_result postcopy-receiver-death FAIL "reason=abandon-exit-$rc" $kv
	st=1
elif [ "$(xl list | awk -v n="$n" '$1 == n || $1 == n"--incoming" || $1 == n"--migratedaway"' | wc -l)" != 1 ] ||
	[ -z "$(lab_domid "$n")" ]; then
	lab_result postcopy-receiver-death FAIL reason=not-exactly-once $kv
	xl list
	st=1
elif [ -n "$(xl-postcopy list --all --json 2>/dev/null | tr -d ' \n' | grep -o '"domain":"'"$n"'","role":"source"')" ]; then
	lab_result postcopy-receiver-death FAIL reason=state-record-left $kv
	xl-postcopy list --all
	st=1
elif ! after=$(lab_wait_progress "$log" $((base + 2)) 90) ||
	[ "$(lab_last_progress_line "$log" | sed -n 's/.*errors=\([0-9]*\).*/\1/p')" != 0 ]; then
	lab_result postcopy-receiver-death FAIL reason=no-progress-after $kv
	tail -n 5 "$log"
	st=1
else
	lab_result postcopy-receiver-death PASS $kv seq_after="$after"
fi
if [ $st != 0 ]; then
	echo "--- xl-postcopy stderr (receiver death)"
	grep -v 'since pause' "$e" | tail -n 60
	xl list
	_lab_dump "$n"
fi
[ "$LAB_KEEP_GUESTS" = 1 ] || { [ -n "$(lab_domid "$n")" ] && xl destroy "$n"; }
for d in "$n--incoming" "$n--migratedaway"; do
	[ -n "$(lab_domid "$d")" ] && xl destroy "$d"
done
# The dead receiver's record (this lab's source and destination are one host).
rm -f "/var/lib/xl-postcopy/migrations/$n.dest.json"
exit $st
