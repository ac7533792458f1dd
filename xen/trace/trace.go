// Package trace defines the memory-access trajectory format shared by the
// tools that record one (`xl-postcopy trace` on a real Xen domain, the
// pre-record step of a migration) and the tools that use one (the lab
// domain's `trace` workload, the pre-record planner).
//
// The format is line-oriented text so that an administrator can read, cut
// and diff a trace with ordinary tools:
//
//	# xl-postcopy trace v1
//	pages 32768
//	page_size 4096
//	interval_us 50000
//	source pvh:domupvh
//	# t_us round pfn op
//	0 0 1234 w
//	50012 1 1235 w
//
// Each access line is: time since the start of recording in microseconds,
// the log-dirty round it was seen in, the guest pfn, and "r" or "w". Lines
// are in trajectory order (time, then first touch within a round). Blank
// lines and lines starting with '#' are ignored.
package trace

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// Magic is the first line of every trace file.
const Magic = "# xl-postcopy trace v1"

// MaxPages bounds the pages header so that a corrupt file cannot make a
// reader allocate a huge bitmap (2^36 pages = 256 TiB of guest memory).
const MaxPages = 1 << 36

// Access is one recorded touch of a guest page.
type Access struct {
	T     time.Duration // since the start of recording
	Round uint32        // log-dirty round (0-based)
	PFN   uint64
	Write bool
}

// Trace is a recorded trajectory of one domain.
type Trace struct {
	Pages    uint64        // guest pages (pfn range is [0, Pages))
	PageSize uint32        // bytes per page, 4096 on x86
	Interval time.Duration // log-dirty round length used when recording
	Source   string        // free text: what was traced
	Accesses []Access
}

// Write writes t in the v1 text format.
func Write(w io.Writer, t *Trace) error {
	bw := bufio.NewWriterSize(w, 1<<16)
	fmt.Fprintln(bw, Magic)
	fmt.Fprintf(bw, "pages %d\npage_size %d\ninterval_us %d\n", t.Pages, t.PageSize, t.Interval.Microseconds())
	if t.Source != "" {
		fmt.Fprintf(bw, "source %s\n", strings.ReplaceAll(t.Source, "\n", " "))
	}
	fmt.Fprintln(bw, "# t_us round pfn op")
	var line []byte
	for _, a := range t.Accesses {
		line = line[:0]
		line = strconv.AppendInt(line, a.T.Microseconds(), 10)
		line = append(line, ' ')
		line = strconv.AppendUint(line, uint64(a.Round), 10)
		line = append(line, ' ')
		line = strconv.AppendUint(line, a.PFN, 10)
		if a.Write {
			line = append(line, " w\n"...)
		} else {
			line = append(line, " r\n"...)
		}
		if _, err := bw.Write(line); err != nil {
			return fmt.Errorf("write trace: %w", err)
		}
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write trace: %w", err)
	}
	return nil
}

// Read parses a v1 trace. Every pfn must lie below the pages header; times
// and rounds must not go backwards.
func Read(r io.Reader) (*Trace, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), 1<<20)
	t := &Trace{PageSize: 4096}
	lineNo := 0
	sawMagic := false
	for sc.Scan() {
		lineNo++
		s := strings.TrimSpace(sc.Text())
		if lineNo == 1 {
			if s != Magic {
				return nil, fmt.Errorf("trace line 1: not an xl-postcopy v1 trace (want %q)", Magic)
			}
			sawMagic = true
			continue
		}
		if s == "" || s[0] == '#' {
			continue
		}
		f := strings.Fields(s)
		switch f[0] {
		case "pages", "page_size", "interval_us":
			if len(f) != 2 {
				return nil, fmt.Errorf("trace line %d: %q wants one value", lineNo, f[0])
			}
			v, err := strconv.ParseUint(f[1], 10, 64)
			if err != nil {
				return nil, fmt.Errorf("trace line %d: %s: %w", lineNo, f[0], err)
			}
			switch f[0] {
			case "pages":
				if v == 0 || v > MaxPages {
					return nil, fmt.Errorf("trace line %d: pages %d out of range (1..%d)", lineNo, v, uint64(MaxPages))
				}
				t.Pages = v
			case "page_size":
				if v < 512 || v > 1<<21 || v&(v-1) != 0 {
					return nil, fmt.Errorf("trace line %d: page_size %d is not a power of two in 512..2M", lineNo, v)
				}
				t.PageSize = uint32(v)
			case "interval_us":
				t.Interval = time.Duration(v) * time.Microsecond
			}
			continue
		case "source":
			t.Source = strings.TrimSpace(strings.TrimPrefix(s, "source"))
			continue
		}
		if len(f) != 4 {
			return nil, fmt.Errorf("trace line %d: want \"t_us round pfn r|w\", got %q", lineNo, s)
		}
		if t.Pages == 0 {
			return nil, fmt.Errorf("trace line %d: access before the pages header", lineNo)
		}
		us, err1 := strconv.ParseInt(f[0], 10, 64)
		round, err2 := strconv.ParseUint(f[1], 10, 32)
		pfn, err3 := strconv.ParseUint(f[2], 10, 64)
		if err := errors.Join(err1, err2, err3); err != nil {
			return nil, fmt.Errorf("trace line %d: %w", lineNo, err)
		}
		if us < 0 {
			return nil, fmt.Errorf("trace line %d: negative time", lineNo)
		}
		if pfn >= t.Pages {
			return nil, fmt.Errorf("trace line %d: pfn %d beyond pages %d", lineNo, pfn, t.Pages)
		}
		var w bool
		switch f[3] {
		case "w":
			w = true
		case "r":
		default:
			return nil, fmt.Errorf("trace line %d: op %q is neither r nor w", lineNo, f[3])
		}
		a := Access{T: time.Duration(us) * time.Microsecond, Round: uint32(round), PFN: pfn, Write: w}
		if n := len(t.Accesses); n > 0 {
			p := t.Accesses[n-1]
			if a.T < p.T || a.Round < p.Round {
				return nil, fmt.Errorf("trace line %d: time or round goes backwards", lineNo)
			}
		}
		t.Accesses = append(t.Accesses, a)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read trace: %w", err)
	}
	if !sawMagic {
		return nil, errors.New("read trace: empty file")
	}
	if t.Pages == 0 {
		return nil, errors.New("read trace: no pages header")
	}
	return t, nil
}
