package dsb

import (
	"errors"
	"fmt"
	"time"
)

const mib = 1024 // kB per MiB

// Config tunes the policy. Sizes are in kB (KiB) like target_kb.
//
// Two quantities protect the guest. The reserve is how much memory the
// guest keeps free (MemFree) when it gives memory back, and the level of
// MemAvailable below which it takes memory back at once. The floor is a
// hard lower bound on the target, a guard against the estimate being wrong
// (a process that allocates faster than one period can react to).
type Config struct {
	// MaxKB is the ceiling: the memory the toolstack gave the domain (the
	// target found at start). Xen refuses pages above the domain's maxmem,
	// so growing further would only leave the balloon driver retrying.
	MaxKB uint64

	// Reserve = max(ReserveMinKB, ReserveFraction*MaxKB).
	ReserveMinKB    uint64
	ReserveFraction float64
	// Floor = max(FloorMinKB, FloorFraction*MaxKB), never above MaxKB.
	FloorMinKB    uint64
	FloorFraction float64
	// A shrink step releases at most max(ShrinkStepMinKB,
	// ShrinkStepFraction*MaxKB) per sample.
	ShrinkStepMinKB    uint64
	ShrinkStepFraction float64
	// ShrinkThresholdKB is a hysteresis band: shrinking leaves MemFree
	// this far above the reserve, so the few pages a quiet guest
	// allocates next do not push MemAvailable under the reserve and make
	// the policy grow right back.
	ShrinkThresholdKB uint64

	// StallGrow is the share of wall time with some task stalled on
	// memory (from the growth of PSI some total between samples) that
	// counts as pressure.
	StallGrow float64
	// QuietAvg10 is the PSI some avg10 (percent) below which the guest
	// is quiet enough to give memory away.
	QuietAvg10 float64
	// Cooldown is how long after the last pressure nothing is given away.
	Cooldown time.Duration
	// SettleSlackKB: the balloon counts as still moving while its current
	// size exceeds the target by more than this.
	SettleSlackKB uint64
}

// DefaultConfig returns the defaults for a domain of maxKB.
//
// Why these numbers (lab: a 128 MiB Debian PVH guest whose kernel keeps
// ~48 MiB for itself — MemTotal is 82052 kB at a 130684 kB target — and
// which is OOM-killed at a 64 MiB target):
//   - Floor 80 MiB absolute: the 64 MiB OOM point plus 25 % margin. 25 % of
//     MaxKB for large guests, because the kernel's own footprint (struct
//     page array ~1.6 %, page tables, slab) grows with memory size and the
//     absolute number stops meaning anything there. The floor is the last
//     guard only: the reserve stops shrinking long before it.
//   - Reserve 16 MiB absolute: the kernel's watermarks (min_free_kbytes is
//     ~1.4 MiB at this size) plus what a burst can allocate in the one
//     period before the daemon reacts; 10 % of MaxKB for large guests,
//     whose bursts scale with their workloads. A first lab run with 32 MiB
//     left the 128 MiB guest nothing to give: its MemTotal is only 80 MiB
//     and a 16 MiB workload brought MemAvailable to ~32 MiB.
//   - Shrink step max(8 MiB, 2 %) per 1 s sample: "slowly", so that a guest
//     that was idle for a few seconds has not lost its headroom when work
//     comes back; 128 MiB → floor takes ~6 s, 8 GiB frees ~160 MiB/s.
//   - Shrink threshold (hysteresis) 2 MiB: shrinking stops with MemFree
//     2 MiB above the reserve; smaller moves are noise anyway.
//   - StallGrow 2 %: 20 ms of memory stall per second is reclaim or
//     refaults that users feel; an idle guest shows 0.
//   - QuietAvg10 1 %: PSI's 10 s average must have decayed before giving
//     memory away again.
//   - Cooldown 30 s: three avg10 time constants; memory a workload just
//     reached for is likely wanted again soon.
//   - Settle slack 1 MiB: the driver moves in pages and may lag a little.
func DefaultConfig(maxKB uint64) Config {
	return Config{
		MaxKB:              maxKB,
		ReserveMinKB:       16 * mib,
		ReserveFraction:    0.10,
		FloorMinKB:         80 * mib,
		FloorFraction:      0.25,
		ShrinkStepMinKB:    8 * mib,
		ShrinkStepFraction: 0.02,
		ShrinkThresholdKB:  2 * mib,
		StallGrow:          0.02,
		QuietAvg10:         1.0,
		Cooldown:           30 * time.Second,
		SettleSlackKB:      1 * mib,
	}
}

