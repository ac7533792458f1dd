package dsb

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const maxKB = 131072 // the lab's 128 MiB guest

// loadSamples reads a testdata/*.samples file (format in its header).
func loadSamples(t *testing.T, name string) []Sample {
	t.Helper()
	f, err := os.Open("testdata/" + name)
	require.NoError(t, err)
	defer f.Close()
	var out []Sample
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		f := strings.Fields(line)
		require.Len(t, f, 9, line)
		u := func(i int) uint64 {
			v, err := strconv.ParseUint(f[i], 10, 64)
			require.NoError(t, err, line)
			return v
		}
		fl := func(i int) float64 {
			v, err := strconv.ParseFloat(f[i], 64)
			require.NoError(t, err, line)
			return v
		}
		s := Sample{Time: time.Duration(u(0)) * time.Second}
		s.Mem = Meminfo{MemTotal: u(1), MemFree: u(2), MemAvailable: u(3), Cached: u(4)}
		s.PSI = PSI{Valid: true, Some: PSILine{Avg10: fl(5), Total: u(6)}, Full: PSILine{Avg10: fl(7), Total: u(8)}}
		out = append(out, s)
	}
	require.NoError(t, sc.Err())
	require.NotEmpty(t, out)
	return out
}

type run struct {
	samples   []Sample
	decisions []Decision
	targets   []uint64 // target in force when sample i was taken
}

// replay drives a policy open loop: the recorded memory figures do not
// react, but each decision's target is fed back as the next sample's.
func replay(t *testing.T, cfg Config, samples []Sample) run {
	t.Helper()
	p, err := NewPolicy(cfg)
	require.NoError(t, err)
	r := run{samples: samples}
	target := cfg.MaxKB
	for _, s := range samples {
		s.TargetKB, s.CurrentKB = target, target
		d := p.Step(s)
		r.targets = append(r.targets, target)
		r.decisions = append(r.decisions, d)
		target = d.TargetKB
	}
	return r
}

// underPressure is the test's own reading of the sample, independent of
// the policy's code: MemAvailable below the reserve, or more than 2 % of
// the interval stalled.
func underPressure(cfg Config, prev *Sample, s Sample) bool {
	if s.Mem.MemAvailable < cfg.ReserveKB() {
		return true
	}
	if prev == nil {
		return s.PSI.Some.Avg10 >= 2
	}
	stalled := time.Duration(s.PSI.Some.Total-prev.PSI.Some.Total) * time.Microsecond
	return float64(stalled) >= 0.02*float64(s.Time-prev.Time)
}

func checkInvariants(t *testing.T, cfg Config, r run) {
	t.Helper()
	for i, d := range r.decisions {
		assert.GreaterOrEqual(t, d.TargetKB, cfg.FloorKB(), "t=%v target below the floor", r.samples[i].Time)
		assert.LessOrEqual(t, d.TargetKB, cfg.MaxKB, "t=%v target above the ceiling", r.samples[i].Time)
		if d.TargetKB < r.targets[i] {
			assert.LessOrEqual(t, r.targets[i]-d.TargetKB, cfg.ShrinkStepKB(), "t=%v shrink step too large", r.samples[i].Time)
		}
		var prev *Sample
		if i > 0 {
			prev = &r.samples[i-1]
		}
		if underPressure(cfg, prev, r.samples[i]) {
			assert.True(t, d.Pressure, "t=%v pressure not seen", r.samples[i].Time)
			if r.targets[i] < cfg.MaxKB {
				assert.Equal(t, Grow, d.Action, "t=%v must grow within this step: %s", r.samples[i].Time, d.Reason)
				assert.Greater(t, d.TargetKB, r.targets[i])
			}
		}
	}
}

