# shellcheck shell=sh
# Helpers for lab scenarios, sourced in dom0 (busybox sh): `. /lab/lab-lib.sh`.
# The scenario contract is described in scripts/lab/README.md; in short:
#   - print results with lab_result NAME PASS|FAIL key=value ...
#   - guests boot /lab/vmlinuz with /lab/guest-initrd.gz; their consoles are logged in
#     $LAB_CONSOLE_DIR/guest-NAME.log (guest-NAME--incoming.log after a local migration).

LAB_GUEST_KERNEL=/lab/vmlinuz
LAB_GUEST_INITRD=/lab/guest-initrd.gz
LAB_CONSOLE_DIR=/var/log/xen/console
LAB_PV_DOMAIN=lab-pv
LAB_PVH_DOMAIN=lab-pvh
LAB_SCENARIO_TIMEOUT=${LAB_SCENARIO_TIMEOUT:-480}
# 1: the built-in scenarios leave their guests running for the scenarios after them.
LAB_KEEP_GUESTS=${LAB_KEEP_GUESTS:-0}
# Kernel command line of the guests; lab.mib / lab.rate are guestprog's buffer size (MiB)
# and dirtying rate (pages per second).
LAB_GUEST_EXTRA=${LAB_GUEST_EXTRA:-console=hvc0 quiet loglevel=3 lab.mib=16 lab.rate=256}
# Set to 1 by the helpers when a step failed once and its retry succeeded.
LAB_RETRIED=0
export LAB_GUEST_KERNEL LAB_GUEST_INITRD LAB_CONSOLE_DIR LAB_PV_DOMAIN LAB_PVH_DOMAIN \
	LAB_SCENARIO_TIMEOUT LAB_GUEST_EXTRA LAB_KEEP_GUESTS

lab_log() { echo "lab: $*"; }

# lab_now prints seconds since dom0 booted (busybox date has no sub-second format).
lab_now() { awk '{ print $1 }' /proc/uptime; }

# lab_since START prints the seconds elapsed since START (a lab_now value), 2 decimals.
lab_since() { awk -v s="$1" '{ printf "%.2f\n", $1 - s }' /proc/uptime; }

# lab_result NAME PASS|FAIL [key=value ...] prints the line the host script collects.
# Values must not contain spaces.
lab_result() {
	_n=$1 _s=$2
	shift 2
	echo "LAB-RESULT $_n $_s $*"
	echo "$_n $_s" >>/tmp/lab-results
}

# lab_guest_cfg NAME pv|pvh [cfg-line ...] writes an xl config for a lab guest to
# /tmp/NAME.cfg (memory=128 maxmem=128 vcpus=1, no devices) and prints its path. Extra
# cfg lines come last, so they override the defaults.
lab_guest_cfg() {
	_name=$1 _type=$2
	shift 2
	_cfg=/tmp/$_name.cfg
	{
		echo "name = \"$_name\""
		echo "type = \"$_type\""
		echo "kernel = \"$LAB_GUEST_KERNEL\""
		echo "ramdisk = \"$LAB_GUEST_INITRD\""
		echo "extra = \"$LAB_GUEST_EXTRA\""
		echo "memory = 128"
		echo "maxmem = 128"
		echo "vcpus = 1"
		echo "vif = []"
		echo "disk = []"
		echo "on_crash = \"preserve\""
		for _l in "$@"; do echo "$_l"; done
	} >"$_cfg"
	echo "$_cfg"
}

# lab_domid NAME prints the domain id of NAME, or nothing when there is no such domain.
lab_domid() { xl domid "$1" 2>/dev/null; }

# lab_create_guest NAME pv|pvh [cfg-line ...] creates a guest and retries once on failure
# (a known flake: xl create sometimes aborts on a pthread mutex assertion).
lab_create_guest() {
	_cfg=$(lab_guest_cfg "$@")
	rm -f "$LAB_CONSOLE_DIR/guest-$1.log"
	if xl create "$_cfg" >"/tmp/create-$1.log" 2>&1; then
		return 0
	fi
	lab_log "xl create $1 failed, retrying once:"
	tail -n 5 "/tmp/create-$1.log"
	LAB_RETRIED=1
	if [ -n "$(lab_domid "$1")" ]; then
		# The flake hits after the domain was built: it may be running fine.
		case $(xl list "$1" | awk 'NR == 2 { print $5 }') in
		r* | -b*) return 0 ;;
		esac
		xl destroy "$1"
	fi
	xl create "$_cfg" >"/tmp/create-$1.log" 2>&1 && return 0
	tail -n 20 "/tmp/create-$1.log"
	return 1
}

# lab_console_log NAME prints the newest console log of NAME (after a local migration
# the guest writes to guest-NAME--incoming.log).
lab_console_log() {
	_a=$LAB_CONSOLE_DIR/guest-$1.log _b=$LAB_CONSOLE_DIR/guest-$1--incoming.log
	# shellcheck disable=SC3013 # busybox sh has -nt
	if [ -f "$_b" ] && { ! [ -f "$_a" ] || [ "$_b" -nt "$_a" ]; }; then echo "$_b"; else echo "$_a"; fi
}

# lab_check_errors ERRS REASON succeeds when guestprog's errors= value ERRS is 0. Else it
# sets _reason: REASON for pages the workload found wrong, progress-line-unreadable when ERRS
# is not a number (a dom0 process died or read garbage while reading the log: not the guest).
lab_check_errors() {
	case $1 in
	0) return 0 ;;
	'' | *[!0-9]*) _reason=progress-line-unreadable ;;
	*) _reason=$2 ;;
	esac
	return 1
}

