package lab

import (
	"fmt"
	"math"
	"math/rand"
	"sort"
	"strings"

	"github.com/xl-postcopy/xl-postcopy/xen/trace"
)

// LinesPerPage is how many 64-byte lines a 4 KiB page has; one workload
// operation touches one line, so a page is "used" over many operations, as
// a program reading a structure or scanning a buffer would.
const LinesPerPage = 64

// WorkloadNames lists the workloads NewWorkload knows.
var WorkloadNames = []string{"zipf", "scan", "stride", "phases", "multiproc", "stream", "trace"}

// WorkloadSpec says what the guest's vCPUs do. Source and destination
// build the same workload from the same spec, so a vCPU's state (the core
// state) means the same thing on both sides.
type WorkloadSpec struct {
	Name      string `json:"name"`
	Pages     uint64 `json:"pages"`      // usable pages (the zero tail excluded)
	WSPages   uint64 `json:"ws_pages"`   // working set for zipf, scan, stride
	Seed      int64  `json:"seed"`       // layout seed (permutations, regions)
	OpCost    int    `json:"op_cost"`    // compute iterations per operation
	TraceFile string `json:"trace_file"` // for "trace"
}

// VCPUState is one vCPU's architectural state for the workload: together
// with memory, it is everything needed to continue exactly where it
// stopped. It is what the lab domain's core state carries.
type VCPUState struct {
	ID      int    `json:"id"`
	RNG     uint64 `json:"rng"`
	Ops     uint64 `json:"ops"`
	Cursor  uint64 `json:"cursor"` // scan/stream/stride/trace position (in lines or records)
	Job     uint64 `json:"job"`    // phases/multiproc: current job or process
	JobLeft uint64 `json:"job_left"`
	JobBase uint64 `json:"job_base"`
}

// Workload maps a vCPU's state to its next memory operation. It is pure:
// all state is in VCPUState.
type Workload interface {
	// Next advances st and returns the page, the line within it, and
	// whether the operation writes.
	Next(st *VCPUState) (pfn uint64, line uint32, write bool)
}

func xorshift(x *uint64) uint64 {
	v := *x
	v ^= v << 13
	v ^= v >> 7
	v ^= v << 17
	*x = v
	return v
}

func unif(x *uint64) float64 { return float64(xorshift(x)>>11) / (1 << 53) }

// InitState returns vCPU id's initial state.
func InitState(id int, seed int64) VCPUState {
	r := uint64(seed)*0x9E3779B97F4A7C15 + uint64(id+1)*0xBF58476D1CE4E5B9
	if r == 0 {
		r = 1
	}
	return VCPUState{ID: id, RNG: r}
}

// NewWorkload builds the workload for spec.
func NewWorkload(spec WorkloadSpec) (Workload, error) {
	if spec.Pages == 0 {
		return nil, fmt.Errorf("workload %s: no usable pages", spec.Name)
	}
	ws := spec.WSPages
	if ws == 0 || ws > spec.Pages {
		ws = spec.Pages
	}
	// The working set sits in the middle of memory, as a guest's heap does
	// between its kernel and its free tail: a plain scan from pfn 0 does
	// not find it first.
	base := (spec.Pages - ws) / 2
	switch spec.Name {
	case "zipf":
		return newZipf(base, ws, spec.Seed), nil
	case "scan":
		return &scan{base: base, n: ws}, nil
	case "stride":
		return &stride{base: base, n: ws, stride: 16}, nil
	case "phases":
		return &phases{pages: spec.Pages, region: min(1024, spec.Pages), ops: 400_000}, nil
	case "multiproc":
		return newMultiproc(spec.Pages, spec.Seed), nil
	case "stream":
		return &stream{n: spec.Pages}, nil
	case "trace":
		return newReplay(spec)
	}
	return nil, fmt.Errorf("unknown workload %q (want %s)", spec.Name, strings.Join(WorkloadNames, ", "))
}

// zipf: key-value store. Keys are ranked by popularity (Zipf, s = 0.99,
// YCSB's constant); a key's value lives in a page, and pages are grouped in
// 16-page chunks (a slab) placed in random order, so the hot keys are spread
// over the working set but neighbours in a slab are related.
type zipf struct {
	base uint64
	cdf  []float64
	perm []uint32 // chunk permutation
}

const zipfChunk = 16

func newZipf(base, n uint64, seed int64) *zipf {
	z := &zipf{base: base, cdf: make([]float64, n)}
	sum := 0.0
	for i := uint64(0); i < n; i++ {
		sum += 1 / math.Pow(float64(i+1), 0.99)
		z.cdf[i] = sum
	}
	for i := range z.cdf {
		z.cdf[i] /= sum
	}
	chunks := (n + zipfChunk - 1) / zipfChunk
	rng := rand.New(rand.NewSource(seed))
	p := rng.Perm(int(chunks))
	z.perm = make([]uint32, chunks)
	for i, v := range p {
		z.perm[i] = uint32(v)
	}
	return z
}

func (z *zipf) Next(st *VCPUState) (uint64, uint32, bool) {
	u := unif(&st.RNG)
	r := uint64(sort.SearchFloat64s(z.cdf, u))
	n := uint64(len(z.cdf))
	if r >= n {
		r = n - 1
	}
	pg := uint64(z.perm[r/zipfChunk])*zipfChunk + r%zipfChunk
	if pg >= n {
		pg = r // last partial chunk
	}
	v := xorshift(&st.RNG)
	return z.base + pg, uint32(v % LinesPerPage), v>>32%10 < 3
}

// scan: a program streaming through a buffer line by line (and writing
// it), wrapping at the end.
type scan struct{ base, n uint64 }

