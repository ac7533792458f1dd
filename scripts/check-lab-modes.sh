#!/usr/bin/env bash
# Integration test: migrate a 256 MiB lab domain (zipf workload) with each
# mode and check the JSON says it is verified, without duplicate pages, and
# that the guest kept running at the destination. Prints one line per mode.
set -euo pipefail
bin=${1:-bin/xl-postcopy}
fail=0
for mode in postcopy precopy hybrid; do
	out=$("$bin" lab migrate --mode "$mode" --prepaging dual --workload zipf --mem 256M --json)
	verdict=$(python3 - "$mode" <<PY
import json, sys
s = json.loads('''$out''')
ok = s["verified"] and s["redundant_pages"] == 0 and s["progress_continued"] and s["integrity_errors"] == 0
print(("PASS" if ok else "FAIL") + " lab migrate --mode %s: verified=%s redundant_pages=%d total_time=%.0fms downtime=%.1fms network_faults=%d working_set=%d"
      % (sys.argv[1], s["verified"], s["redundant_pages"], s["total_time_ms"], s["downtime_ms"], s["network_faults"], s.get("working_set", 0)))
PY
)
	echo "$verdict"
	case "$verdict" in PASS*) ;; *) fail=1 ;; esac
done
exit $fail