# lab_last_progress LOG prints the last guestprog progress line's seq in LOG (0: none).
lab_last_progress() {
	[ -f "$1" ] || {
		echo 0
		return
	}
	tr -d '\r' <"$1" | awk '$1 == "progress" && $2 ~ /^[0-9]+$/ { s = $2 } END { print s + 0 }'
}

# lab_last_progress_line LOG prints the last progress line in LOG.
lab_last_progress_line() { tr -d '\r' <"$1" 2>/dev/null | grep '^progress ' | tail -n 1; }

# lab_wait_progress LOG MIN TIMEOUT waits until LOG shows a progress seq >= MIN, up to
# TIMEOUT seconds; prints the seq reached and fails on timeout.
lab_wait_progress() {
	_end=$(awk -v t="$3" '{ printf "%d\n", $1 + t }' /proc/uptime)
	while :; do
		_seq=$(lab_last_progress "$1")
		if [ "$_seq" -ge "$2" ]; then
			echo "$_seq"
			return 0
		fi
		if [ "$(awk '{ printf "%d\n", $1 }' /proc/uptime)" -ge "$_end" ]; then
			echo "$_seq"
			return 1
		fi
		sleep 1
	done
}

# lab_migrate_local NAME [xl-migrate-option ...] migrates NAME to this same host the way
# `xl migrate` does over ssh, with the receiver run locally. The stream passes through
# `guestprog -relay-count`, which counts it: after success /tmp/migrate-NAME.bytes holds
# the bytes of the stream and /tmp/migrate-NAME.log xl's output. No retry here: a failed
# migration can leave the guest gone or crashed; lab_migrate_scenario retries the whole.
lab_migrate_local() {
	_dom=$1
	shift
	rm -f "/tmp/migrate-$_dom.bytes"
	if ! xl -v migrate "$@" -s '' "$_dom" \
		"/lab/guestprog -relay-count /tmp/migrate-$_dom.bytes | xl migrate-receive -e" \
		>"/tmp/migrate-$_dom.log" 2>&1; then
		lab_log "xl migrate $_dom failed:"
		tail -n 15 "/tmp/migrate-$_dom.log"
		[ -n "$(lab_domid "$_dom--incoming")" ] && xl destroy "$_dom--incoming"
		return 1
	fi
	# Keep xl's account in the serial log (lab-test.sh shows it with LAB_VERBOSE=1).
	sed "s/^/lab-mig $_dom: /" "/tmp/migrate-$_dom.log"
	_i=0
	while ! [ -s "/tmp/migrate-$_dom.bytes" ] && [ "$_i" -lt 50 ]; do
		sleep 0.1
		_i=$((_i + 1))
	done
	return 0
}

# _lab_migrate_once DOMAIN TYPE: one attempt of the built-in scenario. Sets _reason (empty
# on success) and _kv (key=value results).
_lab_migrate_once() {
	_d=$1 _t=$2 _reason='' _kv=''
	[ -n "$(lab_domid "$_d")" ] && xl destroy "$_d"
	rm -f "$LAB_CONSOLE_DIR/guest-$_d--incoming.log"
	_t0=$(lab_now)
	if ! lab_create_guest "$_d" "$_t"; then
		_reason=create
		return 1
	fi
	_create=$(lab_since "$_t0")
	_log=$LAB_CONSOLE_DIR/guest-$_d.log
	if ! _seq0=$(lab_wait_progress "$_log" 3 180); then
		_reason=no-progress-before-migration
		return 1
	fi
	_boot=$(lab_since "$_t0")
	_kv="create_s=$_create first_progress_s=$_boot seq_before=$_seq0"
	lab_log "$_d: workload at seq $_seq0 after ${_boot}s; migrating"
	_t1=$(lab_now)
	if ! lab_migrate_local "$_d"; then
		_reason=migrate
		return 1
	fi
	_mig=$(lab_since "$_t1")
	_bytes=$(tr -dc 0-9 <"/tmp/migrate-$_d.bytes" 2>/dev/null)
	_kv="$_kv migrate_s=$_mig stream_bytes=${_bytes:-unknown}"
	if [ -z "$(lab_domid "$_d")" ]; then
		_reason=domain-missing-after-migration
		return 1
	fi
	_log2=$LAB_CONSOLE_DIR/guest-$_d--incoming.log
	if ! _seq1=$(lab_wait_progress "$_log2" $((_seq0 + 1)) 60); then
		_reason=no-progress-after-migration
		return 1
	fi
	_first=$(tr -d '\r' <"$_log2" | awk '$1 == "progress" { print $2; exit }')
	_kv="$_kv seq_first_after=$_first"
	# Keep watching a few seconds: the guest must keep running, not only resume.
	if ! _seq2=$(lab_wait_progress "$_log2" $((_seq1 + 3)) 30); then
		_reason=progress-stalled-after-migration
		return 1
	fi
	_errs=$(lab_last_progress_line "$_log2" | sed -n 's/.*errors=\([0-9]*\).*/\1/p')
	_kv="$_kv seq_last=$_seq2 guest_errors=${_errs:-unknown}"
	lab_check_errors "$_errs" corrupted-pages || return 1
	if [ "$_first" -le "$_seq0" ]; then
		# The counter restarted: the guest rebooted or its memory was not carried over.
		_reason=progress-counter-restarted
		return 1
	fi
	return 0
}

