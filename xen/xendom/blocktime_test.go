package xendom

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Blocktime is the time all vCPUs were blocked at once, not the sum of
// their waits: vCPU 0 waits 0..30 ms, vCPU 1 20..50 ms: 10 ms all
// blocked, 30 ms each.
func TestBlocktimeIsAllVCPUsBlocked(t *testing.T) {
	var now time.Time
	at := func(ms int) { now = time.Unix(0, 0).Add(time.Duration(ms) * time.Millisecond) }
	b := newBlocktime(2, func() time.Time { return now })
	at(0)
	b.block(0)
	at(5)
	b.block(0) // a second request of a paused vCPU changes nothing
	at(20)
	b.block(1)
	at(30)
	b.unblock(0)
	at(50)
	b.unblock(1)
	b.unblock(1) // an answer for a vCPU not blocked changes nothing
	all, per := b.totals()
	require.Equal(t, 10*time.Millisecond, all)
	require.Equal(t, []time.Duration{30 * time.Millisecond, 30 * time.Millisecond}, per)

	// One vCPU of two blocked is no blocktime; a vCPU id beyond the
	// domain is ignored.
	b = newBlocktime(2, func() time.Time { return now })
	b.block(0)
	b.block(7)
	at(80)
	all, per = b.totals()
	require.Zero(t, all)
	require.Equal(t, 30*time.Millisecond, per[0], "still blocked: counted up to now")
}
