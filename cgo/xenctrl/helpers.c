/*
 * C helpers for package xenctrl. Written for xl-postcopy against the Xen
 * 4.17 public headers; see helpers.h for what each one is for.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

void xp_dominfo_from(const xc_domaininfo_t *in, xp_dominfo *out)
{
    memset(out, 0, sizeof(*out));
    out->domid = in->domain;
    out->flags = in->flags;
    out->shutdown_reason = (in->flags >> XEN_DOMINF_shutdownshift) &
                           XEN_DOMINF_shutdownmask;
    out->nr_online_vcpus = in->nr_online_vcpus;
    out->max_vcpu_id = in->max_vcpu_id;
    out->cpupool = in->cpupool;
    out->emulation_flags = in->arch_config.emulation_flags;
    out->gpaddr_bits = in->gpaddr_bits;
    out->tot_pages = in->tot_pages;
    out->max_pages = in->max_pages;
    out->outstanding_pages = in->outstanding_pages;
    out->shr_pages = in->shr_pages;
    out->paged_pages = in->paged_pages;
    out->shared_info_frame = in->shared_info_frame;
    out->cpu_time = in->cpu_time;
    memcpy(out->handle, in->handle, sizeof(out->handle));
}

int xp_domain_list(xc_interface *xch, uint32_t first, unsigned int max,
                   xp_dominfo *out)
{
    xc_domaininfo_t *info;
    int rc, i, saved;

    if ( max == 0 )
        return 0;
    info = calloc(max, sizeof(*info));
    if ( !info )
        return -1;
    rc = xc_domain_getinfolist(xch, first, max, info);
    saved = errno;
    for ( i = 0; i < rc; i++ )
        xp_dominfo_from(&info[i], &out[i]);
    free(info);
    errno = saved;
    return rc;
}

size_t xp_vcpu_context_size(void)
{
    return sizeof(vcpu_guest_context_any_t);
}

int xp_vcpu_getcontext(xc_interface *xch, uint32_t dom, uint32_t vcpu,
                       void *out, size_t len)
{
    vcpu_guest_context_any_t ctx;
    int rc, saved;

    if ( len != sizeof(ctx) )
    {
        errno = EINVAL;
        return -1;
    }
    memset(&ctx, 0, sizeof(ctx));
    rc = xc_vcpu_getcontext(xch, dom, vcpu, &ctx);
    saved = errno;
    if ( rc == 0 )
        memcpy(out, &ctx, sizeof(ctx));
    errno = saved;
    return rc;
}

int xp_vcpu_setcontext(xc_interface *xch, uint32_t dom, uint32_t vcpu,
                       const void *in, size_t len)
{
    vcpu_guest_context_any_t ctx;

    if ( len != sizeof(ctx) )
    {
        errno = EINVAL;
        return -1;
    }
    memcpy(&ctx, in, sizeof(ctx));
    return xc_vcpu_setcontext(xch, dom, vcpu, &ctx);
}

int xp_vcpu_cr3(xc_interface *xch, uint32_t dom, uint32_t vcpu, int hvm,
                unsigned int guest_width, uint64_t *cr3, uint64_t *frame)
{
    int rc;

    if ( hvm )
    {
        HVM_SAVE_TYPE(CPU) cpu;

        memset(&cpu, 0, sizeof(cpu));
        rc = xc_domain_hvm_getcontext_partial(xch, dom, HVM_SAVE_CODE(CPU),
                                              vcpu, &cpu, sizeof(cpu));
        if ( rc )
            return rc;
        *cr3 = cpu.cr3;
        /* Low 12 bits are PCID/PWT/PCD flags; PAE roots sit in this page. */
        *frame = cpu.cr3 >> 12;
        return 0;
    }
    else
    {
        vcpu_guest_context_any_t ctx;

        memset(&ctx, 0, sizeof(ctx));
        rc = xc_vcpu_getcontext(xch, dom, vcpu, &ctx);
        if ( rc )
            return rc;
        if ( guest_width == 8 )
        {
            *cr3 = ctx.x64.ctrlreg[3];
            *frame = ctx.x64.ctrlreg[3] >> 12;
        }
        else if ( guest_width == 4 )
        {
            uint32_t v = ctx.x32.ctrlreg[3];

            *cr3 = v;
            /* 32-bit PV folds the top bits of the frame into the low 12. */
            *frame = (uint32_t)((v >> 12) | (v << 20));
        }
        else
        {
            errno = EINVAL;
            return -1;
        }
        return 0;
    }
}

static size_t dirty_bytes(unsigned long pages)
{
    return ((pages + 63) / 64) * 8;
}