# lab_migrate_scenario RESULT-NAME DOMAIN pv|pvh is the built-in scenario: create the
# guest, wait for its workload, migrate it locally, check the workload goes on from where
# it was (same seq counter, no corrupted pages), report timings and stream size. A failed
# attempt is retried once from scratch (known lab flakes), and the result says retried=1.
lab_migrate_scenario() {
	_r=$1 _s_dom=$2 _s_type=$3 _first_reason=''
	if ! _lab_migrate_once "$_s_dom" "$_s_type"; then
		_first_reason=$_reason
		lab_log "$_r: attempt 1 failed ($_reason; $_kv); retrying once"
		_lab_dump "$_s_dom"
		LAB_RETRIED=1
		_lab_migrate_once "$_s_dom" "$_s_type" || true
	fi
	_st=PASS
	[ -z "$_reason" ] || _st=FAIL
	# shellcheck disable=SC2086 # _kv is a list of key=value words
	lab_result "$_r" "$_st" ${_reason:+reason=$_reason} "type=$_s_type" $_kv \
		"retried=$LAB_RETRIED" ${_first_reason:+first_failure=$_first_reason}
	[ "$_st" = PASS ] || _lab_dump "$_s_dom"
	# A running guest slows every later scenario down (TCG): leave it only when asked.
	[ "$LAB_KEEP_GUESTS" = 1 ] || { [ -n "$(lab_domid "$_s_dom")" ] && xl destroy "$_s_dom"; }
	[ "$_st" = PASS ]
}

# _lab_dump NAME shows the domains and the tails of NAME's console logs.
_lab_dump() {
	xl list
	for _f in "$LAB_CONSOLE_DIR/guest-$1.log" "$LAB_CONSOLE_DIR/guest-$1--incoming.log"; do
		[ -f "$_f" ] && { echo "--- tail $_f"; tail -n 8 "$_f"; }
	done
	return 0
}

# ---- helpers of the trace and balloon-migrate scenarios (30-trace, 40/41-*-balloon-migrate)

# lab_progress_field LOG KEY prints KEY's number in LOG's last progress line (dirtied,
# errors, mib, ...), or nothing.
lab_progress_field() { lab_last_progress_line "$1" | sed -n "s/.* $2=\([0-9][0-9]*\).*/\1/p"; }

# lab_guest_mem NAME prints the memory xl list shows for NAME, in MiB.
lab_guest_mem() { xl list "$1" 2>/dev/null | awk 'NR == 2 { print $3 }'; }

# lab_evidence NAME LOG prints what a failed guest step left behind, prefixed "lab: " so
# lab-test.sh shows it: xl list, the hypervisor's last messages, the guest console's tail.
lab_evidence() {
	xl list 2>&1 | sed 's/^/lab: xl list: /'
	xl dmesg 2>&1 | tail -n 25 | sed 's/^/lab: xl dmesg: /'
	[ -f "$2" ] && tr -d '\r' <"$2" | tail -n 15 | sed "s/^/lab: console $1: /"
	return 0
}

