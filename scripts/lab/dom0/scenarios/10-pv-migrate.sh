#!/bin/sh
# Built-in: a PV guest running the workload, migrated locally with xl (pre-copy, which
# on PV needs log-dirty and so a hypervisor with CONFIG_SHADOW_PAGING).
# shellcheck source-path=SCRIPTDIR source=../lab-lib.sh
. /lab/lab-lib.sh
lab_migrate_scenario pv-migrate "$LAB_PV_DOMAIN" pv
