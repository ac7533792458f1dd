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
	case $_errs in
	0) ;;
	'' | *[!0-9]*)
		# Seen once: a dom0 busybox process died of a GPF while reading the log.
		_reason=progress-line-unreadable
		return 1
		;;
	*)
		_reason=corrupted-pages
		return 1
		;;
	esac
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
