//go:build cgo

package xenctrl

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestOpenOutsideDom0(t *testing.T) {
	if _, err := os.Stat(PrivcmdPath); err == nil {
		t.Skip("precondition absent: " + PrivcmdPath + " exists, this is a Xen dom0")
	}
	h, err := Open()
	require.Error(t, err)
	assert.Nil(t, h)
	assert.True(t, strings.HasPrefix(err.Error(), "not running in a Xen dom0 (/dev/xen/privcmd missing)"), err.Error())
	assert.Contains(t, err.Error(), "modprobe xen-privcmd", "the error should say what to do")
	assert.ErrorIs(t, err, ErrNotDom0)
}

func TestOpenAtMissingDevice(t *testing.T) {
	path := filepath.Join(t.TempDir(), "privcmd")
	_, err := openAt(path)
	require.ErrorIs(t, err, ErrNotDom0)
	assert.True(t, strings.HasPrefix(err.Error(), "not running in a Xen dom0 ("+path+" missing)"), err.Error())
}

func TestOpenAtPresentDeviceReachesLibxc(t *testing.T) {
	// With the device present (a plain file here), Open gets past the dom0
	// check and libxenctrl itself is asked; outside Xen that must fail
	// with an *Error naming xc_interface_open, not with ErrNotDom0.
	if _, err := os.Stat(PrivcmdPath); err == nil {
		t.Skip("precondition absent: this is a Xen dom0, xc_interface_open would succeed")
	}
	path := filepath.Join(t.TempDir(), "privcmd")
	require.NoError(t, os.WriteFile(path, nil, 0o600))
	h, err := openAt(path)
	if err == nil {
		h.Close()
		t.Fatal("xc_interface_open succeeded without Xen")
	}
	assert.NotErrorIs(t, err, ErrNotDom0)
	var xe *Error
	require.ErrorAs(t, err, &xe)
	assert.Equal(t, "xc_interface_open", xe.Op)
	assert.NotZero(t, xe.Errno)
}

func TestErrorFormatAndUnwrap(t *testing.T) {
	e := &Error{Op: "xc_domain_pause", Dom: 7, HasDom: true, Errno: syscall.EPERM}
	assert.Equal(t, "xc_domain_pause(dom 7): operation not permitted", e.Error())
	assert.ErrorIs(t, e, syscall.EPERM)
	assert.NotErrorIs(t, e, syscall.ENOENT)

	e = &Error{Op: "xenforeignmemory_map", Dom: 3, HasDom: true, Detail: "pfn 0x10", Errno: syscall.ENOENT, Hint: "page is paged out"}
	assert.Equal(t, "xenforeignmemory_map(dom 3, pfn 0x10): no such file or directory (page is paged out)", e.Error())
}

func TestErrnoOf(t *testing.T) {
	assert.Equal(t, syscall.EBUSY, errnoOf(-1, syscall.EBUSY))
	assert.Equal(t, syscall.EINVAL, errnoOf(-22, nil), "negative errno return")
	assert.Equal(t, syscall.EIO, errnoOf(-1, nil), "failure without errno")
	assert.Equal(t, syscall.EIO, errnoOf(-1, syscall.Errno(0)))
}

func TestClosedHandle(t *testing.T) {
	var h Handle
	assert.ErrorIs(t, h.Pause(1), ErrClosed)
	_, err := h.Domains()
	assert.ErrorIs(t, err, ErrClosed)
	_, err = h.MapBatch(1, ProtRead, []uint64{1})
	assert.ErrorIs(t, err, ErrClosed)
	assert.NoError(t, h.Close())
}

func TestABILayout(t *testing.T) {
	l := ABILayout()
	// xen/include/public/vm_event.h, interface version 7: a 24-byte header
	// (version, flags, reason, vcpu_id, altp2m_idx, pad[3]), a union whose
	// largest member is 32 bytes... the whole request is 400 bytes.
	assert.EqualValues(t, 7, l.VMEventInterfaceVersion)
	assert.EqualValues(t, 7, VMEventInterfaceVersion)
	assert.EqualValues(t, 400, l.VMEventRequestSize)
	assert.EqualValues(t, 24, l.VMEventUnionOffset)
	// One 4 KiB page minus the 64-byte ring header holds 10 slots of 400
	// bytes, rounded down to a power of two.
	assert.EqualValues(t, 8, l.VMEventRingEntries)
	assert.EqualValues(t, 8, l.XenPFNSize)
	assert.EqualValues(t, 27, l.PagingRingParam)
	assert.EqualValues(t, 27, HVMParamPagingRingPFN)
	assert.EqualValues(t, 2, l.HVMCPUSaveCode, "HVM_SAVE_CODE(CPU)")
	assert.Less(t, l.HVMCPUCR3Offset, l.HVMCPUSaveLength)
	assert.EqualValues(t, VCPUContextSize(), l.VCPUContextSize)
	assert.Greater(t, l.VCPUContextSize, uint64(4096), "x86-64 PV context carries a 256-entry trap table")
	assert.EqualValues(t, 4096, PageSize)
	assert.EqualValues(t, 3, ReasonMemPaging)
	assert.EqualValues(t, 1, FlagVCPUPaused)
}