# lab_evidence_more NAME adds what tells a hung guest from a lost console: every console
# log of NAME (size and tail), its CPU time twice 5 s apart, its balloon and memory keys,
# and its vCPU registers and stack (xenctx; PV kernels are not relocated, so the host's
# System.map resolves the addresses).
lab_evidence_more() {
	wc -c "$LAB_CONSOLE_DIR"/*.log 2>&1 | sed 's/^/lab: console bytes: /'
	for _f in "$LAB_CONSOLE_DIR/guest-$1"*.log; do
		_bn=$(basename "$_f")
		[ -f "$_f" ] && tr -d '\r' <"$_f" | tail -n 4 | sed "s|^|lab: $_bn: |"
	done
	_eid=$(lab_domid "$1")
	[ -n "$_eid" ] || return 0
	xl list "$1" 2>&1 | sed 's/^/lab: xl list: /'
	sleep 5
	xl list "$1" 2>&1 | sed 's/^/lab: xl list 5s later: /'
	xenstore-ls -f "/local/domain/$_eid/memory" 2>&1 | sed 's/^/lab: xenstore: /'
	# A silent console with a live kernel: is xenconsoled there, is the ring connected?
	echo "lab: daemons: xenconsoled pid '$(pidof xenconsoled)' xenstored pid '$(pidof xenstored)'"
	xenstore-ls -f "/local/domain/$_eid/console" 2>&1 | sed 's/^/lab: xenstore: /'
	xenstore-ls -f "/local/domain/$_eid/data" 2>&1 | sed 's/^/lab: xenstore: /'
	xenctx -f -a "$_eid" 2>&1 | head -n 40 | sed 's/^/lab: xenctx: /'
	return 0
}

# _lab_trace_once DOMAIN TYPE: one attempt of the trace scenario. Sets _reason (empty on
# success) and _kv.
_lab_trace_once() {
	_d=$1 _t=$2 _reason='' _kv=''
	[ -n "$(lab_domid "$_d")" ] && xl destroy "$_d"
	if ! lab_create_guest "$_d" "$_t"; then
		_reason=create
		return 1
	fi
	_log=$LAB_CONSOLE_DIR/guest-$_d.log
	if ! _seq0=$(lab_wait_progress "$_log" 3 180); then
		_reason=no-progress-before-trace
		return 1
	fi
	_mib=$(lab_progress_field "$_log" mib)
	_dirt0=$(lab_progress_field "$_log" dirtied)
	_out=/tmp/trace-$_d.trace
	rm -f "$_out"
	_t0=$(lab_now)
	if ! xl-postcopy trace "$_d" --interval "$LAB_TRACE_INTERVAL" --duration "$LAB_TRACE_DURATION" \
		-o "$_out" >"/tmp/trace-$_d.err" 2>&1; then
		sed "s/^/lab: trace $_d: /" "/tmp/trace-$_d.err" | tail -n 15
		_reason=trace-exit
		return 1
	fi
	_took=$(lab_since "$_t0")
	sed "s/^/lab: trace $_d: /" "/tmp/trace-$_d.err"
	# The guest must run on after log-dirty is switched off: one more progress line.
	_seq1=$(lab_last_progress "$_log")
	if ! _seq2=$(lab_wait_progress "$_log" $((_seq1 + 2)) 30); then
		_reason=no-progress-after-trace
		return 1
	fi
	_dirt1=$(lab_progress_field "$_log" dirtied)
	_errs=$(lab_progress_field "$_log" errors)
	_sum=$(grep 'trace of dom' "/tmp/trace-$_d.err" | tail -n 1)
	_distinct=$(echo "$_sum" | sed -n 's/.* \([0-9][0-9]*\) distinct pfns.*/\1/p')
	_rounds=$(echo "$_sum" | sed -n 's/.*: \([0-9][0-9]*\) rounds.*/\1/p')
	_late=$(echo "$_sum" | sed -n 's/.* \([0-9][0-9]*\) late rounds.*/\1/p')
	_fbytes=$(wc -c <"$_out" 2>/dev/null || echo 0)
	_fbytes=$(echo "$_fbytes" | tr -dc 0-9)
	# What the workload wrote while traced: its own counter (progress lines are up to a
	# second apart, so this is +-rate pages), at most its whole buffer.
	_bufpages=$((${_mib:-16} * 256))
	_wrote=$((${_dirt1:-0} - ${_dirt0:-0}))
	_expect=$_wrote
	[ "$_expect" -gt "$_bufpages" ] && _expect=$_bufpages
	_ratio=$(awk -v a="${_distinct:-0}" -v b="$_expect" 'BEGIN { if (b > 0) printf "%.2f\n", a / b; else print "inf" }')
	_kv="type=$_t trace_s=$_took trace_bytes=${_fbytes:-0} rounds=${_rounds:-?} late_rounds=${_late:-?}"
	_kv="$_kv distinct_pfns=${_distinct:-0} buffer_pages=$_bufpages workload_dirtied=$_wrote"
	_kv="$_kv expected_pages=$_expect ratio=$_ratio accepted=${LAB_TRACE_RATIO_MIN}-${LAB_TRACE_RATIO_MAX}"
	_kv="$_kv seq_before=$_seq0 seq_after=$_seq2 guest_errors=${_errs:-unknown}"
	if [ "${_fbytes:-0}" -le 0 ]; then
		_reason=trace-file-empty
		return 1
	fi
	if [ -z "$_distinct" ] || [ "$_distinct" -eq 0 ]; then
		_reason=no-dirty-pages
		return 1
	fi
	lab_check_errors "$_errs" guest-errors || return 1
	if ! awk -v r="$_ratio" -v lo="$LAB_TRACE_RATIO_MIN" -v hi="$LAB_TRACE_RATIO_MAX" \
		'BEGIN { exit !(r != "inf" && r + 0 >= lo + 0 && r + 0 <= hi + 0) }'; then
		_reason=dirtied-region-off-by-more-than-factor
		return 1
	fi
	return 0
}

# Trace parameters of lab_trace_scenario. guestprog writes its buffer in order at
# lab.rate pages/s (256), so covering its 4096 pages takes 16 s: a 5 s trace would
# only see 1280 of them, whence 20 s. The accepted ratio of distinct traced pfns to the
# pages the workload wrote (at most its buffer) is 0.5-2: the buffer is 4096 distinct
# guest pages, so fewer than half means rounds lost pages; the kernel, the Go runtime
# (GC, stacks) and the console dirty some hundred pages of their own, so more than twice
# the buffer means the trace records pages nobody wrote.
LAB_TRACE_INTERVAL=${LAB_TRACE_INTERVAL:-50ms}
LAB_TRACE_DURATION=${LAB_TRACE_DURATION:-20s}
LAB_TRACE_RATIO_MIN=${LAB_TRACE_RATIO_MIN:-0.5}
LAB_TRACE_RATIO_MAX=${LAB_TRACE_RATIO_MAX:-2}

# lab_trace_scenario RESULT-NAME DOMAIN pv|pvh: create the guest, wait for its workload,
# record `xl-postcopy trace` for $LAB_TRACE_DURATION, check the trace file is non-empty
# and its distinct pfns match what the workload wrote within the accepted ratio, and
# that the guest runs on. One retry from scratch (lab flakes), reported as retried=1.
lab_trace_scenario() {
	_r=$1 _s_dom=$2 _s_type=$3 _first_reason=''
	LAB_RETRIED=0
	if ! _lab_trace_once "$_s_dom" "$_s_type"; then
		_first_reason=$_reason
		lab_log "$_r: attempt 1 failed ($_reason; $_kv); retrying once"
		lab_evidence "$_s_dom" "$LAB_CONSOLE_DIR/guest-$_s_dom.log"
		LAB_RETRIED=1
		_lab_trace_once "$_s_dom" "$_s_type" || true
	fi
	_st=PASS
	[ -z "$_reason" ] || _st=FAIL
	# shellcheck disable=SC2086 # _kv is a list of key=value words
	lab_result "$_r" "$_st" ${_reason:+reason=$_reason} $_kv "retried=$LAB_RETRIED" \
		${_first_reason:+first_failure=$_first_reason}
	[ "$_st" = PASS ] || lab_evidence "$_s_dom" "$LAB_CONSOLE_DIR/guest-$_s_dom.log"
	[ "$LAB_KEEP_GUESTS" = 1 ] || { [ -n "$(lab_domid "$_s_dom")" ] && xl destroy "$_s_dom"; }
	[ "$_st" = PASS ]
}