func TestRecordedIdle(t *testing.T) {
	cfg := DefaultConfig(maxKB)
	r := replay(t, cfg, loadSamples(t, "idle.samples"))
	checkInvariants(t, cfg, r)
	shrinks := 0
	for i, d := range r.decisions {
		assert.NotEqual(t, Grow, d.Action, "t=%d: idle never grows", i)
		if d.Action == Shrink {
			shrinks++
		}
	}
	assert.Equal(t, Shrink, r.decisions[0].Action, "idle gives memory back from the first sample")
	assert.Less(t, r.decisions[len(r.decisions)-1].TargetKB, uint64(maxKB))
	// Open loop the free memory never drops, so it walks to the floor in
	// bounded steps: ceil((128-80 MiB)/8 MiB) = 6 steps.
	assert.Equal(t, 6, shrinks)
	assert.Equal(t, cfg.FloorKB(), r.decisions[len(r.decisions)-1].TargetKB)
}

func TestRecordedSpike(t *testing.T) {
	cfg := DefaultConfig(maxKB)
	r := replay(t, cfg, loadSamples(t, "spike.samples"))
	checkInvariants(t, cfg, r)
	// The first sample with stall growth (t=12, 6 % stalled) grows at once.
	assert.Equal(t, Grow, r.decisions[12].Action, r.decisions[12].Reason)
	assert.Contains(t, r.decisions[12].Reason, "stall")
	for i := 10; i < 12; i++ {
		assert.NotEqual(t, Shrink, r.decisions[i].Action, "t=%d: allocation under way but no pressure yet", i)
	}
	last := 0
	for i, d := range r.decisions {
		if d.Pressure {
			last = i
		}
	}
	assert.Equal(t, 24, last, "the last pressured sample is the last one before the free")
	// Nothing is given back until the cooldown after the last pressure.
	for i := last + 1; i < len(r.decisions); i++ {
		if r.samples[i].Time-r.samples[last].Time < cfg.Cooldown {
			assert.Equal(t, Hold, r.decisions[i].Action, "t=%d within cooldown", i)
		}
	}
	// Once quiet it shrinks again, in steps, back to the floor (open loop).
	shrinksAfter := 0
	for i := last + 1; i < len(r.decisions); i++ {
		if r.decisions[i].Action == Shrink {
			shrinksAfter++
			assert.GreaterOrEqual(t, r.samples[i].Time-r.samples[last].Time, cfg.Cooldown)
		}
	}
	assert.Equal(t, 6, shrinksAfter)
	assert.Equal(t, cfg.FloorKB(), r.decisions[len(r.decisions)-1].TargetKB)
}

func TestRecordedSteadyPressure(t *testing.T) {
	cfg := DefaultConfig(maxKB)
	samples := loadSamples(t, "pressure.samples")
	// Start from a ballooned-down guest so growth is visible.
	p, err := NewPolicy(cfg)
	require.NoError(t, err)
	target := cfg.FloorKB()
	for i, s := range samples {
		s.TargetKB, s.CurrentKB = target, target
		d := p.Step(s)
		assert.True(t, d.Pressure, "t=%d", i)
		assert.NotEqual(t, Shrink, d.Action, "t=%d: never shrinks under pressure", i)
		if target < cfg.MaxKB {
			assert.Equal(t, Grow, d.Action, "t=%d", i)
		}
		target = d.TargetKB
		if i == 0 {
			// deficit + one reserve in one step: floor + (reserve-avail) + reserve, capped.
			want := min(cfg.FloorKB()+cfg.ReserveKB()-s.Mem.MemAvailable+cfg.ReserveKB(), uint64(maxKB))
			assert.Equal(t, want, target)
		}
	}
	assert.Equal(t, uint64(maxKB), target, "steady pressure takes everything back")
}

func TestFloorAndCeilingClamp(t *testing.T) {
	cfg := DefaultConfig(maxKB)
	p, err := NewPolicy(cfg)
	require.NoError(t, err)
	idle := Sample{Mem: Meminfo{MemTotal: 50000, MemFree: 40000, MemAvailable: 45000}, TargetKB: 40000}
	d := p.Step(idle)
	assert.Equal(t, Grow, d.Action, "someone set the target below the floor")
	assert.Equal(t, cfg.FloorKB(), d.TargetKB)
	idle.Time, idle.TargetKB = time.Second, maxKB*2
	d = p.Step(idle)
	assert.Equal(t, uint64(maxKB), d.TargetKB)

	// A guest smaller than the absolute floor is never ballooned.
	small := DefaultConfig(64 * mib)
	assert.Equal(t, uint64(64*mib), small.FloorKB())
	p, err = NewPolicy(small)
	require.NoError(t, err)
	d = p.Step(Sample{Mem: Meminfo{MemTotal: 60000, MemFree: 55000, MemAvailable: 56000}, TargetKB: 64 * mib})
	assert.Equal(t, Hold, d.Action)
	assert.Equal(t, uint64(64*mib), d.TargetKB)
}

