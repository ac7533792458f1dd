#!/bin/sh
# Built-in: post-copy migration of a PVH guest whose balloon moves across the migration
# (issue 10). guest-balloon runs in the guest and holds its target from its release on;
# the administrator moves the balloon anyway, twice:
#   1. `xl mem-set` on the source while the destination is being set up: the guest gives
#      pages back between the source's page listing and the pause; the pause's page set
#      must drop them (dropped_pages > 0), none may be read or sent (unreadable_reads = 0,
#      xen.unreadable_pages = 0: the old code sent such pages as zeroes);
#   2. `xl mem-set` on the destination right after the resume (xl create set its target to
#      the config's 128 MiB, which the guest follows at resume; 104 MiB takes 24 MiB back):
#      the guest gives back pages that are still arriving (Linux scrubs a page before it
#      gives it back, so most are fetched first; a load that finds the gfn gone, or a
#      DROP_PAGE, counts in guest_dropped_pages); the receiver must go on. (88 MiB OOM-killed
#      the workload: the guest's kernel needs ~46 MiB.)
# Then: exit 0, verified, the guest's counter continues with errors=0. The receiver takes
# the per-gfn paging path (--dest-paging-ops per-gfn: one hypercall a page, as on a
# hypervisor without scripts/xen-patches), so both paths pass a post-copy scenario.
# lab-timeout: 900
# shellcheck source-path=SCRIPTDIR source=../lab-lib.sh
. /lab/lab-lib.sh
n=lab-pb
err=/tmp/pb.err
j=/tmp/pb.json

# wait_line PATTERN SECONDS waits until the migration's --debug output shows PATTERN.
wait_line() {
	_i=0
	while ! grep -q -- "$1" "$err" 2>/dev/null; do
		[ "$_i" -lt $(($2 * 10)) ] || return 1
		kill -0 "$mpid" 2>/dev/null || return 1
		sleep 0.1
		_i=$((_i + 1))
	done
}

lab_create_guest "$n" pvh 'tsc_mode="native"' 'on_reboot="preserve"' \
	"extra = \"console=hvc0 loglevel=6 lab.mib=16 lab.rate=256\"" || {
	lab_result postcopy-balloon FAIL reason=create
	exit 1
}
log=$(lab_console_log "$n")
if ! lab_wait_progress "$log" 3 180 >/dev/null; then
	lab_result postcopy-balloon FAIL reason=no-progress-before
	_lab_dump "$n"
	exit 1
fi
id=$(lab_domid "$n")
i=0
until [ "$(xenstore-read "/local/domain/$id/data/balloon/state" 2>/dev/null)" = running ] || [ $i -ge 60 ]; do
	sleep 1
	i=$((i + 1))
done
seq0=$(lab_last_progress "$log")
mem0=$(lab_guest_mem "$n")
xl-postcopy migrate -s '' -C "/tmp/$n.cfg" --json --debug --dest-paging-ops per-gfn "$n" localhost >"$j" 2>"$err" &
mpid=$!
moved1=no moved2=no
# 1. The destination domain exists: the source has listed its pages and not paused yet.
if wait_line 'msg="new domain .* who=xen-dest' 300; then
	# The source waits (stopped) until the guest has given the pages back: the
	# destination's setup can end before the balloon moved, and then the pause would
	# find nothing to drop. 30 s at most, well inside the 60 s progress timeout.
	kill -STOP "$mpid"
	xl mem-set "$n" 100 && moved1=yes
	i=0
	while [ "$(lab_guest_mem "$n")" -gt 101 ] && [ $i -lt 300 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	kill -CONT "$mpid"
	lab_log "postcopy-balloon: source balloon moved to 100 MiB during the setup (now $(lab_guest_mem "$n") MiB, after $((i / 10)) s)"
fi
# 2. Right after the resume, while most pages are still to come.
if wait_line 'resumed received' 300; then
	xl mem-set "$n--incoming" 104 && moved2=yes
	lab_log "postcopy-balloon: destination balloon moved to 104 MiB after the resume"
fi
wait "$mpid"
rc=$?
kv="rc=$rc moved_at_source=$moved1 moved_at_dest=$moved2 mem_before_mib=$mem0 verified=$(jget "$j" verified)"
kv="$kv verified_from=$(jget "$j" verified_from) verified_pages=$(jget "$j" verified_pages) guest_written_pages=$(jget "$j" guest_written_pages)"
kv="$kv resent_pages=$(jget "$j" resent_pages) early_core_redirtied=$(jget "$j" early_core_redirtied) redundant_pages=$(jget "$j" redundant_pages)"
kv="$kv dropped_pages=$(jget "$j" dropped_pages) added_pages=$(jget "$j" added_pages) guest_dropped_pages=$(jget "$j" guest_dropped_pages)"
kv="$kv unreadable_reads=$(jget "$j" unreadable_reads) unreadable_pages=$(jget2 "$j" unreadable_pages) absent_pages=$(jget2 "$j" absent_pages)"
kv="$kv pages=$(jget "$j" pages) pages_sent=$(jget "$j" pages_sent) network_faults=$(jget "$j" network_faults)"
kv="$kv downtime_ms=$(jget "$j" downtime_ms) total_ms=$(jget "$j" total_time_ms) balloon_hold=$(jget2 "$j" hold | cut -c1-8)"
kv="$kv $(lab_dest_kv "$err")"
grep -E 'page set in the pause|dropped|trying again' "$err" | head -n 10 | sed 's/^/lab: pb: /'
reason=
if [ "$rc" != 0 ]; then
	reason=exit-$rc
elif [ "$moved1" != yes ] || [ "$moved2" != yes ]; then
	reason=balloon-not-moved
elif [ "$(jget "$j" verified)" != true ] || [ "$(jget "$j" verified_from)" != memory ]; then
	reason=not-verified
elif [ "$(jget "$j" resent_pages)" != "$(jget "$j" early_core_redirtied)" ] || [ "$(jget "$j" redundant_pages)" != 0 ]; then
	reason=pages-sent-twice
elif [ "$(jget "$j" dropped_pages)" = 0 ]; then
	reason=no-page-dropped-in-the-pause
elif ! echo " $kv " | grep -q ' paging_ops=per-gfn '; then
	reason=paging-ops-not-per-gfn
elif [ "$(jget "$j" unreadable_reads)" != 0 ] || [ "$(jget2 "$j" unreadable_pages)" != 0 ]; then
	reason=unreadable-pages
elif ! after=$(lab_progress_after "$n" "$seq0"); then
	reason=no-progress-after
fi
if [ -n "$reason" ]; then
	lab_result postcopy-balloon FAIL reason=$reason $kv
	tail -n 40 "$err"
	xl list
	_lab_dump "$n"
	st=1
else
	lab_result postcopy-balloon PASS $kv mem_after_mib="$(lab_guest_mem "$n")" seq_before="$seq0" seq_after="$after"
	st=0
fi
[ "$LAB_KEEP_GUESTS" = 1 ] || { [ -n "$(lab_domid "$n")" ] && xl destroy "$n"; }
[ -n "$(lab_domid "$n--incoming")" ] && xl destroy "$n--incoming"
[ -n "$(lab_domid "$n--migratedaway")" ] && xl destroy "$n--migratedaway"
exit $st
