package xenctrl

/*
#include "helpers.h"
*/
import "C"

import (
	"fmt"
	"syscall"
	"unsafe"
)

// Mapping is a batch of another domain's pages mapped contiguously into
// this process, page i at offset i*PageSize. Mapping can partly succeed:
// Err(i) says whether page i is usable. The memory is not Go memory; it is
// valid until Unmap.
type Mapping struct {
	h    *Handle
	dom  uint32
	addr unsafe.Pointer
	pfns []uint64
	errs []C.int
	data []byte
	bad  int
}

// MapBatch maps the pages at pfns (gfns for HVM/PVH; for PV the same pfn
// space xl's save code maps) with xenforeignmemory_map. A nil *Mapping and
// an error means nothing was mapped; otherwise check Failed/Err per page.
func (h *Handle) MapBatch(dom uint32, prot Prot, pfns []uint64) (*Mapping, error) {
	if err := h.alive(); err != nil {
		return nil, err
	}
	if len(pfns) == 0 {
		return nil, &Error{Op: "xenforeignmemory_map", Dom: dom, HasDom: true, Errno: syscall.EINVAL, Detail: "no pages"}
	}
	arr := toPFNs(pfns)
	errs := make([]C.int, len(pfns))
	addr, err := C.xp_map_batch(h.xch, C.uint32_t(dom), C.int(prot), C.size_t(len(arr)), &arr[0], &errs[0])
	if addr == nil {
		e := &Error{Op: "xenforeignmemory_map", Dom: dom, HasDom: true, Detail: pfnsDetail(pfns), Errno: errnoOf(-1, err)}
		h.logf("%v", e)
		return nil, e
	}
	m := &Mapping{h: h, dom: dom, addr: addr, pfns: append([]uint64(nil), pfns...), errs: errs}
	m.data = unsafe.Slice((*byte)(addr), len(pfns)*PageSize)
	for _, e := range errs {
		if e != 0 {
			m.bad++
		}
	}
	h.logf("xenforeignmemory_map(dom %d, %s) = %p, %d of %d pages failed", dom, pfnsDetail(pfns), addr, m.bad, len(pfns))
	return m, nil
}

// Len is the number of pages in the batch.
func (m *Mapping) Len() int { return len(m.pfns) }

// Failed is the number of pages that could not be mapped.
func (m *Mapping) Failed() int { return m.bad }

// PFN is the pfn of page i.
func (m *Mapping) PFN(i int) uint64 { return m.pfns[i] }

// Err is nil if page i is mapped, else an *Error with the page's errno
// (e.g. ENOENT for a paged-out or absent page).
func (m *Mapping) Err(i int) error {
	if m.errs[i] == 0 {
		return nil
	}
	en := mapErrno(int(m.errs[i]))
	return &Error{Op: "xenforeignmemory_map", Dom: m.dom, HasDom: true, Detail: fmt.Sprintf("pfn %#x", m.pfns[i]), Errno: en}
}

// Page returns page i's memory, or the page's error. The slice is valid
// until Unmap.
func (m *Mapping) Page(i int) ([]byte, error) {
	if m.data == nil {
		return nil, ErrClosed
	}
	if err := m.Err(i); err != nil {
		return nil, err
	}
	return m.data[i*PageSize : (i+1)*PageSize : (i+1)*PageSize], nil
}

// Unmap releases the mapping; the page slices must not be used after it.
func (m *Mapping) Unmap() error {
	if m.data == nil {
		return nil
	}
	m.data = nil
	rc, err := C.xp_unmap(m.h.xch, m.addr, C.size_t(len(m.pfns)))
	m.addr = nil
	return m.h.result("xenforeignmemory_unmap", m.dom, pfnsDetail(m.pfns), int64(rc), err)
}

// ReadPage copies the page at pfn into dst (PageSize bytes).
func (h *Handle) ReadPage(dom uint32, pfn uint64, dst []byte) error {
	return h.pageIO(dom, pfn, dst, false)
}

// WritePage copies src (PageSize bytes) into the page at pfn.
func (h *Handle) WritePage(dom uint32, pfn uint64, src []byte) error {
	return h.pageIO(dom, pfn, src, true)
}

func (h *Handle) pageIO(dom uint32, pfn uint64, buf []byte, write bool) error {
	if len(buf) != PageSize {
		return &Error{Op: "xenforeignmemory_map", Dom: dom, HasDom: true, Errno: syscall.EINVAL,
			Detail: fmt.Sprintf("pfn %#x: buffer is %d bytes, want %d", pfn, len(buf), PageSize)}
	}
	prot := ProtRead
	if write {
		prot = ProtReadWrite
	}
	m, err := h.MapBatch(dom, prot, []uint64{pfn})
	if err != nil {
		return err
	}
	p, err := m.Page(0)
	if err == nil {
		if write {
			copy(p, buf)
		} else {
			copy(buf, p)
		}
	}
	if uerr := m.Unmap(); err == nil {
		err = uerr
	}
	return err
}