func TestNoPSI(t *testing.T) {
	// A kernel without PSI (CONFIG_PSI off or default-disabled): MemAvailable
	// alone must still drive growth.
	cfg := DefaultConfig(maxKB)
	cfg.MaxKB = 256 * mib // room above, so the amount is not capped
	p, err := NewPolicy(cfg)
	require.NoError(t, err)
	d := p.Step(Sample{Mem: Meminfo{MemTotal: 70000, MemFree: 2000, MemAvailable: 9000}, TargetKB: 90000})
	assert.Equal(t, Grow, d.Action)
	assert.Equal(t, uint64(90000+(cfg.ReserveKB()-9000)+cfg.ReserveKB()), d.TargetKB)
}

func TestInflatingBalloonHolds(t *testing.T) {
	cfg := DefaultConfig(maxKB)
	p, err := NewPolicy(cfg)
	require.NoError(t, err)
	d := p.Step(Sample{Mem: Meminfo{MemTotal: 100000, MemFree: 60000, MemAvailable: 80000}, TargetKB: 110000, CurrentKB: 120000})
	assert.Equal(t, Hold, d.Action, d.Reason)
	// A balloon that cannot grow (Xen refused pages) does not block shrinking.
	d = p.Step(Sample{Time: time.Second, Mem: Meminfo{MemTotal: 100000, MemFree: 60000, MemAvailable: 80000}, TargetKB: 125000, CurrentKB: 110000})
	assert.Equal(t, Shrink, d.Action)
	assert.Equal(t, uint64(110000-cfg.ShrinkStepKB()), d.TargetKB, "shrinks from what the guest has")
}

func TestBalloonNow(t *testing.T) {
	cfg := DefaultConfig(maxKB)
	p, err := NewPolicy(cfg)
	require.NoError(t, err)
	s := Sample{Mem: Meminfo{MemTotal: 104300, MemFree: 61000, MemAvailable: 81500}, TargetKB: maxKB}
	d := p.BalloonNow(s)
	assert.Equal(t, Shrink, d.Action)
	// Everything available above the reserve at once, not one step.
	want := max(uint64(maxKB)-(81500-cfg.ReserveKB()-cfg.ShrinkThresholdKB), cfg.FloorKB())
	assert.Equal(t, want, d.TargetKB)
	assert.Greater(t, uint64(maxKB)-d.TargetKB, cfg.ShrinkStepKB())

	s.Mem.MemAvailable = 12000
	d = p.BalloonNow(s)
	assert.Equal(t, Hold, d.Action)
	assert.True(t, d.Pressure)
	assert.Equal(t, uint64(maxKB), d.TargetKB)

	// It leaves MemAvailable a hysteresis band above the reserve, so the
	// next period does not grow right back.
	s = Sample{Mem: Meminfo{MemTotal: 80000, MemFree: 25000, MemAvailable: 30000}, TargetKB: 110000}
	d = p.BalloonNow(s)
	assert.Equal(t, uint64(110000-(30000-cfg.ReserveKB()-cfg.ShrinkThresholdKB)), d.TargetKB)
	after := s
	after.TargetKB, after.Mem.MemAvailable = d.TargetKB, cfg.ReserveKB()+cfg.ShrinkThresholdKB-512
	after.Mem.MemFree = after.Mem.MemAvailable - 5000
	assert.NotEqual(t, Grow, p.Step(after).Action, "a few pages allocated after the balloon do not undo it")
	s.Mem.MemAvailable = cfg.ReserveKB() + mib
	assert.Equal(t, Hold, p.BalloonNow(s).Action, "within the band: nothing to give")

	// Never below the floor.
	s = Sample{Mem: Meminfo{MemTotal: 104300, MemFree: 100000, MemAvailable: 100000}, TargetKB: 90000}
	assert.Equal(t, cfg.FloorKB(), p.BalloonNow(s).TargetKB)
}

