#!/bin/sh
# Built-in: 40-pv-balloon-migrate on a PVH guest (a ballooned PVH `xl migrate` failed in
# earlier lab sessions: this reports whatever happens, with the evidence on failure).
# shellcheck source-path=SCRIPTDIR source=../lab-lib.sh
. /lab/lab-lib.sh
lab_balloon_migrate_scenario pvh-balloon-migrate lab-bm-pvh pvh
