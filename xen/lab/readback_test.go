package lab

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/engine"
	"github.com/xl-postcopy/xl-postcopy/xen/wire"
)

// The lab destination implements engine.ReadBacker: `verified` is about
// what its memory holds.
var _ engine.ReadBacker = (*Dest)(nil)

// A lab migration is verified from the destination's memory: every page
// is read back, those the resumed guest wrote (and only those: the guest
// writes only in its working set) are exempt, the rest compared.
func TestLabVerifiesFromDestinationMemory(t *testing.T) {
	for _, c := range []struct {
		mode wire.Mode
		wl   string
	}{{wire.ModePostcopy, "zipf"}, {wire.ModePostcopy, "scan"}, {wire.ModePrecopy, "zipf"}, {wire.ModeHybrid, "scan"}} {
		t.Run(c.mode.String()+"/"+c.wl, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			dom := smallDomain(c.wl)
			res, err := Run(ctx, RunConfig{Domain: dom, Engine: engine.Options{Mode: c.mode, Prepaging: "dual", MaxRounds: 5},
				Warmup: 200 * time.Millisecond, After: 100 * time.Millisecond})
			require.NoError(t, err)
			st := res.Stats
			require.Equal(t, "memory", st.VerifiedFrom)
			require.Nil(t, st.BlocktimeMs, "lab faults name no vCPU: blocktime is omitted, not 0")
			require.True(t, st.Verified)
			require.Zero(t, st.MismatchedPages)
			require.Greater(t, st.VerifiedPages, uint64(0))
			require.Equal(t, dom.Pages, st.VerifiedPages+st.GuestWrittenPages, "every page is read back")
			require.LessOrEqual(t, st.GuestWrittenPages, dom.Workload.WSPages, "a page outside the working set (never written) reported written")
			if c.mode == wire.ModePostcopy {
				// The guest writes while its pages arrive.
				require.Greater(t, st.GuestWrittenPages, uint64(0))
			}
			t.Logf("%s/%s: verified %d pages from memory, %d written by the guest", c.mode, c.wl, st.VerifiedPages, st.GuestWrittenPages)
		})
	}
}

// A page the destination stores wrongly, though it arrived right, fails
// the verification: one page mismatched. The corruption is written into
// the guest's memory behind its back (not as the guest's write), into a
// page outside the working set, which the guest never touches.
func TestLabCorruptStoredPageFailsVerification(t *testing.T) {
	for _, mode := range []wire.Mode{wire.ModePostcopy, wire.ModePrecopy} {
		t.Run(mode.String(), func(t *testing.T) {
			const pfn = 100 // usable, outside the working set [1280, 2304)
			var done atomic.Bool
			var hookErr atomic.Pointer[error]
			placedHook = func(d *Dest, run []engine.Page) {
				for _, p := range run {
					if p.PFN != pfn || p.Data == nil || !done.CompareAndSwap(false, true) {
						continue
					}
					bad := bytes.Clone(p.Data)
					bad[100] ^= 0xff
					if err := d.overwrite(p.PFN, bad); err != nil {
						hookErr.Store(&err)
					}
				}
			}
			t.Cleanup(func() { placedHook = nil })
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			res, err := Run(ctx, RunConfig{Domain: smallDomain("zipf"), Engine: engine.Options{Mode: mode, Prepaging: "dual", MaxRounds: 5},
				Warmup: 200 * time.Millisecond, After: 100 * time.Millisecond})
			require.True(t, done.Load(), "pfn %d was never placed", pfn)
			if e := hookErr.Load(); e != nil {
				t.Fatalf("corrupt pfn %d: %v", pfn, *e)
			}
			require.Error(t, err)
			require.ErrorContains(t, err, "1 pages differ")
			require.NotNil(t, res)
			st := res.Stats
			require.NotNil(t, st)
			require.False(t, st.Verified)
			require.Equal(t, uint64(1), st.MismatchedPages)
			require.Equal(t, "memory", st.VerifiedFrom)
		})
	}
}