func TestConfigValidate(t *testing.T) {
	assert.NoError(t, DefaultConfig(maxKB).Validate())
	assert.Error(t, DefaultConfig(0).Validate())
	c := DefaultConfig(maxKB)
	c.ReserveFraction = 1.5
	assert.Error(t, c.Validate())
	c = DefaultConfig(maxKB)
	c.ShrinkStepMinKB, c.ShrinkStepFraction = 0, 0
	assert.Error(t, c.Validate())
	_, err := NewPolicy(c)
	assert.Error(t, err)
}

// guestModel is a closed-loop stand-in for a ballooned Linux guest: the
// balloon driver moves towards the target at a bounded rate, MemTotal
// follows the memory it holds, page cache is reclaimed (with stalls) when
// anon memory needs room, and the guest OOMs when anon + kernel exceed
// MemTotal.
type guestModel struct {
	overhead, kernel uint64 // kB outside MemTotal; kernel's own use inside it
	anon, cache      uint64
	current, target  uint64
	stallUS          uint64
	oom              bool
}

const driverRate = 64 * mib // kB per second the balloon driver moves

func (g *guestModel) tick(dt time.Duration) Sample {
	move := uint64(float64(driverRate) * dt.Seconds())
	switch {
	case g.current > g.target:
		g.current -= min(move, g.current-g.target)
	case g.current < g.target:
		g.current += min(move, g.target-g.current)
	}
	total := g.current - g.overhead
	used := g.kernel + g.anon
	if used+1024 > total {
		g.oom = true
		return Sample{}
	}
	if used+g.cache+1024 > total {
		// Reclaim: drop cache, and tasks stall while it happens.
		g.cache = total - used - 1024
		g.stallUS += uint64(dt.Microseconds() / 10)
	}
	free := total - used - g.cache
	return Sample{
		Mem:       Meminfo{MemTotal: total, MemFree: free, MemAvailable: free + g.cache*9/10, Cached: g.cache},
		PSI:       PSI{Valid: true, Some: PSILine{Total: g.stallUS}},
		TargetKB:  g.target,
		CurrentKB: g.current,
	}
}

func TestClosedLoop(t *testing.T) {
	cfg := DefaultConfig(maxKB)
	p, err := NewPolicy(cfg)
	require.NoError(t, err)
	// Kernel ~46 MiB in all (outside and inside MemTotal), 10 MiB of
	// processes, 20 MiB of page cache.
	g := &guestModel{overhead: 24 * mib, kernel: 22 * mib, anon: 10 * mib, cache: 20 * mib, current: maxKB, target: maxKB}
	const dt = time.Second
	var lowest uint64 = maxKB
	var beforeSpike uint64
	for i := 0; i < 200; i++ {
		now := time.Duration(i) * dt
		switch {
		case i >= 60 && i < 66:
			g.anon += 8 * mib // a 48 MiB allocation at 8 MiB/s
		case i == 120:
			g.anon -= 48 * mib
		}
		if i == 60 {
			beforeSpike = g.target
		}
		s := g.tick(dt)
		require.False(t, g.oom, "guest OOMed at t=%v (target %d kB, anon %d kB)", now, g.target, g.anon)
		s.Time = now
		d := p.Step(s)
		require.GreaterOrEqual(t, d.TargetKB, cfg.FloorKB())
		g.target = d.TargetKB
		lowest = min(lowest, g.target)
		if i == 59 {
			// Idle for a minute: free memory has gone down to the
			// reserve (within one threshold), not further.
			assert.Less(t, g.target, uint64(maxKB-16*mib), "idle guest gave memory back")
			assert.InDelta(t, float64(cfg.ReserveKB()), float64(s.Mem.MemFree), float64(cfg.ShrinkThresholdKB+mib))
		}
		if i == 70 {
			assert.Greater(t, g.target, beforeSpike, "the allocation got memory back")
		}
	}
	assert.GreaterOrEqual(t, lowest, cfg.FloorKB())
	assert.Less(t, g.target, uint64(maxKB), "after the spike ends memory is given back again")
}