func frac(f float64, kb uint64) uint64 { return uint64(f * float64(kb)) }

// ReserveKB returns the reserve.
func (c Config) ReserveKB() uint64 {
	return max(c.ReserveMinKB, frac(c.ReserveFraction, c.MaxKB))
}

// FloorKB returns the lowest target the policy will ever set.
func (c Config) FloorKB() uint64 {
	return min(max(c.FloorMinKB, frac(c.FloorFraction, c.MaxKB)), c.MaxKB)
}

// ShrinkStepKB returns the most one periodic step gives away.
func (c Config) ShrinkStepKB() uint64 {
	return max(c.ShrinkStepMinKB, frac(c.ShrinkStepFraction, c.MaxKB))
}

// Validate reports settings the policy cannot work with.
func (c Config) Validate() error {
	switch {
	case c.MaxKB == 0:
		return errors.New("dsb: MaxKB is 0: the domain's memory size is unknown")
	case c.ReserveFraction < 0 || c.ReserveFraction >= 1, c.FloorFraction < 0 || c.FloorFraction > 1,
		c.ShrinkStepFraction < 0 || c.ShrinkStepFraction > 1:
		return fmt.Errorf("dsb: fractions must lie in [0,1): reserve %v floor %v step %v",
			c.ReserveFraction, c.FloorFraction, c.ShrinkStepFraction)
	case c.ShrinkStepKB() == 0:
		return errors.New("dsb: shrink step is 0: the guest would never give memory back")
	case c.StallGrow <= 0:
		return errors.New("dsb: StallGrow must be positive")
	}
	return nil
}

// Sample is what the daemon reads each period.
type Sample struct {
	// Time is a monotonic timestamp (any origin); PSI stall rates and the
	// cooldown are measured with it.
	Time time.Duration
	Mem  Meminfo
	PSI  PSI
	// TargetKB is the balloon target now in force (target_kb).
	TargetKB uint64
	// CurrentKB is the memory the balloon driver has reached
	// (xen_memory0/info/current_kb); 0 if unknown.
	CurrentKB uint64
}

// Action says what a Decision does.
type Action int

// Actions.
const (
	Hold   Action = iota // keep the target
	Shrink               // give memory back to Xen
	Grow                 // take memory from Xen
)

func (a Action) String() string {
	switch a {
	case Shrink:
		return "shrink"
	case Grow:
		return "grow"
	}
	return "hold"
}

// Decision is the policy's answer to a sample.
type Decision struct {
	TargetKB uint64
	Action   Action
	Reason   string
	// Pressure is set when the sample showed memory pressure.
	Pressure bool
}

// Policy is the self-ballooning state machine. It is not safe for
// concurrent use; the daemon drives it from one goroutine.
type Policy struct {
	cfg          Config
	prev         *Sample
	lastPressure time.Duration
	everPressure bool
}

// NewPolicy returns a policy with cfg, which must Validate.
func NewPolicy(cfg Config) (*Policy, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Policy{cfg: cfg}, nil
}

// Config returns the configuration in force.
func (p *Policy) Config() Config { return p.cfg }

// pressure reports whether s shows memory pressure, and why.
func (p *Policy) pressure(s Sample) (bool, string) {
	reserve := p.cfg.ReserveKB()
	if s.Mem.MemAvailable < reserve {
		return true, fmt.Sprintf("MemAvailable %d kB below the %d kB reserve", s.Mem.MemAvailable, reserve)
	}
	if !s.PSI.Valid {
		return false, ""
	}
	if p.prev != nil && p.prev.PSI.Valid && s.Time > p.prev.Time && s.PSI.Some.Total >= p.prev.PSI.Some.Total {
		// The growth of the stall total is the immediate signal; avg10
		// lags by seconds in both directions.
		rate := float64(s.PSI.Some.Total-p.prev.PSI.Some.Total) / float64(s.Time-p.prev.Time) * 1e3
		if rate >= p.cfg.StallGrow {
			return true, fmt.Sprintf("memory stall %.1f%% of the last %v", rate*100, s.Time-p.prev.Time)
		}
		return false, ""
	}
	// First sample (or a counter reset): only the average is there.
	if s.PSI.Some.Avg10 >= p.cfg.StallGrow*100 {
		return true, fmt.Sprintf("PSI some avg10 %.2f%%", s.PSI.Some.Avg10)
	}
	return false, ""
}

