package pagingbench

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// fakeTarget keeps pages in Go and advances a fake clock by a cost a call
// and a cost a page for each op, so the test knows what every figure must be.
type fakeTarget struct {
	clock   time.Time
	mem     map[uint64][]byte
	paged   map[uint64]bool
	absent  map[uint64]bool
	batched bool
	// costs: op → (per call, per page)
	call, page map[string]time.Duration
	corrupt    string // this op stores its first page wrongly
	calls      map[string]int
}

func newFake(batched bool) *fakeTarget {
	return &fakeTarget{clock: time.Unix(1e9, 0), mem: map[uint64][]byte{}, paged: map[uint64]bool{}, absent: map[uint64]bool{},
		batched: batched, calls: map[string]int{},
		call: map[string]time.Duration{"pageout-hcbuf": 300 * time.Microsecond, "load-hcbuf": 300 * time.Microsecond,
			"pageout-batched": 200 * time.Microsecond, "load-batched": 200 * time.Microsecond,
			"decrease-reservation": 350 * time.Microsecond, "populate-physmap": 350 * time.Microsecond, "foreign-write": 2 * time.Millisecond},
		page: map[string]time.Duration{"pageout-libxc": 250 * time.Microsecond, "load-libxc": 1400 * time.Microsecond,
			"pageout-hcbuf": 80 * time.Microsecond, "load-hcbuf": 40 * time.Microsecond,
			"pageout-batched": 7 * time.Microsecond, "load-batched": 9 * time.Microsecond,
			"decrease-reservation": 6 * time.Microsecond, "populate-physmap": 5 * time.Microsecond, "foreign-write": 10 * time.Microsecond}}
}

func (f *fakeTarget) now() time.Time { return f.clock }

func (f *fakeTarget) cost(op string, n int) {
	f.calls[op]++
	f.clock = f.clock.Add(f.call[op] + time.Duration(n)*f.page[op])
}

func (f *fakeTarget) pageOut(op string, gfns []uint64) error {
	f.cost(op, len(gfns))
	for _, g := range gfns {
		if f.mem[g] == nil {
			return fmt.Errorf("%s: gfn %#x not resident", op, g)
		}
		f.paged[g] = true
		delete(f.mem, g)
	}
	return nil
}

func (f *fakeTarget) load(op string, gfns []uint64, data []byte) error {
	f.cost(op, len(gfns))
	for i, g := range gfns {
		if !f.paged[g] {
			return fmt.Errorf("%s: gfn %#x not paged out", op, g)
		}
		delete(f.paged, g)
		f.mem[g] = bytes.Clone(data[i*PageSize : (i+1)*PageSize])
		if op == f.corrupt && i == 0 {
			f.mem[g][100] ^= 1
		}
	}
	return nil
}

func (f *fakeTarget) PageOutLibxc(g []uint64) error {
	for _, x := range g {
		if err := f.pageOut("pageout-libxc", []uint64{x}); err != nil {
			return err
		}
	}
	return nil
}

func (f *fakeTarget) LoadLibxc(g []uint64, d []byte) error {
	for i, x := range g {
		if err := f.load("load-libxc", []uint64{x}, d[i*PageSize:(i+1)*PageSize]); err != nil {
			return err
		}
	}
	return nil
}

func (f *fakeTarget) PageOut(g []uint64, batched bool) error {
	if batched {
		if !f.batched {
			return errors.New("no batched ops")
		}
		return f.pageOut("pageout-batched", g)
	}
	return f.pageOut("pageout-hcbuf", g)
}

func (f *fakeTarget) Load(g []uint64, d []byte, batched bool) error {
	if batched {
		if !f.batched {
			return errors.New("no batched ops")
		}
		return f.load("load-batched", g, d)
	}
	return f.load("load-hcbuf", g, d)
}

func (f *fakeTarget) HasBatched() bool { return f.batched }

func (f *fakeTarget) Decrease(g []uint64) error {
	f.cost("decrease-reservation", len(g))
	for _, x := range g {
		if f.paged[x] || f.absent[x] {
			return fmt.Errorf("decrease: gfn %#x not resident", x)
		}
		f.absent[x] = true
		delete(f.mem, x)
	}
	return nil
}

func (f *fakeTarget) Populate(g []uint64) error {
	f.cost("populate-physmap", len(g))
	for _, x := range g {
		if !f.absent[x] {
			return fmt.Errorf("populate: gfn %#x not absent", x)
		}
		delete(f.absent, x)
		f.mem[x] = make([]byte, PageSize)
	}
	return nil
}

