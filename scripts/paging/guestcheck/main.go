// Command guestcheck is the guest side of the lab's pager self-test
// (scripts/paging/50-pager-selftest.sh). It runs in a PVH domU as root:
//
//  1. allocates a buffer (16 MiB), keeps it out of transparent huge pages and
//     locked in memory, and fills every page with a pattern derived from the
//     page's index;
//  2. reads the guest frame number of every page from /proc/self/pagemap
//     (for PVH/HVM the guest pfn is the gfn Xen's p2m uses) and prints them
//     as compact ranges on lines `gfns <i> <lo>-<hi>,<lo>-<hi>,...` followed
//     by `gfns-end <pages> <ranges>`;
//  3. then, every interval, verifies the whole buffer and prints
//     `check <n> ok|bad bad_pages=<k> ms=<duration>`.
//
// A check that never completes means the process is stuck touching a page:
// exactly what dom0's pager must prevent after it evicted these gfns.
package main

import (
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

const pageSize = 4096

func main() {
	mib := flag.Int("mib", 16, "buffer size in MiB")
	interval := flag.Duration("interval", 500*time.Millisecond, "time between checks")
	count := flag.Int("count", 0, "stop after this many checks (0: run forever)")
	flag.Parse()
	if err := run(*mib, *interval, *count); err != nil {
		fmt.Fprintln(os.Stderr, "guestcheck:", err)
		os.Exit(1)
	}
}

func run(mib int, interval time.Duration, count int) error {
	if mib <= 0 {
		return fmt.Errorf("-mib must be positive, got %d", mib)
	}
	// Page migration (compaction) would move the buffer to other gfns
	// behind dom0's back; forbid it for locked pages where we can.
	_ = os.WriteFile("/proc/sys/vm/compact_unevictable_allowed", []byte("0\n"), 0o644)
	size := mib << 20
	buf, err := syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE,
		syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mmap %d MiB: %w", mib, err)
	}
	// A huge page would make 512 gfns one p2m entry and khugepaged could
	// collapse the buffer onto new frames: keep it in 4 KiB pages.
	if err := syscall.Madvise(buf, 14 /* MADV_NOHUGEPAGE */); err != nil {
		fmt.Fprintln(os.Stderr, "guestcheck: madvise(MADV_NOHUGEPAGE):", err)
	}
	pages := size / pageSize
	fill(buf, pages)
	if err := syscall.Mlock(buf); err != nil {
		fmt.Fprintln(os.Stderr, "guestcheck: mlock (pages may move):", err)
	}
	gfns, err := pagemapGFNs(buf, pages)
	if err != nil {
		return err
	}
	printRanges(os.Stdout, gfns)
	described := false
	for n := 1; count == 0 || n <= count; n++ {
		time.Sleep(interval)
		t0 := time.Now()
		bad := verify(buf, pages)
		state := "ok"
		if bad > 0 {
			state = "bad"
		}
		fmt.Printf("check %d %s bad_pages=%d ms=%d\n", n, state, bad, time.Since(t0).Milliseconds())
		if bad > 0 && !described {
			// Say once which pages are wrong and how: dom0 compares this
			// with what its pager saved and loaded for those gfns.
			described = true
			for _, b := range badPages(buf, pages, 4) {
				if b.wrongWords == 0 {
					break
				}
				fmt.Printf("badpage index=%d gfn=%x first_wrong_word=%d got=%x want=%x wrong_words=%d zero_words=%d\n",
					b.index, gfns[b.index], b.firstWrong, b.got, b.want, b.wrongWords, b.zeroWords)
			}
		}
		// Every 20 checks make sure the buffer still sits on the same gfns;
		// if it moved, dom0 evicted the wrong pages and the test is void.
		if n%20 == 0 {
			now, err := pagemapGFNs(buf, pages)
			if err == nil && !equal(now, gfns) {
				fmt.Println("gfns-changed")
				printRanges(os.Stdout, now)
				gfns = now
			}
		}
	}
	return nil
}

// word is the pattern of word w of page p: distinct per page and word, so
// a page swapped with another or zeroed shows up.
func word(p, w int) uint64 {
	return (uint64(p)+1)*0x9e3779b97f4a7c15 ^ uint64(w)*0xbf58476d1ce4e5b9
}

