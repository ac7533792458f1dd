package engine

import (
	"math"
	"sort"
	"time"
)

// Stats are a migration's figures. Names follow QEMU's query-migrate where
// one exists (DESIGN.md §6); times are milliseconds, latencies microseconds.
type Stats struct {
	Mode      string `json:"mode"`
	Prepaging string `json:"prepaging,omitempty"`
	Domain    string `json:"domain"`
	Pages     uint64 `json:"pages"`
	PageSize  uint32 `json:"page_size"`

	TotalTimeMs float64 `json:"total_time_ms"`
	DowntimeMs  float64 `json:"downtime_ms"`
	SetupTimeMs float64 `json:"setup_time_ms"`

	PrecopyBytes  uint64 `json:"precopy_bytes"`
	DowntimeBytes uint64 `json:"downtime_bytes"`
	PostcopyBytes uint64 `json:"postcopy_bytes"`
	TotalBytes    uint64 `json:"total_bytes"`

	// PagesSent counts page transmissions of every kind (zero pages too).
	PagesSent uint64 `json:"pages_sent"`
	ZeroPages uint64 `json:"zero_pages"`
	// ResentPages counts every transmission of a page after its first,
	// in every phase: pre-copy's re-sends of pages the guest wrote again
	// (its inherent cost), hybrid's re-sends of discarded pages; in
	// post-copy the early core pages written again before the pause
	// (EarlyCoreRedirtied). (QEMU's "duplicate" means zero pages:
	// ZeroPages here.)
	ResentPages uint64 `json:"resent_pages"`
	// RedundantPages reached the destination after it held that same
	// version (after the resume): wasted transmissions. Must be 0.
	RedundantPages uint64 `json:"redundant_pages"`
	PrecopyRounds  int    `json:"precopy_rounds"`
	CorePages      uint64 `json:"core_pages"`
	// EarlyCorePages were sent before the pause, while the domain ran
	// with write tracking (post-copy with a source that knows its core
	// pages at setup); EarlyCoreRedirtied of them were written again and
	// sent once more in the pause (counted in ResentPages too).
	// Recoveries is how many times a link that broke after GO was
	// replaced by a new one (QEMU's postcopy-paused → resumed);
	// PostcopyPausedMs the time spent without a link, summed; LostPages
	// the pages sent before a break that the destination did not hold
	// after it, sent again (counted in ResentPages too).
	// TakenOver says this process took the migration over from a source
	// process that died after GO (TakeOverSource): the figures are this
	// process's part; the downtime, setup and pre-copy figures, measured
	// by the process that died, are 0 here and mean nothing.
	TakenOver          bool    `json:"taken_over,omitempty"`
	Recoveries         int     `json:"recoveries"`
	PostcopyPausedMs   float64 `json:"postcopy_paused_ms"`
	LostPages          uint64  `json:"recovery_lost_pages"`
	EarlyCorePages     uint64  `json:"early_core_pages"`
	EarlyCoreRedirtied uint64  `json:"early_core_redirtied"`
	DiscardedPages     uint64  `json:"discarded_pages"`
	// DroppedPages left the domain between the setup and the pause (its
	// balloon gave them back): not sent. AddedPages joined it: sent in the
	// pause. GuestDroppedPages were given back by the resumed guest at the
	// destination before they arrived: not placed, not verified.
	DroppedPages      uint64 `json:"dropped_pages"`
	AddedPages        uint64 `json:"added_pages"`
	GuestDroppedPages uint64 `json:"guest_dropped_pages"`
	// UnreadableReads counts pages a pre-copy round could not read (the
	// guest was giving them back). None is ever sent: the pause re-checks
	// each one.
	UnreadableReads uint64 `json:"unreadable_reads"`

	// Pre-record figures: the recording window, the trajectory, and how
	// many pages of the priority list came from each stage.
	RecordTimeMs   float64 `json:"record_time_ms,omitempty"`
	PlanTimeMs     float64 `json:"plan_time_ms,omitempty"`
	RecordRounds   int     `json:"record_rounds,omitempty"`
	TrajectoryLen  uint64  `json:"trajectory_len,omitempty"`
	RecordedPages  uint64  `json:"recorded_pages,omitempty"`
	PredictedPages uint64  `json:"predicted_pages,omitempty"`
	HotspotPages   uint64  `json:"hotspot_pages,omitempty"`
	Paths          int     `json:"lr_paths,omitempty"`
	Hotspots       int     `json:"hotspots,omitempty"`

	Faults        uint64 `json:"faults"`
	NetworkFaults uint64 `json:"network_faults"`
	// WorkingSet (distinct pages the resumed guest touched) is known
	// only where the backend sees every access (lab domains): omitted
	// otherwise, with FaultsPerWS and PrepagedHits.
	PrepagedHits      uint64  `json:"prepaged_hits,omitempty"`
	WorkingSet        uint64  `json:"working_set,omitempty"`
	FaultsPerWS       float64 `json:"network_faults_per_working_set,omitempty"`
	FaultLatencyP50Us float64 `json:"fault_latency_p50_us"`
	FaultLatencyP99Us float64 `json:"fault_latency_p99_us"`
	// FaultWaitMs sums every demand fault's wait for its page; with
	// several vCPUs waiting at once it can exceed the wall time. QEMU's
	// blocktime (time all vCPUs were blocked) needs per-vCPU fault data
	// and is not reported.
	FaultWaitMs float64 `json:"fault_wait_ms"`

	// Verified: every page at the destination matches the source's
	// checksum of the paused domain; VerifiedFrom says whether the
	// destination's memory (read back) or what arrived was compared.
	Verified          bool   `json:"verified"`
	VerifiedFrom      string `json:"verified_from"`
	VerifiedPages     uint64 `json:"verified_pages"`
	GuestWrittenPages uint64 `json:"guest_written_pages"`
	MismatchedPages   uint64 `json:"mismatched_pages"`
	IntegrityErrors   uint64 `json:"integrity_errors"`
	Progress          uint64 `json:"progress"`

	// FaultTimeline counts network faults per 10 ms after resume.
	FaultTimeline []uint32 `json:"fault_timeline,omitempty"`
	// BlocktimeMs is QEMU's postcopy-blocktime: the time during which all
	// the destination's vCPUs were blocked on pages at once;
	// VCPUBlocktimeMs each vCPU's own (postcopy-vcpu-blocktime). Omitted
	// where the backend cannot tell which vCPU waits (lab domains).
	BlocktimeMs     *float64  `json:"postcopy_blocktime_ms,omitempty"`
	VCPUBlocktimeMs []float64 `json:"postcopy_vcpu_blocktime_ms,omitempty"`
	// Timeline is the source's bytes, page transmissions and faults over
	// the whole migration, sampled every Options.ProgressEvery (at most
	// MaxTimeline samples; the last one is the end). `xl-postcopy plot`
	// draws it.
	Timeline []Sample `json:"timeline,omitempty"`

	// Filled in by callers that know the link.
	LinkRateBps  uint64  `json:"link_rate_bps,omitempty"`
	LinkBoundMs  float64 `json:"link_bound_ms,omitempty"`
	TimeOverLink float64 `json:"total_time_over_link_bound,omitempty"`
}

