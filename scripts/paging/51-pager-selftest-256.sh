#!/bin/sh
# shellcheck shell=sh
# Variant of 50-pager-selftest: evict only 256 of guestcheck's 4096 pages, so that the
# guest goes through 16x fewer paging round trips (TCG flakes scale with them).
export PAGER_RESULT=pager-selftest-256 PAGER_LIMIT=256
# shellcheck source=/dev/null
. /scenarios/50-pager-selftest.sh
