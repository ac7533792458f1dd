package dsb

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
)

// Bits of /proc/kpageflags words (include/uapi/linux/kernel-page-flags.h).
const (
	KPFLRU          = 5
	KPFSlab         = 7
	KPFBuddy        = 10
	KPFAnon         = 12
	KPFCompoundHead = 15
	KPFCompoundTail = 16
	KPFNoPage       = 20
	KPFOffline      = 23
	KPFPgtable      = 26
)

// PageClass is what the guest kernel uses a page frame for, as far as
// migration cares.
type PageClass uint8

// Classes, in the order a page is tested for them (first match wins).
const (
	ClassOther     PageClass = iota // kernel text/data, raw allocations, free-block tails, ...
	ClassNoPage                     // KPF_NOPAGE: no struct page (a hole)
	ClassOffline                    // KPF_OFFLINE: ballooned out, not backed by Xen
	ClassFree                       // KPF_BUDDY: head of a free buddy block
	ClassPagetable                  // KPF_PGTABLE: must stay resident at the destination
	ClassSlab                       // KPF_SLAB: kernel objects
	ClassAnon                       // KPF_ANON: process memory
	ClassLRU                        // KPF_LRU without ANON: page cache
	NumClasses
)

var classNames = [NumClasses]string{"other", "nopage", "offline", "free", "pagetable", "slab", "anon", "lru"}

func (c PageClass) String() string {
	if c < NumClasses {
		return classNames[c]
	}
	return "class(" + strconv.Itoa(int(c)) + ")"
}

// ClassifyFlags classifies one kpageflags word.
//
// Offline and free come first because they decide what is never sent;
// page tables before slab and anon because keeping them resident is what
// keeps a post-copy guest alive (see LAB.md, vm_event run 1).
//
// Caveat for free-page hinting: the kernel sets KPF_BUDDY only on the
// first page of a free block of 2^order pages; the tail pages show no
// flags at all and fall into ClassOther, as do raw kernel allocations. Only
// ClassFree pages are known to be free. Likewise KPF_SLAB is only on the
// head of a compound slab page; ClassifyPages gives compound tails the
// class of their head.
func ClassifyFlags(w uint64) PageClass {
	bit := func(b uint) bool { return w&(1<<b) != 0 }
	switch {
	case bit(KPFNoPage):
		return ClassNoPage
	case bit(KPFOffline):
		return ClassOffline
	case bit(KPFBuddy):
		return ClassFree
	case bit(KPFPgtable):
		return ClassPagetable
	case bit(KPFSlab):
		return ClassSlab
	case bit(KPFAnon):
		return ClassAnon
	case bit(KPFLRU):
		return ClassLRU
	}
	return ClassOther
}

// Range is a run of Count page frames from Start.
type Range struct {
	Start, Count uint64
}

// Ranges is a sorted list of disjoint, non-adjacent runs.
type Ranges []Range

// add appends pfn, extending the last run when pfn follows it. pfns must
// come in increasing order.
func (r Ranges) add(pfn uint64) Ranges {
	if n := len(r); n > 0 && r[n-1].Start+r[n-1].Count == pfn {
		r[n-1].Count++
		return r
	}
	return append(r, Range{Start: pfn, Count: 1})
}

// Pages returns the number of page frames in r.
func (r Ranges) Pages() uint64 {
	var n uint64
	for _, x := range r {
		n += x.Count
	}
	return n
}

// Contains reports whether pfn is in r.
func (r Ranges) Contains(pfn uint64) bool {
	lo, hi := 0, len(r)
	for lo < hi {
		m := (lo + hi) / 2
		switch {
		case pfn < r[m].Start:
			hi = m
		case pfn >= r[m].Start+r[m].Count:
			lo = m + 1
		default:
			return true
		}
	}
	return false
}

// String formats r as "0x100-0x1ff,0x300" (inclusive hex bounds).
func (r Ranges) String() string {
	var b strings.Builder
	for i, x := range r {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%#x", x.Start)
		if x.Count > 1 {
			fmt.Fprintf(&b, "-%#x", x.Start+x.Count-1)
		}
	}
	return b.String()
}

// PageClasses is the classification of a pfn range.
type PageClasses struct {
	Start  uint64
	Counts [NumClasses]uint64
	Ranges [NumClasses]Ranges
}

// ClassifyPages classifies words[i], the kpageflags word of pfn start+i.
// A compound tail page takes the class of its head when the head is in
// the range (slab and huge pages flag only the head).
func ClassifyPages(start uint64, words []uint64) PageClasses {
	c := NewClassifier(start, true)
	c.Add(words)
	return c.Result()
}

// Classifier classifies a pfn range fed in pieces, so that a large guest's
// /proc/kpageflags can be read in chunks instead of all at once.
type Classifier struct {
	pc         PageClasses
	next       uint64
	keepRanges bool
	headClass  PageClass
	inCompound bool
}

// NewClassifier starts at pfn start. Without keepRanges it only counts,
// which keeps its memory constant however fragmented the guest is.
func NewClassifier(start uint64, keepRanges bool) *Classifier {
	return &Classifier{pc: PageClasses{Start: start}, next: start, keepRanges: keepRanges}
}

// Add classifies the words of the next len(words) pfns.
func (c *Classifier) Add(words []uint64) {
	for _, w := range words {
		cl := ClassifyFlags(w)
		switch {
		case w&(1<<KPFCompoundHead) != 0:
			c.headClass, c.inCompound = cl, true
		case w&(1<<KPFCompoundTail) != 0:
			if c.inCompound && cl == ClassOther {
				cl = c.headClass
			}
		default:
			c.inCompound = false
		}
		c.pc.Counts[cl]++
		if c.keepRanges {
			c.pc.Ranges[cl] = c.pc.Ranges[cl].add(c.next)
		}
		c.next++
	}
}

// Result returns the classification so far.
func (c *Classifier) Result() PageClasses { return c.pc }

// Summary formats the counts as "pagetable=12 slab=80 ..." in class order,
// for a xenstore value.
func (pc PageClasses) Summary() string {
	var parts []string
	for c := PageClass(0); c < NumClasses; c++ {
		parts = append(parts, c.String()+"="+strconv.FormatUint(pc.Counts[c], 10))
	}
	return strings.Join(parts, " ")
}

// DecodeKpageflags turns the bytes read from /proc/kpageflags (one
// native-endian u64 per pfn; every Xen guest is little-endian x86 or Arm)
// into words.
func DecodeKpageflags(b []byte) ([]uint64, error) {
	if len(b)%8 != 0 {
		return nil, fmt.Errorf("kpageflags: %d bytes is not a whole number of 8-byte words", len(b))
	}
	w := make([]uint64, len(b)/8)
	for i := range w {
		w[i] = binary.LittleEndian.Uint64(b[8*i:])
	}
	return w, nil
}