# _lab_bm_migrate DOMAIN N: migrates DOMAIN locally (N-th time) and checks its workload
# goes on from where it was. The console log of the incoming domain is always
# guest-DOMAIN--incoming.log, so the previous one is moved aside first (xenconsoled keeps
# writing the running domain's lines to it through its open file). Sets _reason, adds to
# _kv (keys suffixed with N), leaves the log in _cur_log.
_lab_bm_migrate() {
	_md=$1 _n=$2
	_inc=$LAB_CONSOLE_DIR/guest-$_md--incoming.log
	if [ "$_cur_log" = "$_inc" ]; then
		mv "$_inc" "$LAB_CONSOLE_DIR/guest-$_md--mig$((_n - 1)).log"
		_cur_log=$LAB_CONSOLE_DIR/guest-$_md--mig$((_n - 1)).log
	fi
	rm -f "$_inc"
	_sb=$(lab_last_progress "$_cur_log")
	_mem=$(lab_guest_mem "$_md")
	_tm=$(lab_now)
	if ! lab_migrate_local_limited "$LAB_BM_MIGRATE_TIMEOUT" "$_md"; then
		_reason=migrate$_n
		[ "$_mig_timed_out" = 1 ] && _reason=migrate$_n-timeout-${LAB_BM_MIGRATE_TIMEOUT}s
		lab_evidence "$_md" "$_cur_log"
		lab_evidence_more "$_md"
		return 1
	fi
	_ms=$(lab_since "$_tm")
	_b=$(tr -dc 0-9 <"/tmp/migrate-$_md.bytes" 2>/dev/null)
	_kv="$_kv mem${_n}_mib=$_mem migrate${_n}_s=$_ms bytes$_n=${_b:-unknown} pages$_n=$((${_b:-0} / 4096)) seq_before$_n=$_sb"
	eval "_bytes$_n=\${_b:-0}"
	if [ -z "$(lab_domid "$_md")" ]; then
		_reason=domain-missing-after-migration$_n
		return 1
	fi
	_cur_log=$_inc
	if ! _sa=$(lab_wait_progress "$_inc" $((_sb + 1)) 60); then
		_reason=no-progress-after-migration$_n
		lab_evidence "$_md" "$_inc"
		lab_evidence_more "$_md"
		return 1
	fi
	_sf=$(tr -d '\r' <"$_inc" | awk '$1 == "progress" { print $2; exit }')
	if ! _sl=$(lab_wait_progress "$_inc" $((_sa + 2)) 30); then
		_reason=progress-stalled-after-migration$_n
		lab_evidence "$_md" "$_inc"
		return 1
	fi
	_e=$(lab_progress_field "$_inc" errors)
	_kv="$_kv seq_first_after$_n=$_sf seq_last$_n=$_sl errors$_n=${_e:-unknown}"
	if [ "${_sf:-0}" -le "$_sb" ]; then
		_reason=progress-counter-restarted$_n
		return 1
	fi
	lab_check_errors "$_e" guest-errors || {
		_reason=$_reason$_n
		return 1
	}
	return 0
}

# lab_migrate_local_limited SECONDS NAME is lab_migrate_local with a time limit: a
# PVH migration was seen to hang with its guest spinning, and the scenario's own limit
# (480 s) would then kill the scenario before it reports. On timeout it sets
# _mig_timed_out=1 and fails.
lab_migrate_local_limited() {
	_lim=$1 _dom=$2 _mig_timed_out=0
	rm -f "/tmp/migrate-$_dom.bytes"
	timeout "$_lim" xl -v migrate -s '' "$_dom" \
		"/lab/guestprog -relay-count /tmp/migrate-$_dom.bytes | xl migrate-receive -e" \
		>"/tmp/migrate-$_dom.log" 2>&1
	_mrc=$?
	if [ "$_mrc" -ne 0 ]; then
		[ "$_mrc" -eq 124 ] || [ "$_mrc" -eq 143 ] && _mig_timed_out=1
		lab_log "xl migrate $_dom failed (exit $_mrc, timed_out=$_mig_timed_out):"
		tail -n 15 "/tmp/migrate-$_dom.log" | sed "s/^/lab: xl migrate $_dom: /"
		[ -n "$(lab_domid "$_dom--incoming")" ] && xl destroy "$_dom--incoming"
		return 1
	fi
	sed "s/^/lab-mig $_dom: /" "/tmp/migrate-$_dom.log"
	_i=0
	while ! [ -s "/tmp/migrate-$_dom.bytes" ] && [ "$_i" -lt 50 ]; do
		sleep 0.1
		_i=$((_i + 1))
	done
	return 0
}

# Seconds one balloon-migrate migration may take (TCG: 3 to 71 s seen).
LAB_BM_MIGRATE_TIMEOUT=${LAB_BM_MIGRATE_TIMEOUT:-150}

# The balloon-migrate guests dirty 32 pages/s instead of 256: every page written during
# a migration is sent again, and at 256 pages/s (1 MiB/s, over migrations of 3 to 70 s
# under TCG) that noise would be as large as what the balloon gives back.
LAB_BM_GUEST_EXTRA=${LAB_BM_GUEST_EXTRA:-console=hvc0 quiet loglevel=3 lab.mib=16 lab.rate=32}
# 0: a control run that skips `xl-postcopy balloon` (and so the smaller-stream check).
LAB_BM_BALLOON=${LAB_BM_BALLOON:-1}