func (f *fakeTarget) Write(g []uint64, d []byte) error {
	f.cost("foreign-write", len(g))
	for i, x := range g {
		if f.mem[x] == nil {
			return fmt.Errorf("write: gfn %#x not resident", x)
		}
		f.mem[x] = bytes.Clone(d[i*PageSize : (i+1)*PageSize])
		if f.corrupt == "foreign-write" && i == 0 {
			f.mem[x][7] ^= 1
		}
	}
	return nil
}

func (f *fakeTarget) Read(g []uint64, buf []byte) error {
	for i, x := range g {
		if f.mem[x] == nil {
			return fmt.Errorf("read: gfn %#x not resident", x)
		}
		copy(buf[i*PageSize:], f.mem[x])
	}
	return nil
}

func gfnRange(base uint64, n int) []uint64 {
	out := make([]uint64, n)
	for i := range out {
		out[i] = base + uint64(i)
	}
	return out
}

func (f *fakeTarget) resident(gfns []uint64) {
	for _, g := range gfns {
		f.mem[g] = make([]byte, PageSize)
	}
}

// The figures are the cost the fake charged: per page, the per-call cost
// spread over the batch plus the per-page cost.
func TestFiguresFollowTheCost(t *testing.T) {
	f := newFake(true)
	gfns := gfnRange(0x1000, 512)
	f.resident(gfns)
	var out strings.Builder
	rows, err := Run(f, gfns, []int{1, 64, 512}, f.now, &out)
	require.NoError(t, err)
	require.Len(t, rows, 3*9)
	for _, r := range rows {
		calls := (r.Pages + r.Batch - 1) / r.Batch
		if strings.HasSuffix(r.Op, "-libxc") {
			calls = 0 // priced per page only
		}
		want := float64(time.Duration(calls)*f.call[r.Op]+time.Duration(r.Pages)*f.page[r.Op]) / float64(time.Microsecond) / float64(r.Pages)
		require.InDelta(t, want, r.UsPerPage, 1e-9, "%v", r)
		require.Contains(t, out.String(), r.String())
	}
	// Batching shows: the hcbuf load at 512 costs the per-page cost plus
	// a 512th of the call.
	last := rows[len(rows)-9:]
	require.Equal(t, "load-hcbuf", last[3].Op)
	require.InDelta(t, 40+300.0/512, last[3].UsPerPage, 1e-9)
	require.Equal(t, 512, f.calls["load-libxc"]/3, "libxc loads are one call a page at every batch size")
}

// Without the patch there are no batched rows, and the others still run.
func TestBatchedRowsOnlyWithThePatch(t *testing.T) {
	f := newFake(false)
	gfns := gfnRange(0x1000, 64)
	f.resident(gfns)
	rows, err := Run(f, gfns, []int{1, 64}, f.now, &strings.Builder{})
	require.NoError(t, err)
	require.Len(t, rows, 2*7)
	for _, r := range rows {
		require.NotContains(t, r.Op, "batched")
	}
}

// A primitive that says it loaded a page but stored something else fails
// the bench: its figure would be meaningless.
func TestWrongContentsFailTheBench(t *testing.T) {
	for _, op := range []string{"load-libxc", "load-hcbuf", "load-batched", "foreign-write"} {
		f := newFake(true)
		f.corrupt = op
		gfns := gfnRange(0x2000, 16)
		f.resident(gfns)
		_, err := Run(f, gfns, []int{1, 16}, f.now, &strings.Builder{})
		require.ErrorContains(t, err, op, op)
		require.ErrorContains(t, err, "reads back other contents", op)
	}
}

// A failing primitive stops the bench with the op, batch and gfn named.
func TestFailureNamesTheOp(t *testing.T) {
	f := newFake(true)
	gfns := gfnRange(0x3000, 8)
	f.resident(gfns[1:]) // gfn 0x3000 is not resident: the first page-out fails
	_, err := Run(f, gfns, []int{4}, f.now, &strings.Builder{})
	require.ErrorContains(t, err, "pageout-libxc, batch 4, gfns from 0x3000")
	_, err = Run(f, nil, []int{4}, f.now, &strings.Builder{})
	require.Error(t, err)
	f2 := newFake(true)
	f2.resident(gfns)
	_, err = Run(f2, gfns, []int{0}, f2.now, &strings.Builder{})
	require.ErrorContains(t, err, "batch size 0")
}