// DestStats are the destination's figures, sent to the source in a STATS
// record and merged into Stats.
type DestStats struct {
	Faults            uint64  `json:"faults"`
	NetworkFaults     uint64  `json:"network_faults"`
	FaultLatencyP50Us float64 `json:"fault_latency_p50_us"`
	FaultLatencyP99Us float64 `json:"fault_latency_p99_us"`
	FaultWaitMs       float64 `json:"fault_wait_ms"`
	RedundantPages    uint64  `json:"redundant_pages"`
	PagesReceived     uint64  `json:"pages_received"`
	MismatchedPages   uint64  `json:"mismatched_pages"`
	DistinctFaulted   uint64  `json:"distinct_faulted"`
	GuestDropped      uint64  `json:"guest_dropped_pages"`
	// VerifiedFrom says what the checksums were compared with: "memory"
	// (the destination read its memory back) or "stream" (what arrived:
	// a destination that cannot read itself back).
	VerifiedFrom  string       `json:"verified_from"`
	VerifiedPages uint64       `json:"verified_pages"`      // compared from destination memory
	GuestWritten  uint64       `json:"guest_written_pages"` // written by the resumed guest first: what arrived was compared
	VerifyMs      float64      `json:"verify_ms,omitempty"`
	PlaceRetries  uint64       `json:"place_retries"`
	Guest         *GuestReport `json:"guest,omitempty"`
	// FaultTimeline counts network faults per TimelineBucket after resume.
	FaultTimeline []uint32 `json:"fault_timeline,omitempty"`
	// BlocktimeMs and VCPUBlocktimeMs: see Stats; nil where the backend
	// cannot know them.
	BlocktimeMs     *float64  `json:"postcopy_blocktime_ms,omitempty"`
	VCPUBlocktimeMs []float64 `json:"postcopy_vcpu_blocktime_ms,omitempty"`
	// Recoveries and PostcopyPausedMs: the destination's side of the
	// source's figures (time from its link breaking to the new one).
	Recoveries       int     `json:"recoveries"`
	PostcopyPausedMs float64 `json:"postcopy_paused_ms"`
}

