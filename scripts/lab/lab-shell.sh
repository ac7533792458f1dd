#!/usr/bin/env bash
# Boots the nested Xen lab (the same images lab-test.sh builds) with an interactive dom0
# shell on the serial console. `exit` in the shell ends QEMU; Ctrl-C goes to dom0.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

lab_require_root
lab_build_all
lab_qemu_args shell
log "booting Xen + dom0; serial output is also logged to $LAB_CACHE/serial-shell.log"
"${LAB_QEMU[@]}" -chardev stdio,id=con0,signal=off,logfile="$LAB_CACHE/serial-shell.log" -serial chardev:con0