func words(buf []byte) []uint64 {
	return unsafe.Slice((*uint64)(unsafe.Pointer(&buf[0])), len(buf)/8)
}

func fill(buf []byte, pages int) {
	ws := words(buf)
	const per = pageSize / 8
	for p := 0; p < pages; p++ {
		for w := 0; w < per; w++ {
			ws[p*per+w] = word(p, w)
		}
	}
}

// verify returns the number of pages whose content is not the pattern.
func verify(buf []byte, pages int) int { return len(badPages(buf, pages, 0)) }

// badPage describes a page whose content is wrong.
type badPage struct {
	index      int    // page index in the buffer
	firstWrong int    // first wrong word
	got, want  uint64 // that word
	wrongWords int    // how many of the page's words are wrong
	zeroWords  int    // how many words are zero (a scrubbed frame reads as zeros)
}

// badPages lists the pages whose content is not the pattern; with detail
// > 0, the first detail of them are described word by word.
func badPages(buf []byte, pages, detail int) []badPage {
	ws := words(buf)
	const per = pageSize / 8
	var bad []badPage
	for p := 0; p < pages; p++ {
		for w := 0; w < per; w++ {
			if ws[p*per+w] == word(p, w) {
				continue
			}
			b := badPage{index: p, firstWrong: w, got: ws[p*per+w], want: word(p, w)}
			if len(bad) < detail {
				for v := 0; v < per; v++ {
					if ws[p*per+v] != word(p, v) {
						b.wrongWords++
					}
					if ws[p*per+v] == 0 {
						b.zeroWords++
					}
				}
			}
			bad = append(bad, b)
			break
		}
	}
	return bad
}

// pagemapGFNs reads the frame of every page of buf from /proc/self/pagemap
// (bits 0-54 the pfn, bit 63 present; root is needed to see pfns).
func pagemapGFNs(buf []byte, pages int) ([]uint64, error) {
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return nil, fmt.Errorf("open pagemap (needs CONFIG_PROC_PAGE_MONITOR): %w", err)
	}
	defer f.Close()
	ent := make([]byte, 8*pages)
	off := int64(uintptr(unsafe.Pointer(&buf[0]))/pageSize) * 8
	if _, err := f.ReadAt(ent, off); err != nil {
		return nil, fmt.Errorf("read pagemap: %w", err)
	}
	gfns := make([]uint64, pages)
	for i := range gfns {
		v := binary.LittleEndian.Uint64(ent[i*8:])
		if v&(1<<63) == 0 {
			return nil, fmt.Errorf("page %d of the buffer is not present (mlock failed?)", i)
		}
		gfns[i] = v & (1<<55 - 1)
		if gfns[i] == 0 {
			return nil, fmt.Errorf("pagemap shows pfn 0 for page %d: not running as root", i)
		}
	}
	return gfns, nil
}

func equal(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// ranges turns gfns (in buffer order) into sorted, merged hex ranges.
func ranges(gfns []uint64) []string {
	s := append([]uint64(nil), gfns...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	var out []string
	for i := 0; i < len(s); {
		j := i
		for j+1 < len(s) && s[j+1] <= s[j]+1 {
			j++
		}
		if s[i] == s[j] {
			out = append(out, fmt.Sprintf("%x", s[i]))
		} else {
			out = append(out, fmt.Sprintf("%x-%x", s[i], s[j]))
		}
		i = j + 1
	}
	return out
}

// printRanges prints the ranges on lines short enough for the console.
func printRanges(w *os.File, gfns []uint64) {
	rs := ranges(gfns)
	// Started from the console shell, our first line may share the line of
	// the shell's prompt: begin on a fresh one.
	fmt.Fprintln(w)
	line := 0
	for i := 0; i < len(rs); {
		var b strings.Builder
		for i < len(rs) && b.Len() < 160 {
			if b.Len() > 0 {
				b.WriteByte(',')
			}
			b.WriteString(rs[i])
			i++
		}
		fmt.Fprintf(w, "gfns %d %s\n", line, b.String())
		line++
	}
	fmt.Fprintf(w, "gfns-end %d %d\n", len(gfns), len(rs))
}
