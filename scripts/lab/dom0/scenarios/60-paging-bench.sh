#!/bin/sh
# Built-in: the destination's paging primitives timed on a real domain (issue 12), per
# page, for batches of 1, 64 and 512: page-out (nominate + evict) and load through libxc
# (one call and one mlock a page), through hypercall buffers (one hypercall a page, one
# cgo call a batch) and, where the hypervisor has scripts/xen-patches, through the
# batched hypercalls; decrease_reservation, populate_physmap and a foreign-map write of a
# batch beside them. Every load and write is read back and compared. The domain is a
# paused scratch PVH guest (xl create -p, 128 MiB) that never runs.
# lab-timeout: 600
# shellcheck source-path=SCRIPTDIR source=../lab-lib.sh
. /lab/lab-lib.sh
n=lab-pgb
out=/tmp/pgb.out
cfg=$(lab_guest_cfg "$n" pvh)
if ! xl create -p "$cfg" >"/tmp/create-$n.log" 2>&1; then
	lab_log "xl create -p $n failed, retrying once:"
	tail -n 5 "/tmp/create-$n.log"
	LAB_RETRIED=1
	[ -n "$(lab_domid "$n")" ] && xl destroy "$n"
	xl create -p "$cfg" >"/tmp/create-$n.log" 2>&1 || {
		tail -n 20 "/tmp/create-$n.log"
		lab_result paging-bench FAIL reason=create
		exit 1
	}
fi
id=$(lab_domid "$n")
# gfns 0x6000.. (96 MiB on): RAM of the 128 MiB guest, above the kernel the builder
# loaded (its segment takes ~58 MiB from 16 MiB; 64 MiB was too small for it).
xl-postcopy paging-bench --pages 512 --batches 1,64,512 --base 0x6000 "$id" >"$out" 2>/tmp/pgb.err
rc=$?
cat "$out"
xl destroy "$n"
rows=$(grep -c '^paging-bench op=' "$out")
# Seven ops a batch size, two more with the batched hypercalls.
want=21
[ "$(lab_want_paging_ops)" = batched ] && want=27
# us NAME BATCH: the per-page figure of one row.
us() { sed -n "s/^paging-bench op=$1 batch=$2 .* us_per_page=\([0-9.]*\).*/\1/p" "$out"; }
kv="rows=$rows want_rows=$want pageout_libxc_us=$(us pageout-libxc 1) load_libxc_us=$(us load-libxc 1)"
kv="$kv pageout_hcbuf_512_us=$(us pageout-hcbuf 512) load_hcbuf_512_us=$(us load-hcbuf 512)"
kv="$kv pageout_batched_512_us=$(us pageout-batched 512) load_batched_512_us=$(us load-batched 512)"
kv="$kv populate_512_us=$(us populate-physmap 512) foreign_write_512_us=$(us foreign-write 512)"
if [ "$rc" != 0 ]; then
	lab_result paging-bench FAIL reason=exit-$rc $kv
	tail -n 20 /tmp/pgb.err
	exit 1
fi
if [ "$rows" != "$want" ]; then
	lab_result paging-bench FAIL reason=rows $kv
	exit 1
fi
lab_result paging-bench PASS $kv
exit 0
