#include <errno.h>
#include <stdlib.h>
#include <string.h>
/* xenctrl.h defines __XEN_TOOLS__, which the paging op in memory.h needs. */
#include <xenctrl.h>
#include <xencall.h>
#include <xen/memory.h>

#include "batch.h"

#define XP_PAGE 4096

struct xp_batch {
    xencall_handle *xcall;
    xen_mem_paging_op_t *op; /* one hypercall-buffer page */
    uint8_t *bulk;           /* 1 + XP_BATCH_MAX hypercall-buffer pages */
};

xp_batch *xp_batch_open(void)
{
    xp_batch *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    b->xcall = xencall_open(NULL, 0);
    if (!b->xcall)
        goto fail;
    b->op = xencall_alloc_buffer_pages(b->xcall, 1);
    if (!b->op)
        goto fail;
    b->bulk = xencall_alloc_buffer_pages(b->xcall, 1 + XP_BATCH_MAX);
    if (!b->bulk)
        goto fail;
    return b;
fail:
    {
        int saved = errno;
        xp_batch_close(b);
        errno = saved;
    }
    return NULL;
}

void xp_batch_close(xp_batch *b)
{
    if (!b)
        return;
    if (b->bulk)
        xencall_free_buffer_pages(b->xcall, b->bulk, 1 + XP_BATCH_MAX);
    if (b->op)
        xencall_free_buffer_pages(b->xcall, b->op, 1);
    if (b->xcall)
        xencall_close(b->xcall);
    free(b);
}

/* One XENMEM_paging_op; returns the hypercall's result, -1 with errno. */
static int paging_op(xp_batch *b, uint32_t dom, uint8_t op, uint64_t gfn,
                     void *buffer)
{
    memset(b->op, 0, sizeof(*b->op));
    b->op->op = op;
    b->op->domain = (domid_t)dom;
    b->op->gfn = gfn;
    set_xen_guest_handle_raw(b->op->buffer, (const uint8_t *)buffer);
    return xencall2(b->xcall, __HYPERVISOR_memory_op, XENMEM_paging_op,
                    (uint64_t)(uintptr_t)b->op);
}

int xp_batch_probe(xp_batch *b, uint32_t dom)
{
    return paging_op(b, dom, XP_PAGING_OP_EVICT_BATCH, 0, b->bulk) < 0 ? -1 : 0;
}

/*
 * A batched op: the gfn list fills the first bulk page (n <= 512 entries of
 * 8 bytes), contents (prep only) follow from the second page; IN gfn = n,
 * OUT gfn = how many were done.
 */
static int batched_op(xp_batch *b, uint32_t dom, uint8_t op,
                      const uint64_t *gfns, const uint8_t *data, int n, int *err)
{
    memcpy(b->bulk, gfns, (size_t)n * sizeof(uint64_t));
    if (data)
        memcpy(b->bulk + XP_PAGE, data, (size_t)n * XP_PAGE);
    int rc = paging_op(b, dom, op, (uint64_t)n, b->bulk);
    int saved = errno;
    int done = (int)b->op->gfn;
    if (done < 0 || done > n)
        done = 0;
    *err = 0;
    if (rc < 0)
        *err = saved ? saved : EIO;
    else if (rc > 0)
        /* Not a value these ops return: treat the batch as undone. */
        *err = EPROTO, done = 0;
    return done;
}

int xp_batch_pageout(xp_batch *b, uint32_t dom, const uint64_t *gfns, int n,
                     int batched, int *err)
{
    *err = 0;
    if (n < 0 || n > XP_BATCH_MAX) {
        *err = EINVAL;
        return 0;
    }
    if (batched)
        return batched_op(b, dom, XP_PAGING_OP_EVICT_BATCH, gfns, NULL, n, err);
    for (int i = 0; i < n; i++) {
        if (paging_op(b, dom, XENMEM_paging_op_nominate, gfns[i], NULL) < 0 ||
            paging_op(b, dom, XENMEM_paging_op_evict, gfns[i], NULL) < 0) {
            *err = errno ? errno : EIO;
            return i;
        }
    }
    return n;
}

int xp_batch_load(xp_batch *b, uint32_t dom, const uint64_t *gfns,
                  const uint8_t *data, int n, int batched, int *err)
{
    *err = 0;
    if (n < 0 || n > XP_BATCH_MAX) {
        *err = EINVAL;
        return 0;
    }
    if (batched)
        return batched_op(b, dom, XP_PAGING_OP_PREP_BATCH, gfns, data, n, err);
    /* One copy into the locked buffer, then one prep a page from it. */
    memcpy(b->bulk, data, (size_t)n * XP_PAGE);
    for (int i = 0; i < n; i++) {
        if (paging_op(b, dom, XENMEM_paging_op_prep, gfns[i],
                      b->bulk + (size_t)i * XP_PAGE) < 0) {
            *err = errno ? errno : EIO;
            return i;
        }
    }
    return n;
}
