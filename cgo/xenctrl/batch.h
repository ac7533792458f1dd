/*
 * Paging in batches: one cgo call pages out or loads up to XP_BATCH_MAX gfns,
 * through buffers libxencall allocated (locked, hypercall-safe), so that no
 * page costs an mlock/munlock as xc_mem_paging_load does.
 */
#ifndef XL_POSTCOPY_XENCTRL_BATCH_H
#define XL_POSTCOPY_XENCTRL_BATCH_H

#include <stdint.h>

/* The most gfns one call takes; the batched hypervisor ops take as many. */
#define XP_BATCH_MAX 512

/*
 * The batched ops of scripts/xen-patches/0001-mem-paging-batch.patch. A
 * hypervisor without the patch answers them with -ENOSYS.
 */
#define XP_PAGING_OP_PREP_BATCH 3
#define XP_PAGING_OP_EVICT_BATCH 4

typedef struct xp_batch xp_batch;

/* Opens its own libxencall handle and buffers; NULL with errno on failure. */
xp_batch *xp_batch_open(void);
void xp_batch_close(xp_batch *b);

/*
 * Asks for a batched op with no gfns: 0 when the hypervisor has the ops,
 * -1 with errno (ENOSYS without the patch) otherwise.
 */
int xp_batch_probe(xp_batch *b, uint32_t dom);

/*
 * Page out (nominate + evict) or load (prep from a buffer) gfns[0..n), n at
 * most XP_BATCH_MAX, one paging hypercall a gfn when batched is 0, one
 * hypercall for all of them otherwise. Returns how many were done, in order;
 * when that is fewer than n, *err holds the errno of gfns[done] (0 when the
 * hypervisor stopped early to be preempted: call again for the rest).
 */
int xp_batch_pageout(xp_batch *b, uint32_t dom, const uint64_t *gfns, int n,
                     int batched, int *err);
int xp_batch_load(xp_batch *b, uint32_t dom, const uint64_t *gfns,
                  const uint8_t *data, int n, int batched, int *err);

#endif
