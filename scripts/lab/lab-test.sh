#!/usr/bin/env bash
# Runs the nested Xen lab end to end: installs what it needs (Debian packages), builds
# the hypervisor and the dom0/domU images (cached in $LAB_CACHE), boots Xen + dom0 under
# QEMU TCG, lets dom0 run the scenarios, and reports their LAB-RESULT lines.
# Exit status: 0 when every scenario passed, 1 when one failed or the lab never finished.
# Environment: see scripts/lab/README.md (LAB_CACHE, LAB_TIMEOUT, LAB_EXTRA_BINS,
# LAB_EXTRA_SCENARIOS, LAB_GUEST_BINS, LAB_GUEST_BALLOON_ARGS, LAB_VERBOSE).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

lab_require_root
t0=$SECONDS
lab_build_all
log "images ready after $((SECONDS - t0)) s"

serial=$LAB_CACHE/serial-test.log
timeout_s=${LAB_TIMEOUT:-1800}
lab_qemu_args test
log "booting Xen + dom0 under QEMU TCG (timeout ${timeout_s} s, serial log $serial)"
# Show the lab's own lines as they come (all of the console with LAB_VERBOSE=1).
filter='^(lab:|LAB-|guest:)|\(XEN\) .*([Pp]anic|crash|Triple fault)|Kernel panic|BUG:|Call Trace'
[[ ${LAB_VERBOSE:-0} == 1 ]] && filter=.
t1=$SECONDS
qemu_rc=0
# QEMU runs in the background writing the serial log; `tail --pid` follows the log until
# QEMU ends. The trap makes an interrupted run stop its QEMU too (timeout runs in its own
# process group, which Ctrl-C does not reach).
: >"$serial" # exists before tail opens it, whenever the background job gets to run
timeout -k 10 "$timeout_s" "${LAB_QEMU[@]}" -serial stdio </dev/null >>"$serial" 2>&1 &
qemu_pid=$!
trap 'kill "$qemu_pid" 2>/dev/null || true' EXIT
tail -n +1 -f --pid="$qemu_pid" "$serial" | tr -d '\r' | { grep -E --line-buffered "$filter" >&2 || true; } ||
	log "following the serial log failed; the run goes on (see $serial)"
wait "$qemu_pid" || qemu_rc=$?
trap - EXIT
log "QEMU ended after $((SECONDS - t1)) s (status $qemu_rc)"

mapfile -t results < <(tr -d '\r' <"$serial" | grep -o 'LAB-RESULT .*' || true)
echo "---- lab results (serial log: $serial)"
fails=0
for r in "${results[@]}"; do
	echo "$r"
	[[ $(awk '{ print $3 }' <<<"$r") == PASS ]] || fails=$((fails + 1))
done
if ! grep -q 'LAB-DONE' "$serial"; then
	echo "LAB-RESULT lab FAIL reason=no-LAB-DONE timeout_s=$timeout_s qemu_status=$qemu_rc"
	echo "---- last 30 lines of $serial"
	tail -n 30 "$serial"
	exit 1
fi
if [[ ${#results[@]} -eq 0 ]]; then
	echo "LAB-RESULT lab FAIL reason=no-scenario-ran"
	exit 1
fi
echo "---- ${#results[@]} scenario results, $fails failed, $((SECONDS - t0)) s in all"
[[ $fails -eq 0 ]]