# _lab_bm_cleanup DOMAIN destroys DOMAIN and what a killed migration leaves of it.
_lab_bm_cleanup() {
	for _x in "$1" "$1--incoming" "$1--migratedaway"; do
		[ -n "$(lab_domid "$_x")" ] && xl destroy "$_x"
	done
	return 0
}

# _lab_bm_once DOMAIN TYPE: one attempt of the balloon-migrate scenario.
_lab_bm_once() {
	_d=$1 _t=$2 _reason='' _kv="type=$_t" _bytes1=0 _bytes2=0
	_lab_bm_cleanup "$_d"
	rm -f "$LAB_CONSOLE_DIR/guest-$_d--"*.log
	# (busybox sh keeps an assignment prefixed to a function call: set and restore it.)
	_extra_saved=$LAB_GUEST_EXTRA
	LAB_GUEST_EXTRA=$LAB_BM_GUEST_EXTRA
	lab_create_guest "$_d" "$_t"
	_crc=$?
	LAB_GUEST_EXTRA=$_extra_saved
	if [ "$_crc" -ne 0 ]; then
		_reason=create
		return 1
	fi
	_cur_log=$LAB_CONSOLE_DIR/guest-$_d.log
	if ! lab_wait_progress "$_cur_log" 3 180 >/dev/null; then
		_reason=no-progress-before-migration
		lab_evidence "$_d" "$_cur_log"
		return 1
	fi
	# The daemon must be up (its start-up step done) before the run without DSB.
	_id=$(lab_domid "$_d")
	_i=0
	until [ "$(xenstore-read "/local/domain/$_id/data/balloon/state" 2>/dev/null)" = running ]; do
		_i=$((_i + 1))
		if [ "$_i" -gt 60 ]; then
			_reason=no-guest-balloon-state
			lab_evidence "$_d" "$_cur_log"
			# What the guest said besides progress lines (its init, guest-balloon).
			tr -d '\r' <"$_cur_log" | grep -v '^progress' | tail -n 20 | sed "s/^/lab: console $_d: /"
			return 1
		fi
		sleep 1
	done
	lab_log "$_d: workload and guest-balloon running; migration 1, without DSB"
	_lab_bm_migrate "$_d" 1 || return 1
	if [ "$LAB_BM_BALLOON" = 0 ]; then
		# Control run: the same two migrations without the request, to tell a problem of
		# the ballooned migration from one of migrating twice.
		_kv="$_kv balloon=skipped-control-run"
		lab_log "$_d: migration 2, control run without the balloon"
		_lab_bm_migrate "$_d" 2 || return 1
		return 0
	fi
	# Balloon now: the daemon must answer after a migration (new domid, xenbus resumed).
	if ! _ack=$(xl-postcopy balloon "$_d" --timeout 30s 2>&1); then
		lab_log "$_d: xl-postcopy balloon failed once: $_ack"
		LAB_RETRIED=1
		if ! _ack=$(xl-postcopy balloon "$_d" --timeout 30s 2>&1); then
			lab_log "$_d: xl-postcopy balloon failed again: $_ack"
			_reason=balloon-not-acknowledged
			lab_evidence "$_d" "$_cur_log"
			return 1
		fi
	fi
	lab_log "$_d: xl-postcopy balloon: $_ack"
	_rel=$(echo "$_ack" | sed -n 's/.*released \([0-9][0-9]*\) kB.*/\1/p')
	_tgt=$(echo "$_ack" | sed -n 's/.*balloon target \([0-9][0-9]*\) kB.*/\1/p')
	_kv="$_kv balloon_ack=ok balloon_target_kb=${_tgt:-?} balloon_released_kb=${_rel:-?}"
	sleep 2
	lab_log "$_d: migration 2, after the balloon"
	_lab_bm_migrate "$_d" 2 || return 1
	_saved=$(awk -v a="$_bytes1" -v b="$_bytes2" 'BEGIN { if (a > 0) printf "%.1f\n", 100 * (a - b) / a; else print "?" }')
	_kv="$_kv bytes_saved_pct=$_saved"
	# On resume the guest's balloon driver re-reads memory/target (the configured size on
	# the new domain) and grows back; guest-balloon must put its own target back (after
	# its --reassert-delay, 2 s). What the new domain holds a few seconds on:
	sleep 6
	_ma=$(lab_guest_mem "$_d")
	_ra=no
	tr -d '\r' <"$_cur_log" | grep -q 're-announced' && _ra=yes
	_kv="$_kv mem_after2_mib=${_ma:-?} balloon_reasserted=$_ra"
	if [ -z "$_ma" ] || [ "$_ma" -gt $((${_mem:-0} + 3)) ]; then
		_reason=balloon-undone-after-migration
		return 1
	fi
	if [ "$_bytes2" -ge "$_bytes1" ]; then
		_reason=ballooned-migration-not-smaller
		return 1
	fi
	return 0
}