func TestResponseWireLayout(t *testing.T) {
	rsp := Response{Flags: FlagVCPUPaused, Reason: ReasonMemPaging, VCPUID: 3, AltP2MIdx: 2,
		GFN: 0x12345, P2MType: 9, PagingFlags: PagingDropPage}
	w := encodeResponseWire(rsp)
	require.Len(t, w, 400)
	le := binary.LittleEndian
	assert.EqualValues(t, 7, le.Uint32(w[0:]), "version must be VM_EVENT_INTERFACE_VERSION or Xen drops the response")
	assert.EqualValues(t, FlagVCPUPaused, le.Uint32(w[4:]))
	assert.EqualValues(t, ReasonMemPaging, le.Uint32(w[8:]))
	assert.EqualValues(t, 3, le.Uint32(w[12:]))
	assert.EqualValues(t, 2, le.Uint16(w[16:]))
	assert.EqualValues(t, 0x12345, le.Uint64(w[24:]), "u.mem_paging.gfn")
	assert.EqualValues(t, 9, le.Uint32(w[32:]), "u.mem_paging.p2mt")
	assert.EqualValues(t, PagingDropPage, le.Uint32(w[36:]), "u.mem_paging.flags")
	for i := 40; i < len(w); i++ {
		if w[i] != 0 {
			t.Fatalf("byte %d of the response is %#x, want the rest zeroed", i, w[i])
		}
	}
}

func TestRequestWireDecode(t *testing.T) {
	raw := make([]byte, 400)
	le := binary.LittleEndian
	le.PutUint32(raw[0:], 7)
	le.PutUint32(raw[4:], FlagVCPUPaused|FlagForeign)
	le.PutUint32(raw[8:], ReasonMemPaging)
	le.PutUint32(raw[12:], 1)
	le.PutUint64(raw[24:], 0xabcde)
	le.PutUint32(raw[32:], 11)
	le.PutUint32(raw[36:], PagingEvictFail)
	req, err := decodeRequestWire(raw)
	require.NoError(t, err)
	assert.Equal(t, Request{Version: 7, Flags: FlagVCPUPaused | FlagForeign, Reason: ReasonMemPaging,
		VCPUID: 1, GFN: 0xabcde, P2MType: 11, PagingFlags: PagingEvictFail}, req)

	// A non-paging event does not have its union read as paging fields.
	le.PutUint32(raw[8:], 1) // MEM_ACCESS
	req, err = decodeRequestWire(raw)
	require.NoError(t, err)
	assert.Zero(t, req.GFN)

	_, err = decodeRequestWire(raw[:399])
	assert.Error(t, err)
}

func TestResponseForCopiesWhatXenNeeds(t *testing.T) {
	req := Request{Version: 7, Flags: FlagVCPUPaused, Reason: ReasonMemPaging, VCPUID: 2, AltP2MIdx: 1,
		GFN: 0x42, P2MType: 5, PagingFlags: PagingDropPage}
	rsp := ResponseFor(req)
	assert.Equal(t, Response{Flags: FlagVCPUPaused, Reason: ReasonMemPaging, VCPUID: 2, AltP2MIdx: 1,
		GFN: 0x42, P2MType: 5, PagingFlags: PagingDropPage}, rsp)
}

