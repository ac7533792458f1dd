#!/bin/sh
# Built-in: `xl-postcopy trace` (log-dirty rounds of 50 ms) on a PV and a PVH guest while
# guestprog dirties its 16 MiB buffer; the trace must be written, non-empty, and its
# distinct pfns within 0.5-2x of the pages the workload wrote (lab-lib.sh says why).
# shellcheck source-path=SCRIPTDIR source=../lab-lib.sh
. /lab/lab-lib.sh
rc=0
lab_trace_scenario trace-pv lab-trace-pv pv || rc=1
lab_trace_scenario trace-pvh lab-trace-pvh pvh || rc=1
exit $rc