# lab_balloon_migrate_scenario RESULT-NAME DOMAIN pv|pvh: on one guest running the
# workload and guest-balloon, `xl migrate` without DSB, `xl-postcopy balloon` (the ack is
# printed), `xl migrate` again; both stream sizes (bytes, and pages = bytes/4096, which
# counts the stream's headers too) and the guest's memory before each are reported.
# PASS needs the ack, the workload going on after both migrations (same seq counter, no
# corrupted page) and a smaller second stream. One retry from scratch, retried=1.
lab_balloon_migrate_scenario() {
	_r=$1 _s_dom=$2 _s_type=$3 _first_reason=''
	LAB_RETRIED=0
	if ! _lab_bm_once "$_s_dom" "$_s_type"; then
		_first_reason=$_reason
		lab_log "$_r: attempt 1 failed ($_reason; $_kv); retrying once"
		LAB_RETRIED=1
		_lab_bm_once "$_s_dom" "$_s_type" || true
	fi
	_st=PASS
	[ -z "$_reason" ] || _st=FAIL
	# shellcheck disable=SC2086 # _kv is a list of key=value words
	lab_result "$_r" "$_st" ${_reason:+reason=$_reason} $_kv "retried=$LAB_RETRIED" \
		${_first_reason:+first_failure=$_first_reason}
	[ "$LAB_KEEP_GUESTS" = 1 ] || _lab_bm_cleanup "$_s_dom"
	[ "$_st" = PASS ]
}

# Shared by the post-copy scenarios.

# jget FILE KEY prints a top-level number/bool of xl-postcopy's JSON (two-space indent).
jget() { sed -n "s/^  \"$2\": \([^,{]*\),*\$/\1/p" "$1" | head -n 1 | tr -d '"'; }
# jget2 FILE KEY prints a key of a nested object ("xen", "dsb": four-space indent).
jget2() { sed -n "s/^    \"$2\": \([^,{]*\),*\$/\1/p" "$1" | head -n 1 | tr -d '"'; }

# lab_watch_start DOMID LABEL starts the outside downtime ruler.
lab_watch_start() {
	# (A heavy writer's post-copy under TCG took ~10 minutes: the ruler must outlast it.)
	xl-postcopy lab-downtime --timeout 1800s "$1" >"/tmp/dt-$2.txt" 2>&1 &
	_wpid=$!
}

# lab_watch_end LABEL waits for the ruler (it stops a second after the destination runs).
lab_watch_end() {
	_i=0
	while kill -0 "$_wpid" 2>/dev/null && [ "$_i" -lt 100 ]; do
		sleep 0.1
		_i=$((_i + 1))
	done
	kill "$_wpid" 2>/dev/null
	wait "$_wpid" 2>/dev/null
	sed -n 's/^downtime_ms=\([0-9.]*\).*/\1/p' "/tmp/dt-$1.txt" | head -n 1
}

# lab_progress_after NAME SEQ0: the guest's counter must continue past SEQ0 and keep
# moving, with errors=0 (fails with 2 on errors); prints the seq reached.
lab_progress_after() {
	_log=$(lab_console_log "$1")
	shift
	_s1=$(lab_wait_progress "$_log" $(($1 + 1)) 90) || return 1
	_s2=$(lab_wait_progress "$_log" $((_s1 + 2)) 60) || return 1
	_errs=$(lab_last_progress_line "$_log" | sed -n 's/.*errors=\([0-9]*\).*/\1/p')
	[ "$_errs" = 0 ] || return 2
	echo "$_s2"
}


# lab_dest_kv ERRFILE prints the receiver's figures from xl-postcopy migrate --debug's
# stderr (its "domain N complete: {...}" line): how paging reached the hypervisor and
# where the destination's setup and loads spent their time.
lab_dest_kv() {
	_c=$(grep -E 'msg="domain [0-9]+ complete: .* who=migrate-receive' "$1" 2>/dev/null | tail -n 1)
	_f() { echo "$_c" | sed -n "s/.*[{ ]$1:\([^ }]*\).*/\1/p"; }
	echo "paging_ops=$(_f PagingOps) dest_create_ms=$(_f CreateMs) dest_evict_ms=$(_f EvictMs) dest_evicted=$(_f Evicted) dest_load_ms=$(_f LoadMs) dest_loaded=$(_f Loaded)"
}

# lab_want_paging_ops: the paging ops the receiver should have found ("batched" on the
# lab's patched hypervisor, "per-gfn" with LAB_XEN_PATCHES=0).
lab_want_paging_ops() {
	if [ "${LAB_XEN_PATCHES:-1}" = 1 ]; then echo batched; else echo per-gfn; fi
}