// merge folds the destination's figures into s.
func (s *Stats) merge(d *DestStats) {
	s.Faults = d.Faults
	s.NetworkFaults = d.NetworkFaults
	s.FaultLatencyP50Us = d.FaultLatencyP50Us
	s.FaultLatencyP99Us = d.FaultLatencyP99Us
	s.FaultWaitMs = d.FaultWaitMs
	s.FaultTimeline = d.FaultTimeline
	s.BlocktimeMs, s.VCPUBlocktimeMs = d.BlocktimeMs, d.VCPUBlocktimeMs
	s.RedundantPages = d.RedundantPages
	s.GuestDroppedPages = d.GuestDropped
	s.VerifiedFrom, s.VerifiedPages, s.GuestWrittenPages = d.VerifiedFrom, d.VerifiedPages, d.GuestWritten
	if g := d.Guest; g != nil {
		s.WorkingSet = g.WorkingSet
		s.IntegrityErrors = g.IntegrityErrors
		s.Progress = g.Progress
		if g.WorkingSet >= d.DistinctFaulted {
			s.PrepagedHits = g.WorkingSet - d.DistinctFaulted
		}
		if g.WorkingSet > 0 {
			s.FaultsPerWS = float64(d.NetworkFaults) / float64(g.WorkingSet)
		}
	}
}

// SetLink fills the link figures: the bound is the time the bytes that had
// to move need at the link rate.
func (s *Stats) SetLink(rateBps uint64) {
	if rateBps == 0 {
		return
	}
	s.LinkRateBps = rateBps
	s.LinkBoundMs = float64(s.TotalBytes*8) / float64(rateBps) * 1000
	if s.LinkBoundMs > 0 {
		s.TimeOverLink = s.TotalTimeMs / s.LinkBoundMs
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// addMs adds d to a sum of milliseconds kept to the microsecond (summed
// floats would print as 4149.6849999999995).
func addMs(sum float64, d time.Duration) float64 {
	return float64(int64(math.Round(sum*1000))+d.Microseconds()) / 1000
}

// percentile returns the p-th percentile (0..1) of xs in microseconds.
func percentile(xs []time.Duration, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), xs...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(p * float64(len(s)-1))
	return float64(s[i].Nanoseconds()) / 1000
}

// Progress is a live snapshot for a progress display.
type Progress struct {
	Phase     string // "setup", "record", "precopy", "stop", "postcopy", "verify", "done"
	Round     int
	PagesSent uint64 // page transmissions (a page re-sent counts again)
	Pages     uint64 // total pages of the domain
	// Remaining counts the pages that hold memory and were never sent
	// yet (in pre-copy, pages dirtied again are not counted).
	Remaining uint64
	Bytes     uint64
	Faults    uint64 // fault requests served so far
	Elapsed   time.Duration
	// Downtime is from the pause to the destination's RESUMED; 0 until
	// then.
	Downtime time.Duration
}

// Sample is one point of Stats.Timeline: the source's counters at AtMs
// since the migration started.
type Sample struct {
	AtMs      float64 `json:"at_ms"`
	Phase     string  `json:"phase"`
	Bytes     uint64  `json:"bytes"`
	PagesSent uint64  `json:"pages_sent"`
	Faults    uint64  `json:"faults"`
}

// MaxTimeline bounds Stats.Timeline: past it, every other sample is
// dropped and the interval doubles, so a long migration keeps its shape
// in a bounded record.
const MaxTimeline = 1024