func TestDomainInfoConversion(t *testing.T) {
	// A running PVH domain with HAP, shutdown reason encoded in the flags.
	flags := uint32(testDominfHVM | testDominfHAP)
	d := domInfoThroughC(5, flags, 32000, 32768, 0xfeff, 2, testEmuLAPIC)
	assert.EqualValues(t, 5, d.ID)
	assert.True(t, d.HVM)
	assert.True(t, d.HAP)
	assert.True(t, d.PVH)
	assert.Equal(t, "pvh", d.Kind())
	assert.False(t, d.Paused)
	assert.EqualValues(t, 32000, d.TotPages)
	assert.EqualValues(t, 32768, d.MaxPages)
	assert.EqualValues(t, 0xfeff, d.SharedInfoFrame)
	assert.EqualValues(t, 2, d.OnlineVCPUs)
	assert.EqualValues(t, 1, d.MaxVCPUID)
	assert.EqualValues(t, 1, d.Handle[0])
	assert.EqualValues(t, 16, d.Handle[15])

	// A fully emulated HVM domain.
	d = domInfoThroughC(6, testDominfHVM, 1, 1, 0, 1, testEmuAll)
	assert.Equal(t, "hvm", d.Kind())

	// A paused PV domain that crashed (SHUTDOWN_crash = 3).
	flags = uint32(testDominfPaused | testDominfShutdown | testDominfDying | 3<<testShutdownShift)
	d = domInfoThroughC(7, flags, 10, 20, 0, 1, 0)
	assert.Equal(t, "pv", d.Kind())
	assert.True(t, d.Paused)
	assert.True(t, d.Shutdown)
	assert.True(t, d.Dying)
	assert.EqualValues(t, 3, d.ShutdownReason)
	assert.True(t, d.Crashed)
	assert.False(t, d.HVM)
}

func TestPageTypeIsPageTable(t *testing.T) {
	for _, tc := range []struct {
		t    PageType
		want bool
	}{
		{PageNormal, false}, {PageL1, true}, {PageL4, true}, {PageL2 | PagePinned, true},
		{PageInvalid, false}, {PageXAlloc, false}, {PageBroken, false},
	} {
		assert.Equal(t, tc.want, tc.t.IsPageTable(), "type %#x", uint32(tc.t))
	}
}

func TestAppendSetBits(t *testing.T) {
	bm := make([]uint64, 3)
	for _, p := range []uint64{0, 5, 63, 64, 130, 191} {
		bm[p/64] |= 1 << (p % 64)
	}
	assert.Equal(t, []uint64{0, 5, 63, 64, 130, 191}, AppendSetBits(nil, bm, 192))
	assert.Equal(t, []uint64{0, 5, 63, 64}, AppendSetBits(nil, bm, 130), "limit excludes pfn 130 and up")
	assert.Equal(t, []uint64{99, 0}, AppendSetBits([]uint64{99}, bm, 1))
	assert.Empty(t, AppendSetBits(nil, make([]uint64, 4), 256))
}

func TestPagingRingRoundTrip(t *testing.T) {
	l, err := newLocalRing()
	require.NoError(t, err)
	defer l.Close()

	assert.False(t, l.HasRequest())
	_, ok, err := l.GetRequest()
	require.NoError(t, err)
	assert.False(t, ok)
	// No request consumed: a response would overwrite a pending slot.
	assert.True(t, errIsENOSPC(l.PutResponse(Response{GFN: 1})))

	// Xen queues more requests than the ring has slots over time; the
	// ring wraps.
	for round := 0; round < 3; round++ {
		for i := 0; i < 8; i++ {
			require.NoError(t, l.pushRequest(Request{Version: 7, Flags: FlagVCPUPaused, Reason: ReasonMemPaging,
				VCPUID: uint32(i % 2), GFN: uint64(round*100 + i)}))
		}
		assert.Error(t, l.pushRequest(Request{Version: 7}), "ring of 8 is full")
		for i := 0; i < 8; i++ {
			require.True(t, l.HasRequest())
			req, ok, err := l.GetRequest()
			require.NoError(t, err)
			require.True(t, ok)
			assert.EqualValues(t, round*100+i, req.GFN)
			require.NoError(t, l.PutResponse(ResponseFor(req)))
		}
		assert.False(t, l.HasRequest())
		for i := 0; i < 8; i++ {
			rsp, ok := l.popResponse()
			require.True(t, ok)
			assert.EqualValues(t, 7, rsp.Version)
			assert.EqualValues(t, FlagVCPUPaused, rsp.Flags)
			assert.EqualValues(t, round*100+i, rsp.GFN)
			assert.EqualValues(t, i%2, rsp.VCPUID)
		}
		_, ok := l.popResponse()
		assert.False(t, ok)
	}
	require.NoError(t, l.Notify(), "no event channel on a local ring: notify is a no-op")
	got, err := l.Wait(0)
	require.NoError(t, err)
	assert.False(t, got)
}