# lab_pc_dump NAME LABEL prints what explains a failed post-copy migration of NAME.
lab_pc_dump() {
	_pn=$1
	shift
	echo "--- xl-postcopy stderr ($1)"
	tail -n 60 "/tmp/pc-$1.err" 2>/dev/null
	xl list
	_lab_dump "$_pn"
	_f=$LAB_CONSOLE_DIR/guest-$_pn--incoming.log
	[ -f "$_f" ] && { echo "--- head $_f"; tr -d '\r' <"$_f" | grep -v '^progress ' | head -n 60; }
	if [ -f "$_f" ] && grep -q -E 'BUG|Oops|panic|WARNING|general protection' "$_f"; then
		echo "--- first oops in $_f"
		tr -d '\r' <"$_f" | grep -v '^progress ' | grep -n -E -A45 -B12 'BUG|Oops|panic|WARNING|general protection' | head -n 90
	fi
	_id=$(lab_domid "$_pn")
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

# lab_pc_migrate NAME LABEL [xl-postcopy option ...]: one post-copy migration of NAME
# (config /tmp/NAME.cfg) with checks: PASS needs exit 0, verified from memory, nothing sent
# twice but the early core pages written again before the pause, the receiver on the expected paging path and the guest's counter going on. Prints
# LAB-RESULT postcopy-LABEL; sets pc_dt_LABEL to the outside ruler's downtime.
lab_pc_migrate() {
	_pn=$1 _l=$2
	shift 2
	_id=$(lab_domid "$_pn")
	_seq0=$(lab_last_progress "$(lab_console_log "$_pn")")
	lab_watch_start "$_id" "$_l"
	_t0=$(lab_now)
	xl-postcopy migrate -s '' -C "/tmp/$_pn.cfg" --json --debug $PC_MIGRATE_OPTS "$@" "$_pn" localhost >"/tmp/pc-$_l.json" 2>"/tmp/pc-$_l.err"
	_rc=$?
	_wall=$(lab_since "$_t0")
	_dt=$(lab_watch_end "$_l")
	_j=/tmp/pc-$_l.json
	_kv="wall_s=$_wall watched_downtime_ms=${_dt:-none} downtime_ms=$(jget "$_j" downtime_ms) total_ms=$(jget "$_j" total_time_ms)"
	_kv="$_kv bytes=$(jget "$_j" total_bytes) pages=$(jget "$_j" pages) pages_sent=$(jget "$_j" pages_sent)"
	_kv="$_kv core_pages=$(jget "$_j" core_pages) early_core_pages=$(jget "$_j" early_core_pages) early_core_redirtied=$(jget "$_j" early_core_redirtied)"
	_kv="$_kv network_faults=$(jget "$_j" network_faults) faults=$(jget "$_j" faults) blocktime_ms=$(jget "$_j" postcopy_blocktime_ms)"
	_kv="$_kv resent_pages=$(jget "$_j" resent_pages) redundant_pages=$(jget "$_j" redundant_pages) verified=$(jget "$_j" verified)"
	_kv="$_kv verified_from=$(jget "$_j" verified_from) verified_pages=$(jget "$_j" verified_pages) guest_written_pages=$(jget "$_j" guest_written_pages) seq_before=$_seq0"
	_kv="$_kv ram_pages=$(jget2 "$_j" ram_pages) page_table_pages=$(jget2 "$_j" page_table_pages) per_cpu_pages=$(jget2 "$_j" per_cpu_pages)"
	_kv="$_kv suspend_ms=$(jget2 "$_j" suspend_ms) suspend_watched=$(jget2 "$_j" suspend_watched) balloon_released_kb=$(jget2 "$_j" released_kb)"
	_kv="$_kv resident_hint=$(jget2 "$_j" resident_hint) hint_stale=$(jget2 "$_j" hint_stale) hint_missed=$(jget2 "$_j" hint_missed)"
	_kv="$_kv $(lab_dest_kv "/tmp/pc-$_l.err")"
	if [ "$_rc" != 0 ]; then
		lab_result "postcopy-$_l" FAIL reason=exit-$_rc $_kv
		lab_pc_dump "$_pn" "$_l"
		return 1
	fi
	# Sent twice: only the early core pages the guest wrote again before the pause.
	if [ "$(jget "$_j" verified)" != true ] || [ "$(jget "$_j" verified_from)" != memory ] ||
		[ "$(jget "$_j" resent_pages)" != "$(jget "$_j" early_core_redirtied)" ] || [ "$(jget "$_j" redundant_pages)" != 0 ]; then
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
	if ! _after=$(lab_progress_after "$_pn" "$_seq0"); then
		lab_result "postcopy-$_l" FAIL reason=no-progress-after $_kv
		lab_pc_dump "$_pn" "$_l"
		return 1
	fi
	lab_result "postcopy-$_l" PASS $_kv seq_after=$_after
	# Where the downtime went (the engine's --debug timeline of the pause).
	grep -E 'since pause' "/tmp/pc-$_l.err" | head -n 25 | sed "s/^/lab: pc-$_l: /"
	_v=$(echo "$_l" | tr -c 'a-z0-9\n' _)
	eval "pc_dt_$_v=\${_dt:-none} pc_wall_$_v=\$_wall"
	return 0
}

# lab_ssh_transport writes /tmp/lab-ssh, a transport with ssh's calling convention
# (`lab-ssh HOST COMMAND...` runs COMMAND here): `xl-postcopy migrate -s /tmp/lab-ssh` then
# runs its receiver and its relays as processes, as it would through ssh.
lab_ssh_transport() {
	cat >/tmp/lab-ssh <<'SSH'
#!/bin/sh
# lab-ssh HOST COMMAND...: ssh's calling convention, run here.
shift
exec "$@"
SSH
	chmod 755 /tmp/lab-ssh
}

# lab_recovery_guest NAME RESULT creates the PVH guest of the recovery scenarios (52-54) and
# sets seq0 to its progress counter once it moves; on failure it reports RESULT FAIL and fails.
lab_recovery_guest() {
	lab_create_guest "$1" pvh 'tsc_mode="native"' 'on_reboot="preserve"' \
		"extra = \"console=hvc0 loglevel=6 lab.mib=16 lab.rate=256\"" || {
		lab_result "$2" FAIL reason=create
		return 1
	}
	if ! seq0=$(lab_wait_progress "$(lab_console_log "$1")" 3 180); then
		lab_result "$2" FAIL reason=no-progress-before
		_lab_dump "$1"
		return 1
	fi
}

# lab_kill_matching TEXT [SIGNAL] sends SIGNAL (default KILL) to every process whose command
# line holds TEXT (dom0's busybox has no pkill); fails if there was none.
lab_kill_matching() {
	_k=1
	for _p in /proc/[0-9]*; do
		_c=$(tr '\0' ' ' <"$_p/cmdline" 2>/dev/null) || continue
		case $_c in
		*"$1"*) kill -"${2:-KILL}" "${_p#/proc/}" 2>/dev/null && _k=0 ;;
		esac
	done
	return $_k
}