xp_dirty *xp_dirty_alloc(xc_interface *xch, unsigned long pages)
{
    xp_dirty *d = calloc(1, sizeof(*d));

    if ( !d )
        return NULL;
    /* Same initial state as DECLARE_HYPERCALL_BUFFER gives a local. */
    d->hbuf.hbuf = NULL;
    d->hbuf.param_shadow = NULL;
    d->hbuf.dir = 0;
    d->hbuf.sz = 0;
    d->hbuf.ubuf = (void *)-1;
    d->pages = pages;
    d->nr_alloc_pages = (dirty_bytes(pages) + XC_PAGE_SIZE - 1) / XC_PAGE_SIZE;
    if ( d->nr_alloc_pages == 0 )
        d->nr_alloc_pages = 1;
    d->bitmap = xc__hypercall_buffer_alloc_pages(xch, &d->hbuf,
                                                 d->nr_alloc_pages);
    if ( !d->bitmap )
    {
        int saved = errno;

        free(d);
        errno = saved;
        return NULL;
    }
    return d;
}

void xp_dirty_free(xc_interface *xch, xp_dirty *d)
{
    if ( !d )
        return;
    xc__hypercall_buffer_free_pages(xch, &d->hbuf, d->nr_alloc_pages);
    free(d);
}

long long xp_dirty_op(xc_interface *xch, uint32_t dom, xp_dirty *d,
                      unsigned int op, void *out, size_t out_len,
                      uint32_t *fault_count, uint32_t *dirty_count)
{
    xc_shadow_op_stats_t stats;
    size_t n = dirty_bytes(d->pages);
    long long rc;
    int saved;

    memset(&stats, 0, sizeof(stats));
    memset(d->bitmap, 0, n);
    rc = xc_logdirty_control(xch, dom, op, &d->hbuf, d->pages, 0, &stats);
    saved = errno;
    if ( rc >= 0 )
    {
        if ( out_len < n )
            n = out_len;
        memcpy(out, d->bitmap, n);
        *fault_count = stats.fault_count;
        *dirty_count = stats.dirty_count;
    }
    errno = saved;
    return rc;
}

void *xp_map_batch(xc_interface *xch, uint32_t dom, int prot, size_t n,
                   const xen_pfn_t *pfns, int *errs)
{
    return xenforeignmemory_map(xc_interface_fmem_handle(xch), dom, prot, n,
                                pfns, errs);
}

int xp_unmap(xc_interface *xch, void *addr, size_t n)
{
    return xenforeignmemory_unmap(xc_interface_fmem_handle(xch), addr, n);
}

void xp_vm_event_decode(const vm_event_request_t *req, xp_vm_event *out)
{
    memset(out, 0, sizeof(*out));
    out->version = req->version;
    out->flags = req->flags;
    out->reason = req->reason;
    out->vcpu_id = req->vcpu_id;
    out->altp2m_idx = req->altp2m_idx;
    /* Only paging events are decoded further; others keep gfn 0. */
    if ( req->reason == VM_EVENT_REASON_MEM_PAGING )
    {
        out->gfn = req->u.mem_paging.gfn;
        out->p2mt = req->u.mem_paging.p2mt;
        out->paging_flags = req->u.mem_paging.flags;
    }
}

void xp_vm_event_encode(const xp_vm_event *in, vm_event_response_t *rsp)
{
    memset(rsp, 0, sizeof(*rsp));
    rsp->version = in->version;
    rsp->flags = in->flags;
    rsp->reason = in->reason;
    rsp->vcpu_id = in->vcpu_id;
    rsp->altp2m_idx = in->altp2m_idx;
    rsp->u.mem_paging.gfn = in->gfn;
    rsp->u.mem_paging.p2mt = in->p2mt;
    rsp->u.mem_paging.flags = in->paging_flags;
}

xp_ring *xp_paging_ring_open(xc_interface *xch, uint32_t dom, int *step)
{
    xp_ring *r;
    uint32_t port = 0;
    int lp, saved;

    *step = 4;
    r = calloc(1, sizeof(*r));
    if ( !r )
        return NULL;
    r->local_port = -1;

    *step = 1;
    r->page = xc_vm_event_enable(xch, dom, HVM_PARAM_PAGING_RING_PFN, &port);
    if ( !r->page )
        goto fail;
    r->page_is_foreign = 1;
    r->remote_port = port;

    *step = 2;
    r->xce = xenevtchn_open(NULL, 0);
    if ( !r->xce )
        goto fail_disable;

    *step = 3;
    lp = xenevtchn_bind_interdomain(r->xce, dom, port);
    if ( lp < 0 )
        goto fail_disable;
    r->local_port = lp;

    SHARED_RING_INIT((vm_event_sring_t *)r->page);
    BACK_RING_INIT(&r->back, (vm_event_sring_t *)r->page, XC_PAGE_SIZE);
    *step = 0;
    return r;

 fail_disable:
    saved = errno;
    xc_mem_paging_disable(xch, dom);
    errno = saved;
 fail:
    saved = errno;
    if ( r->xce )
        xenevtchn_close(r->xce);
    if ( r->page )
        xenforeignmemory_unmap(xc_interface_fmem_handle(xch), r->page, 1);
    free(r);
    errno = saved;
    return NULL;
}