func TestPagingRingVersionMismatch(t *testing.T) {
	l, err := newLocalRing()
	require.NoError(t, err)
	defer l.Close()
	require.NoError(t, l.pushRequest(Request{Version: 6, Reason: ReasonMemPaging, GFN: 9}))
	req, ok, err := l.GetRequest()
	require.True(t, ok)
	assert.EqualValues(t, 9, req.GFN)
	assert.ErrorIs(t, err, syscall.EPROTO)
	var xe *Error
	require.True(t, errors.As(err, &xe))
	assert.Contains(t, xe.Detail, "version 6")
}

func TestHints(t *testing.T) {
	assert.Contains(t, logDirtyHint(syscall.EOPNOTSUPP, false), "CONFIG_SHADOW_PAGING")
	assert.Contains(t, pagingHint(syscall.EOPNOTSUPP), "CONFIG_MEM_PAGING")
	assert.Contains(t, pagingHint(syscall.ENODEV), "HAP")
}

func TestPagingRingState(t *testing.T) {
	l, err := newLocalRing()
	require.NoError(t, err)
	defer l.Close()
	for i := 0; i < 2; i++ {
		require.NoError(t, l.pushRequest(Request{Version: 7, Reason: ReasonMemPaging, GFN: uint64(i)}))
	}
	req, ok, err := l.GetRequest()
	require.NoError(t, err)
	require.True(t, ok)
	require.NoError(t, l.PutResponse(ResponseFor(req)))
	s := l.State()
	assert.EqualValues(t, 2, s.ReqProd, "Xen produced two requests")
	assert.EqualValues(t, 1, s.ReqCons)
	assert.EqualValues(t, 2, s.ReqEvent, "we ask for an event at the next request")
	assert.EqualValues(t, 1, s.RspProd, "our response is published")
	assert.EqualValues(t, 1, s.RspProdPvt)
	assert.Contains(t, s.String(), "req_prod=2 req_cons=1")
	assert.Equal(t, []uint32{VMEventInterfaceVersion}, l.ResponseVersions(4), "one response so far")
	assert.Nil(t, l.ResponseVersions(0))
}

func TestSuspendCallsOnClosedHandle(t *testing.T) {
	// Without a dom0 no Handle can be opened (TestOpenOutsideDom0); a zero
	// or nil Handle must fail cleanly before reaching libxc.
	for name, h := range map[string]*Handle{"zero": {}, "nil": nil} {
		t.Run(name, func(t *testing.T) {
			assert.ErrorIs(t, h.ResumeDomain(1, true), ErrClosed)
			assert.ErrorIs(t, h.ResumeDomain(1, false), ErrClosed)
			assert.ErrorIs(t, h.ShutdownDomain(1, ShutdownSuspend), ErrClosed)
			ti, err := h.TSCInfo(1)
			assert.ErrorIs(t, err, ErrClosed)
			assert.Equal(t, TSCInfo{}, ti)
			assert.ErrorIs(t, h.SetTSCInfo(1, TSCInfo{GTSCkHz: 2000000}), ErrClosed)
		})
	}
}

func TestShutdownReasons(t *testing.T) {
	// xen/include/public/sched.h: these values are guest ABI.
	assert.EqualValues(t, 0, ShutdownPoweroff)
	assert.EqualValues(t, 1, ShutdownReboot)
	assert.EqualValues(t, 2, ShutdownSuspend)
	assert.EqualValues(t, 3, ShutdownCrash)
	assert.EqualValues(t, shutdownCrash, ShutdownCrash)
	assert.EqualValues(t, 5, shutdownMax)
}

func TestShutdownDomainRejectsBadReason(t *testing.T) {
	var h Handle // checked before the handle, so no Xen is needed
	err := h.ShutdownDomain(4, 99)
	require.ErrorIs(t, err, syscall.EINVAL)
	var xe *Error
	require.ErrorAs(t, err, &xe)
	assert.Equal(t, "xc_domain_shutdown(dom 4, reason 99: not a SHUTDOWN_* code (max 5)): invalid argument", xe.Error())
	assert.ErrorIs(t, h.ShutdownDomain(4, shutdownMax), ErrClosed, "the highest valid reason passes the check")
}

// xenforeignmemory_map reports a paged-out page as -ENOENT in its err
// array; the Errno must match syscall.ENOENT.
func TestMapErrnoIsPositive(t *testing.T) {
	assert.Equal(t, syscall.ENOENT, mapErrno(-int(syscall.ENOENT)))
	assert.Equal(t, syscall.EFAULT, mapErrno(int(syscall.EFAULT)))
	err := &Error{Op: "xenforeignmemory_map", Errno: mapErrno(-int(syscall.ENOENT))}
	assert.ErrorIs(t, err, syscall.ENOENT)
}
