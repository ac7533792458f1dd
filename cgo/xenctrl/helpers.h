/*
 * C side of package xenctrl: flat structs and small wrappers around the Xen
 * 4.17 tool libraries for the things cgo cannot express (bitfields, unions,
 * hypercall buffers, ring macros). Nothing here is exported from the Go
 * package; Go code converts every xp_* struct into a Go type.
 */
#ifndef XL_POSTCOPY_XENCTRL_HELPERS_H
#define XL_POSTCOPY_XENCTRL_HELPERS_H

#include <stdint.h>
#include <stddef.h>
#include <xenctrl.h>
#include <xenforeignmemory.h>
#include <xenevtchn.h>
#include <xenstore.h>
#include <xen/vm_event.h>
#include <xen/io/ring.h>
#include <xen/hvm/params.h>
#include <xen/hvm/save.h>

/*
 * Exported by libxenctrl.so but declared only in the private xc_private.h,
 * so we declare them here with the 4.17 signatures.
 */
int xc_get_pfn_type_batch(xc_interface *xch, uint32_t dom, unsigned int num,
                          xen_pfn_t *arr);
void *xc_vm_event_enable(xc_interface *xch, uint32_t domain_id, int param,
                         uint32_t *port);

/* One domain, flattened from xc_domaininfo_t (no bitfields, no unions). */
typedef struct xp_dominfo {
    uint32_t domid;
    uint32_t flags; /* XEN_DOMINF_* */
    uint32_t shutdown_reason;
    uint32_t nr_online_vcpus;
    uint32_t max_vcpu_id;
    uint32_t cpupool;
    uint32_t emulation_flags; /* arch_config.emulation_flags (x86) */
    uint32_t gpaddr_bits;
    uint64_t tot_pages;
    uint64_t max_pages;
    uint64_t outstanding_pages;
    uint64_t shr_pages;
    uint64_t paged_pages;
    uint64_t shared_info_frame;
    uint64_t cpu_time;
    uint8_t handle[16];
} xp_dominfo;

void xp_dominfo_from(const xc_domaininfo_t *in, xp_dominfo *out);
int xp_domain_list(xc_interface *xch, uint32_t first, unsigned int max,
                   xp_dominfo *out);

/* vCPU context: the union is copied through a properly aligned local. */
size_t xp_vcpu_context_size(void);
int xp_vcpu_getcontext(xc_interface *xch, uint32_t dom, uint32_t vcpu,
                       void *out, size_t len);
int xp_vcpu_setcontext(xc_interface *xch, uint32_t dom, uint32_t vcpu,
                       const void *in, size_t len);

/*
 * Page-table root of a vCPU. HVM/PVH: guest-physical CR3 from the HVM CPU
 * save record. PV: CR3 from the vCPU context (machine frame, per guest
 * width). frame is CR3 decoded to a frame number.
 */
int xp_vcpu_cr3(xc_interface *xch, uint32_t dom, uint32_t vcpu, int hvm,
                unsigned int guest_width, uint64_t *cr3, uint64_t *frame);

/* Log-dirty bitmap in a hypercall-safe buffer, kept across rounds. */
typedef struct xp_dirty {
    xc_hypercall_buffer_t hbuf;
    void *bitmap;
    unsigned long pages;
    int nr_alloc_pages;
} xp_dirty;

xp_dirty *xp_dirty_alloc(xc_interface *xch, unsigned long pages);
void xp_dirty_free(xc_interface *xch, xp_dirty *d);
/* op is XEN_DOMCTL_SHADOW_OP_PEEK or _CLEAN; copies the bitmap to out. */
long long xp_dirty_op(xc_interface *xch, uint32_t dom, xp_dirty *d,
                      unsigned int op, void *out, size_t out_len,
                      uint32_t *fault_count, uint32_t *dirty_count);

/* Foreign mapping through the fmem handle that xch owns. */
void *xp_map_batch(xc_interface *xch, uint32_t dom, int prot, size_t n,
                   const xen_pfn_t *pfns, int *errs);
int xp_unmap(xc_interface *xch, void *addr, size_t n);

/* vm_event requests and responses in a flat form. */
typedef struct xp_vm_event {
    uint32_t version;
    uint32_t flags;
    uint32_t reason;
    uint32_t vcpu_id;
    uint16_t altp2m_idx;
    uint64_t gfn;
    uint32_t p2mt;
    uint32_t paging_flags;
} xp_vm_event;

void xp_vm_event_decode(const vm_event_request_t *req, xp_vm_event *out);
void xp_vm_event_encode(const xp_vm_event *in, vm_event_response_t *rsp);

/* The back end of a vm_event ring on one mapped page. */
typedef struct xp_ring {
    vm_event_back_ring_t back;
    vm_event_front_ring_t front; /* only for xp_ring_local (tests) */
    void *page;
    int page_is_foreign; /* unmap with xenforeignmemory, else free() */
    xenevtchn_handle *xce;
    uint32_t remote_port;
    int local_port;
} xp_ring;

/*
 * Enables paging on dom and sets up the ring. On failure returns NULL with
 * errno set and *step naming the failing call (1 vm_event_enable,
 * 2 xenevtchn_open, 3 xenevtchn_bind_interdomain, 4 calloc).
 */
xp_ring *xp_paging_ring_open(xc_interface *xch, uint32_t dom, int *step);
/* A ring on a private page with no Xen behind it (unit tests). */
xp_ring *xp_ring_local(void);
void xp_ring_close(xc_interface *xch, xp_ring *r);
int xp_ring_has_request(xp_ring *r);
int xp_ring_get_request(xp_ring *r, xp_vm_event *out);
int xp_ring_put_response(xp_ring *r, const xp_vm_event *in);
/* 1 = event (pending port unmasked), 0 = timeout, -1 = error (errno). */
int xp_ring_wait(xp_ring *r, int timeout_ms);
int xp_ring_notify(xp_ring *r);

/* Indexes of the shared ring and of our back end, for diagnostics. */
typedef struct xp_ring_state {
    uint32_t req_prod, req_event, rsp_prod, rsp_event; /* shared page */
    uint32_t req_cons, rsp_prod_pvt;                   /* our back end */
} xp_ring_state;
void xp_ring_get_state(xp_ring *r, xp_ring_state *out);
/* The version field of the n responses before rsp_prod_pvt, newest first. */
int xp_ring_response_versions(xp_ring *r, uint32_t *out, int n);

/* Front-end side on a local ring, standing in for Xen in unit tests. */
int xp_ring_test_push_request(xp_ring *r, const xp_vm_event *in);
int xp_ring_test_pop_response(xp_ring *r, xp_vm_event *out);

/* Layout facts for the unit tests. */
typedef struct xp_layout {
    uint64_t vm_event_request_size;
    uint64_t vm_event_u_offset;
    uint64_t vm_event_data_offset;
    uint64_t vm_event_ring_entries;
    uint64_t vm_event_interface_version;
    uint64_t vcpu_context_size;
    uint64_t xen_pfn_size;
    uint64_t dominfo_size;
    uint64_t hvm_cpu_save_code;
    uint64_t hvm_cpu_save_len;
    uint64_t hvm_cpu_cr3_offset;
    uint64_t hvm_cpu_offsets[8]; /* rsp rip cr0 cr3 cr4 gs_base shadow_gs msr_efer */
    uint64_t paging_ring_param;
} xp_layout;
void xp_get_layout(xp_layout *l);

/* xenstore: domid of a domain name; -1 with errno ENOENT when absent. */
long xp_xs_domid_by_name(const char *name);

#endif