xp_ring *xp_ring_local(void)
{
    xp_ring *r = calloc(1, sizeof(*r));

    if ( !r )
        return NULL;
    if ( posix_memalign(&r->page, XC_PAGE_SIZE, XC_PAGE_SIZE) )
    {
        free(r);
        errno = ENOMEM;
        return NULL;
    }
    memset(r->page, 0, XC_PAGE_SIZE);
    r->local_port = -1;
    SHARED_RING_INIT((vm_event_sring_t *)r->page);
    BACK_RING_INIT(&r->back, (vm_event_sring_t *)r->page, XC_PAGE_SIZE);
    FRONT_RING_INIT(&r->front, (vm_event_sring_t *)r->page, XC_PAGE_SIZE);
    return r;
}

void xp_ring_close(xc_interface *xch, xp_ring *r)
{
    if ( !r )
        return;
    if ( r->xce )
    {
        if ( r->local_port >= 0 )
            xenevtchn_unbind(r->xce, r->local_port);
        xenevtchn_close(r->xce);
    }
    if ( r->page )
    {
        if ( r->page_is_foreign )
            xenforeignmemory_unmap(xc_interface_fmem_handle(xch), r->page, 1);
        else
            free(r->page);
    }
    free(r);
}

int xp_ring_has_request(xp_ring *r)
{
    return RING_HAS_UNCONSUMED_REQUESTS(&r->back) ? 1 : 0;
}

int xp_ring_get_request(xp_ring *r, xp_vm_event *out)
{
    vm_event_request_t req;
    RING_IDX cons;

    if ( !RING_HAS_UNCONSUMED_REQUESTS(&r->back) )
        return 0;
    /* Read the request only after seeing the producer index move. */
    xen_rmb();
    cons = r->back.req_cons;
    RING_COPY_REQUEST(&r->back, cons, &req);
    cons++;
    r->back.req_cons = cons;
    /* Ask for an event when the next request arrives. */
    r->back.sring->req_event = cons + 1;
    xp_vm_event_decode(&req, out);
    return 1;
}

int xp_ring_put_response(xp_ring *r, const xp_vm_event *in)
{
    vm_event_response_t rsp;
    RING_IDX prod = r->back.rsp_prod_pvt;

    /*
     * A response takes the slot of a consumed request; producing more
     * responses than requests consumed would overwrite pending requests.
     */
    if ( prod == r->back.req_cons )
    {
        errno = ENOSPC;
        return -1;
    }
    xp_vm_event_encode(in, &rsp);
    memcpy(RING_GET_RESPONSE(&r->back, prod), &rsp, sizeof(rsp));
    /*
     * Read the slot back before publishing it: in the nested TCG lab Xen
     * once dropped one of our responses as a version mismatch.
     */
    if ( memcmp(RING_GET_RESPONSE(&r->back, prod), &rsp, sizeof(rsp)) )
    {
        errno = EIO;
        return -1;
    }
    r->back.rsp_prod_pvt = prod + 1;
    RING_PUSH_RESPONSES(&r->back);
    return 0;
}

int xp_ring_wait(xp_ring *r, int timeout_ms)
{
    struct pollfd pfd;
    xenevtchn_port_or_error_t port;
    int rc;

    if ( !r->xce )
        return xp_ring_has_request(r);
    pfd.fd = xenevtchn_fd(r->xce);
    pfd.events = POLLIN | POLLERR;
    pfd.revents = 0;
    rc = poll(&pfd, 1, timeout_ms);
    if ( rc == 0 )
        return 0;
    if ( rc < 0 )
        return errno == EINTR ? 0 : -1;
    port = xenevtchn_pending(r->xce);
    if ( port < 0 )
        return -1;
    if ( xenevtchn_unmask(r->xce, port) < 0 )
        return -1;
    return 1;
}

int xp_ring_notify(xp_ring *r)
{
    if ( !r->xce )
        return 0;
    return xenevtchn_notify(r->xce, r->local_port);
}

void xp_ring_get_state(xp_ring *r, xp_ring_state *out)
{
    vm_event_sring_t *s = r->back.sring;

    xen_rmb();
    out->req_prod = s->req_prod;
    out->req_event = s->req_event;
    out->rsp_prod = s->rsp_prod;
    out->rsp_event = s->rsp_event;
    out->req_cons = r->back.req_cons;
    out->rsp_prod_pvt = r->back.rsp_prod_pvt;
}

