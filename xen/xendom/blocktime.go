package xendom

import (
	"sync"
	"time"
)

// blocktime measures QEMU's postcopy blocktime on a Xen destination: a
// vCPU is blocked from the moment its paging request (FlagVCPUPaused,
// which names the vCPU) is taken off the ring until the response that
// resumes it; the domain's blocktime is the time during which all its
// vCPUs were blocked at once. A vCPU has at most one such request out:
// Xen paused it on the first.
type blocktime struct {
	mu       sync.Mutex
	now      func() time.Time
	vcpus    int
	since    map[uint32]time.Time // blocked vCPUs and since when
	per      []time.Duration      // by vCPU id
	all      time.Duration
	allSince time.Time // the moment the last running vCPU blocked
}

func newBlocktime(vcpus int, now func() time.Time) *blocktime {
	return &blocktime{now: now, vcpus: vcpus, since: map[uint32]time.Time{}, per: make([]time.Duration, vcpus)}
}

// block records that vcpu waits on a request taken now.
func (b *blocktime) block(vcpu uint32) {
	if b == nil || int(vcpu) >= b.vcpus {
		return // not one of the domain's vCPUs: nothing to measure against
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.since[vcpu]; ok {
		return
	}
	t := b.now()
	b.since[vcpu] = t
	if len(b.since) == b.vcpus {
		b.allSince = t
	}
}

// unblock records the response that resumes vcpu.
func (b *blocktime) unblock(vcpu uint32) {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.since[vcpu]
	if !ok {
		return
	}
	t := b.now()
	if len(b.since) == b.vcpus {
		b.all += t.Sub(b.allSince)
	}
	b.per[vcpu] += t.Sub(s)
	delete(b.since, vcpu)
}

// totals are the all-vCPUs time and each vCPU's own, counting vCPUs
// still blocked up to now.
func (b *blocktime) totals() (all time.Duration, per []time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.now()
	all = b.all
	if len(b.since) == b.vcpus && b.vcpus > 0 {
		all += t.Sub(b.allSince)
	}
	per = append([]time.Duration(nil), b.per...)
	for v, s := range b.since {
		per[v] += t.Sub(s)
	}
	return all, per
}
