package link

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// rateUnits maps a rate suffix to its multiplier in bits per second. The
// spelling follows tc(8) so that a value written on our command line means
// the same as it would in a tc command: "kbit" is 1000 bit/s, "kibit" is 1024
// bit/s and "bps" is bytes per second. The one-letter forms ("1g") are the
// shorthand people type on a command line and mean bits.
var rateUnits = map[string]float64{
	"":      1,
	"bit":   1,
	"k":     1e3,
	"kbit":  1e3,
	"m":     1e6,
	"mbit":  1e6,
	"g":     1e9,
	"gbit":  1e9,
	"t":     1e12,
	"tbit":  1e12,
	"kibit": 1 << 10,
	"mibit": 1 << 20,
	"gibit": 1 << 30,
	"tibit": 1 << 40,
	"bps":   8,
	"kbps":  8e3,
	"mbps":  8e6,
	"gbps":  8e9,
	"tbps":  8e12,
}

// ParseRate parses a link rate such as "1gbit", "100mbit", "500kbit" or "1g"
// and returns it in bits per second. A bare number is bits per second.
// Suffixes are case-insensitive and follow tc(8) (bit, kbit, mbit, gbit,
// tbit, their binary kibit… forms, and bps/kbps/… for bytes per second).
// The rate must be at least 1 bit/s.
func ParseRate(s string) (uint64, error) {
	in := strings.ToLower(strings.TrimSpace(s))
	if in == "" {
		return 0, fmt.Errorf("link rate is empty: give a rate such as 1gbit, 100mbit or 500kbit")
	}
	i := 0
	for i < len(in) && (in[i] >= '0' && in[i] <= '9' || in[i] == '.') {
		i++
	}
	num, unit := in[:i], in[i:]
	mult, ok := rateUnits[unit]
	if !ok {
		return 0, fmt.Errorf("link rate %q: unknown unit %q: use bit, kbit, mbit, gbit (or k, m, g) or bps, kbps, mbps, gbps", s, unit)
	}
	if num == "" {
		return 0, fmt.Errorf("link rate %q: no number before the unit: write e.g. 1gbit", s)
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, fmt.Errorf("link rate %q: %q is not a number: write e.g. 1gbit or 2.5gbit", s, num)
	}
	bps := v * mult
	if bps < 1 {
		return 0, fmt.Errorf("link rate %q is below 1 bit/s: give a positive rate such as 1gbit", s)
	}
	// 2^64 is exactly representable; anything at or above it would wrap.
	if bps >= math.Exp2(64) {
		return 0, fmt.Errorf("link rate %q is too large to represent: give at most a few tbit", s)
	}
	return uint64(math.Round(bps)), nil
}

// formatRate renders bits per second in the plain "<n>bit" form tc accepts,
// so nothing is lost to rounding when the rate is handed to tc.
func formatRate(bps uint64) string {
	return strconv.FormatUint(bps, 10) + "bit"
}
