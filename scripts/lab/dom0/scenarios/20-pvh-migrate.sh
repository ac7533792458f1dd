#!/bin/sh
# Built-in: a PVH guest (HVM container with HAP) running the workload, migrated locally.
# shellcheck source-path=SCRIPTDIR source=../lab-lib.sh
. /lab/lab-lib.sh
lab_migrate_scenario pvh-migrate "$LAB_PVH_DOMAIN" pvh