// Step feeds one periodic sample and returns the target to set.
func (p *Policy) Step(s Sample) Decision {
	d := p.step(s)
	p.prev = &s
	return d
}

func (p *Policy) step(s Sample) Decision {
	cfg := p.cfg
	reserve, floor, ceil := cfg.ReserveKB(), cfg.FloorKB(), cfg.MaxKB
	cur := s.TargetKB
	// What the guest holds now: the balloon may still be moving.
	have := cur
	if s.CurrentKB != 0 {
		have = s.CurrentKB
	}

	if under, why := p.pressure(s); under {
		p.lastPressure, p.everPressure = s.Time, true
		// Take back at once what is missing below the reserve, plus a
		// whole reserve so the next burst finds room.
		var deficit uint64
		if s.Mem.MemAvailable < reserve {
			deficit = reserve - s.Mem.MemAvailable
		}
		t := min(max(cur, have)+deficit+reserve, ceil)
		t = max(t, floor)
		if t <= cur {
			return Decision{TargetKB: cur, Action: Hold, Pressure: true, Reason: why + "; already at the ceiling"}
		}
		return Decision{TargetKB: t, Action: Grow, Pressure: true, Reason: why}
	}
	if cur < floor {
		return Decision{TargetKB: floor, Action: Grow, Reason: fmt.Sprintf("target below the %d kB floor", floor)}
	}
	if cur > ceil {
		return Decision{TargetKB: ceil, Action: Shrink, Reason: fmt.Sprintf("target above the %d kB ceiling", ceil)}
	}
	if p.everPressure && s.Time-p.lastPressure < cfg.Cooldown {
		return Decision{TargetKB: cur, Action: Hold, Reason: "cooling down after pressure"}
	}
	if s.PSI.Valid && s.PSI.Some.Avg10 >= cfg.QuietAvg10 {
		return Decision{TargetKB: cur, Action: Hold, Reason: fmt.Sprintf("PSI some avg10 %.2f%% not quiet yet", s.PSI.Some.Avg10)}
	}
	if s.CurrentKB != 0 && s.CurrentKB > cur+cfg.SettleSlackKB {
		// MemFree does not show the last shrink yet.
		return Decision{TargetKB: cur, Action: Hold, Reason: "balloon still inflating"}
	}
	if s.Mem.MemFree <= reserve+cfg.ShrinkThresholdKB {
		return Decision{TargetKB: cur, Action: Hold, Reason: "free memory within the reserve"}
	}
	step := min(s.Mem.MemFree-reserve-cfg.ShrinkThresholdKB, cfg.ShrinkStepKB())
	base := min(cur, have)
	t := max(base-min(step, base), floor)
	if t >= cur {
		return Decision{TargetKB: cur, Action: Hold, Reason: "at the floor"}
	}
	return Decision{TargetKB: t, Action: Shrink, Reason: fmt.Sprintf("%d kB free above the reserve", s.Mem.MemFree-reserve)}
}

// BalloonNow answers a toolstack's request to give back everything above
// the reserve at once (before a migration, so that free pages are
// unpopulated and never sent). It counts MemAvailable, not MemFree: the
// page cache it includes is clean and cheaper to re-read than to migrate.
// Under pressure it gives nothing. It does not change the periodic state.
func (p *Policy) BalloonNow(s Sample) Decision {
	cfg := p.cfg
	reserve, floor := cfg.ReserveKB(), cfg.FloorKB()
	cur := s.TargetKB
	if under, why := p.pressure(s); under {
		return Decision{TargetKB: max(cur, floor), Action: Hold, Pressure: true, Reason: why + "; nothing to give"}
	}
	have := cur
	if s.CurrentKB != 0 {
		have = min(cur, s.CurrentKB)
	}
	// Leave the hysteresis band too: without it the next period saw
	// MemAvailable a few pages under the reserve and grew the guest
	// straight back (seen in the lab).
	if s.Mem.MemAvailable <= reserve+cfg.ShrinkThresholdKB {
		return Decision{TargetKB: max(cur, floor), Action: Hold, Reason: "nothing above the reserve"}
	}
	release := s.Mem.MemAvailable - reserve - cfg.ShrinkThresholdKB
	t := max(have-min(release, have), floor)
	if t >= cur {
		return Decision{TargetKB: max(cur, floor), Action: Hold, Reason: "nothing above the reserve"}
	}
	return Decision{TargetKB: t, Action: Shrink, Reason: fmt.Sprintf("balloon-now: %d kB available above the reserve", release)}
}