int xp_ring_response_versions(xp_ring *r, uint32_t *out, int n)
{
    int i;
    RING_IDX idx = r->back.rsp_prod_pvt;

    for ( i = 0; i < n && i < (int)RING_SIZE(&r->back) && idx != 0; i++ )
    {
        idx--;
        out[i] = RING_GET_RESPONSE(&r->back, idx)->version;
    }
    return i;
}

int xp_ring_test_push_request(xp_ring *r, const xp_vm_event *in)
{
    vm_event_request_t req;

    if ( RING_FULL(&r->front) )
    {
        errno = ENOSPC;
        return -1;
    }
    xp_vm_event_encode(in, &req);
    memcpy(RING_GET_REQUEST(&r->front, r->front.req_prod_pvt), &req,
           sizeof(req));
    r->front.req_prod_pvt++;
    RING_PUSH_REQUESTS(&r->front);
    return 0;
}

int xp_ring_test_pop_response(xp_ring *r, xp_vm_event *out)
{
    vm_event_response_t rsp;

    if ( !RING_HAS_UNCONSUMED_RESPONSES(&r->front) )
        return 0;
    xen_rmb();
    memcpy(&rsp, RING_GET_RESPONSE(&r->front, r->front.rsp_cons), sizeof(rsp));
    r->front.rsp_cons++;
    xp_vm_event_decode(&rsp, out);
    return 1;
}

void xp_get_layout(xp_layout *l)
{
    memset(l, 0, sizeof(*l));
    l->vm_event_request_size = sizeof(vm_event_request_t);
    l->vm_event_u_offset = offsetof(vm_event_request_t, u);
    l->vm_event_data_offset = offsetof(vm_event_request_t, data);
    l->vm_event_ring_entries = __CONST_RING_SIZE(vm_event, XC_PAGE_SIZE);
    l->vm_event_interface_version = VM_EVENT_INTERFACE_VERSION;
    l->vcpu_context_size = sizeof(vcpu_guest_context_any_t);
    l->xen_pfn_size = sizeof(xen_pfn_t);
    l->dominfo_size = sizeof(xc_domaininfo_t);
    l->hvm_cpu_save_code = HVM_SAVE_CODE(CPU);
    l->hvm_cpu_save_len = HVM_SAVE_LENGTH(CPU);
    l->hvm_cpu_cr3_offset = offsetof(HVM_SAVE_TYPE(CPU), cr3);
    l->hvm_cpu_offsets[0] = offsetof(HVM_SAVE_TYPE(CPU), rsp);
    l->hvm_cpu_offsets[1] = offsetof(HVM_SAVE_TYPE(CPU), rip);
    l->hvm_cpu_offsets[2] = offsetof(HVM_SAVE_TYPE(CPU), cr0);
    l->hvm_cpu_offsets[3] = offsetof(HVM_SAVE_TYPE(CPU), cr3);
    l->hvm_cpu_offsets[4] = offsetof(HVM_SAVE_TYPE(CPU), cr4);
    l->hvm_cpu_offsets[5] = offsetof(HVM_SAVE_TYPE(CPU), gs_base);
    l->hvm_cpu_offsets[6] = offsetof(HVM_SAVE_TYPE(CPU), shadow_gs);
    l->hvm_cpu_offsets[7] = offsetof(HVM_SAVE_TYPE(CPU), msr_efer);
    l->paging_ring_param = HVM_PARAM_PAGING_RING_PFN;
}

long xp_xs_domid_by_name(const char *name)
{
    struct xs_handle *xs;
    char **ents;
    unsigned int n = 0, i;
    long found = -1;
    int saved = ENOENT;

    xs = xs_open(0);
    if ( !xs )
        return -1;
    ents = xs_directory(xs, XBT_NULL, "/local/domain", &n);
    if ( !ents )
    {
        saved = errno;
        xs_close(xs);
        errno = saved;
        return -1;
    }
    for ( i = 0; i < n && found < 0; i++ )
    {
        char path[64];
        unsigned int len = 0;
        char *v;

        snprintf(path, sizeof(path), "/local/domain/%s/name", ents[i]);
        v = xs_read(xs, XBT_NULL, path, &len);
        if ( v && strcmp(v, name) == 0 )
        {
            char *end;
            long id = strtol(ents[i], &end, 10);

            if ( *end == '\0' && id >= 0 )
                found = id;
        }
        free(v);
    }
    free(ents);
    xs_close(xs);
    if ( found < 0 )
        errno = saved;
    return found;
}