// labPage is the content the direct test places in page p.
func labPage(p uint64, gen byte) []byte {
	b := make([]byte, pageSize)
	binary.LittleEndian.PutUint64(b, pageMagic^p)
	for i := 8; i < len(b); i++ {
		b[i] = byte(p*7+uint64(i)*13) ^ gen
	}
	return b
}

// ReadBack is exact, checked page by page against a running guest: every
// page whose content differs from what was placed is reported written,
// and no page outside the working set (never written) is. The pages are
// placed every way the Dest places them: data and zero pages before the
// resume, pages overwritten before the resume (a pre-copy re-send), and
// after the resume data and zero pages both in the background and for the
// guest's faults (two vCPUs writing the pages as they arrive, in runs long
// and short).
func TestDestReadBackIsExact(t *testing.T) {
	cfg := smallDomain("zipf")
	cfg.VCPUs = 2
	cfg.Workload.OpCost = 20_000 // slow: the guest is paused before it wrote its whole working set
	require.NoError(t, cfg.Validate())
	ws0, ws1 := uint64(1280), uint64(2304) // the working set (see NewWorkload)
	blob, err := json.Marshal(cfg)
	require.NoError(t, err)
	d, err := NewDest(&wire.DomainHeader{Mode: wire.ModePostcopy, PageSize: pageSize, NumPages: cfg.Pages, VCPUs: 2, Name: cfg.Name, Backend: Backend, Config: blob})
	require.NoError(t, err)
	defer d.Exit()

	want := make([][]byte, cfg.Pages) // nil: zero
	var mu sync.Mutex
	placed := make([]bool, cfg.Pages)
	place := func(lo, hi uint64, zero bool, gen byte) {
		t.Helper()
		var pages []engine.Page
		var buf []byte
		for p := lo; p < hi; p++ {
			if !zero {
				buf = append(buf, labPage(p, gen)...)
			}
		}
		for p := lo; p < hi; p++ {
			pg := engine.Page{PFN: p}
			if !zero {
				pg.Data = buf[(p-lo)*pageSize : (p-lo+1)*pageSize]
			}
			pages = append(pages, pg)
			mu.Lock()
			want[p], placed[p] = pg.Data, true
			mu.Unlock()
		}
		require.NoError(t, d.Place(pages))
	}
	// Before the resume: the low pages and the first half of the working
	// set, data; the free tail's first half, zero; then pages re-sent.
	half := ws0 + (ws1-ws0)/2
	place(0, half, false, 0)
	place(3584, 3840, true, 0)
	place(10, 20, false, 1)     // overwritten, outside the working set
	place(1300, 1310, false, 1) // overwritten, inside
	place(3600, 3610, false, 1) // zero pages overwritten with data
	place(1320, 1330, true, 0)  // data pages overwritten with zeroes
	core, err := json.Marshal([]VCPUState{InitState(0, cfg.Workload.Seed), InitState(1, cfg.Workload.Seed)})
	require.NoError(t, err)

	// The guest's faults, on the second half of the working set, are
	// served by blocks of 8 pages: data for even blocks, zeroes for odd
	// ones (longer than zeroCopyMax: placed as zero pages, then protected).
	const block = 8
	served := make(chan error, 1)
	go func() {
		var pfns []uint64
		for {
			var err error
			pfns, err = d.ReadFaults(pfns)
			if errors.Is(err, engine.ErrClosed) {
				served <- nil
				return
			} else if err != nil {
				served <- err
				return
			}
			for _, f := range pfns {
				lo := f &^ (block - 1)
				mu.Lock()
				done := placed[lo]
				var pages []engine.Page
				var buf []byte // one buffer: Place joins contiguous data into one copy
				if (lo/block)%2 == 0 {
					buf = make([]byte, 0, block*pageSize)
				}
				for p := lo; p < lo+block && !done; p++ {
					if placed[p] {
						mu.Unlock()
						served <- fmt.Errorf("pfn %d placed outside its block", p)
						return
					}
					placed[p] = true
					if buf != nil {
						buf = append(buf, labPage(p, 2)...)
						want[p] = buf[len(buf)-pageSize:]
					}
					pages = append(pages, engine.Page{PFN: p, Data: want[p]})
				}
				mu.Unlock()
				if len(pages) == 0 {
					continue
				}
				if err := d.Place(pages); err != nil {
					served <- err
					return
				}
			}
		}
	}()
	// A write in the window between mapping zero pages and protecting
	// them, as a vCPU not waiting for the page could make (a copy of the
	// zero page replaces it, as with process_vm_writev): into the free
	// tail, where the guest itself never writes.
	var windowWritten atomic.Uint64 // pfn+1
	var hookErr atomic.Pointer[error]
	zeroPlacedHook = func(d *Dest, first uint64, pages int) {
		if first < 3840 || !windowWritten.CompareAndSwap(0, first+2) {
			return
		}
		if err := d.g.writev(first+1, []byte{0x77}); err != nil {
			hookErr.Store(&err)
		}
	}
	defer func() { zeroPlacedHook = nil }()
	require.NoError(t, d.Resume(core))
	// In the background: the rest of memory, never touched by the guest.
	place(ws1, 3584, false, 3)
	place(3840, cfg.Pages, true, 0)
	r0, err := d.Report()
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		r, err := d.Report()
		return err == nil && r.Ops > r0.Ops+20_000
	}, 20*time.Second, 10*time.Millisecond, "the guest makes no progress")

	// Read back while the guest runs: a page that differs from what was
	// placed must be reported; pages of the working set not faulted yet
	// are faulted in by the read itself, and served above.
	readBack := func(exact bool) (written []uint64) {
		t.Helper()
		buf := make([]byte, 256*pageSize)
		for lo := uint64(0); lo < cfg.Pages; lo += 256 {
			var pfns []uint64
			for p := lo; p < min(lo+256, cfg.Pages); p++ {
				pfns = append(pfns, p)
			}
			w, err := d.ReadBack(pfns, buf[:len(pfns)*pageSize])
			require.NoError(t, err)
			written = append(written, w...)
			for i, p := range pfns {
				mu.Lock()
				exp := want[p]
				mu.Unlock()
				if exp == nil {
					exp = make([]byte, pageSize)
				}
				changed := !bytes.Equal(buf[i*pageSize:(i+1)*pageSize], exp)
				rep := slices.Contains(w, p)
				if changed && !rep {
					t.Errorf("pfn %d differs from what was placed but is not reported written", p)
				}
				if rep && (p < ws0 || p >= ws1) && p+1 != windowWritten.Load() {
					t.Errorf("pfn %d, outside the working set, reported written", p)
				}
				if exact && rep && !changed {
					t.Errorf("pfn %d reported written, but holds what was placed", p)
				}
			}
		}
		return written
	}
	readBack(false)
	// With the guest paused, nothing is written between a read and its
	// scan: reported written and changed must be the same pages.
	_, err = d.g.call(request{Op: "pause"})
	require.NoError(t, err)
	written := readBack(true)
	d.Close()
	require.NoError(t, <-served)
	if e := hookErr.Load(); e != nil {
		t.Fatalf("write between ZeroPage and WriteProtect: %v", *e)
	}
	require.NotZero(t, windowWritten.Load(), "no zero run placed for the running guest")
	require.Contains(t, written, windowWritten.Load()-1, "the write before the protection is reported")
	require.NotEmpty(t, written, "the guest wrote nothing")
	var lazy int
	for _, p := range written {
		if p >= half {
			lazy++
		}
	}
	require.Less(t, len(written), int(ws1-ws0), "every page of the working set written: the test shows nothing about pages not written")
	t.Logf("%d pages reported written, %d of them placed after the resume", len(written), lazy)
}
