#!/bin/sh
# Built-in: one PV guest running guestprog and guest-balloon: `xl migrate` without DSB,
# `xl-postcopy balloon`, `xl migrate` again; the second stream must be smaller and the
# guest's workload must go on after both.
# shellcheck source-path=SCRIPTDIR source=../lab-lib.sh
. /lab/lab-lib.sh
lab_balloon_migrate_scenario pv-balloon-migrate lab-bm-pv pv