func (s *scan) Next(st *VCPUState) (uint64, uint32, bool) {
	c := st.Cursor
	st.Cursor = (c + 1) % (s.n * LinesPerPage)
	return s.base + c/LinesPerPage, uint32(c % LinesPerPage), true
}

// stream: a steady producer/consumer pass over all of memory, wrapping at
// the end: each page is written line by line (64 operations), then its
// first 8 lines are read back (a header check), 72 operations a page. At
// the lab's op cost that is close to, but under, what a 1 Gbit link
// delivers: the range where knowing the direction matters, because a dual
// bubble spends half the link behind the stream and falls behind it, while
// a forward push keeps ahead. (scan is the same walk, 64 operations a
// page, over a working set that it keeps revisiting.)
type stream struct{ n uint64 }

// streamOpsPerPage is the operations stream spends on one page.
const streamOpsPerPage = LinesPerPage + LinesPerPage/8

func (s *stream) Next(st *VCPUState) (uint64, uint32, bool) {
	c := st.Cursor
	st.Cursor = (c + 1) % (s.n * streamOpsPerPage)
	k := c % streamOpsPerPage
	return c / streamOpsPerPage, uint32(k % LinesPerPage), k < LinesPerPage
}

// stride: a column walk over a matrix whose rows are stride pages: each
// visit reads 8 lines of a page, then jumps a row.
type stride struct{ base, n, stride uint64 }

func (s *stride) Next(st *VCPUState) (uint64, uint32, bool) {
	c := st.Cursor
	st.Cursor++
	visit := c / 8
	rows := max(1, s.n/s.stride)
	col := (visit / rows) % s.stride
	row := visit % rows
	pg := (row*s.stride + col) % s.n
	return s.base + pg, uint32(c % 8 * 8), c%8 == 0
}

// phases: a sequence of short jobs, each working on its own 4 MiB region
// of memory (random accesses), then moving on: a shifting working set.
type phases struct{ pages, region, ops uint64 }

func (p *phases) Next(st *VCPUState) (uint64, uint32, bool) {
	if st.JobLeft == 0 {
		st.Job++
		span := p.pages - p.region + 1
		st.JobBase = xorshift(&st.RNG) % span
		st.JobLeft = p.ops
	}
	st.JobLeft--
	v := xorshift(&st.RNG)
	return st.JobBase + v%p.region, uint32(v >> 40 % LinesPerPage), v>>20%4 == 0
}

// multiproc: many small processes (64 of them, at random places in
// memory) scheduled one time slice at a time, each touching only its own
// 48-page image: 16 pages of text below, 16 of heap, 16 of read-only data
// and stack above. Only the heap is written (half of its touches), so a
// write-only recorder (log-dirty) sees 16 pages of each process while the
// process needs 48 on resume. Which process runs next is drawn at random
// with a Zipf(1) popularity, as a few daemons are busy and most idle: the
// busy ones run often and recently, the idle ones rarely. Regression finds
// no direction here; clustering finds each heap and, around it, the pages
// the process reads but never writes.
type multiproc struct {
	img   uint64 // image pages (procImage unless memory is smaller)
	bases []uint64
	cdf   []float64 // process popularity
}

// Layout of one process image, in pages.
const (
	procText  = 16
	procHeap  = 16
	procData  = 16
	procImage = procText + procHeap + procData
	// procSlice is the operations of one time slice (about 2 ms).
	procSlice = 2000
)

func newMultiproc(pages uint64, seed int64) *multiproc {
	const n = 64
	m := &multiproc{img: min(procImage, pages)}
	img := m.img
	rng := rand.New(rand.NewSource(seed + 7))
	sum := 0.0
	for i := 0; i < n; i++ {
		m.bases = append(m.bases, uint64(rng.Int63n(int64(pages-img+1))))
		sum += 1 / float64(i+1)
		m.cdf = append(m.cdf, sum)
	}
	for i := range m.cdf {
		m.cdf[i] /= sum
	}
	return m
}

func (m *multiproc) Next(st *VCPUState) (uint64, uint32, bool) {
	if st.JobLeft == 0 {
		st.Job = uint64(min(sort.SearchFloat64s(m.cdf, unif(&st.RNG)), len(m.cdf)-1))
		st.JobLeft = procSlice
	}
	st.JobLeft--
	v := xorshift(&st.RNG)
	off := v % m.img
	write := off >= procText && off < procText+procHeap && v>>20%2 == 0
	return m.bases[st.Job] + off, uint32(v >> 40 % LinesPerPage), write
}

// replay: the pages of a recorded trajectory (xl-postcopy trace), in order,
// 16 lines per recorded access, looping at the end.
type replay struct{ acc []trace.Access }

func newReplay(spec WorkloadSpec) (*replay, error) {
	if spec.TraceFile == "" {
		return nil, fmt.Errorf("workload trace needs --trace FILE")
	}
	t, err := readTraceFile(spec.TraceFile)
	if err != nil {
		return nil, err
	}
	if len(t.Accesses) == 0 {
		return nil, fmt.Errorf("trace %s has no accesses", spec.TraceFile)
	}
	for _, a := range t.Accesses {
		if a.PFN >= spec.Pages {
			return nil, fmt.Errorf("trace %s touches pfn %d but the lab domain has %d usable pages: use a larger --mem (the trace is of a %d-page domain)",
				spec.TraceFile, a.PFN, spec.Pages, t.Pages)
		}
	}
	return &replay{acc: t.Accesses}, nil
}

func (r *replay) Next(st *VCPUState) (uint64, uint32, bool) {
	c := st.Cursor
	st.Cursor = (c + 1) % (uint64(len(r.acc)) * 16)
	a := r.acc[c/16]
	return a.PFN, uint32(c % 16 * 4), a.Write && c%16 == 0
}
