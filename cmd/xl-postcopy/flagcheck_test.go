package main

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCheckSize(t *testing.T) {
	good := []struct {
		in   string
		want uint64
	}{
		{"256M", 256 << 20},
		{"256", 256 << 20}, // plain number = MiB, as xl
		{"1G", 1 << 30},
		{"1.5GiB", 3 << 29},
		{"64K", 64 << 10},
		{" 8MB ", 8 << 20},
	}
	for _, tc := range good {
		v, err := checkSize("mem", tc.in, 64<<10, 2<<30, true, "")
		if assert.NoError(t, err, tc.in) {
			assert.Equal(t, tc.want, v, tc.in)
		}
	}
	bad := []struct{ in, msg string }{
		{"NaN", `--mem "NaN": not a size (a plain number with an optional K/M/G/T suffix, e.g. 256M): want 64K to 2G; WHY`},
		{"nan", `--mem "nan": not a size`},
		{"Inf", `--mem "Inf": not a size`},
		{"-1", `--mem "-1": not a size`},
		{"1e3", `--mem "1e3": not a size`},
		{"0x10", `--mem "0x10": not a size`},
		{"", `--mem "": not a size`},
		{"8 M", `--mem "8 M": not a size`},
		{"3G", "--mem 3G: too large: want 64K to 2G; WHY"},
		{"99999999T", "--mem 99999999T: too large: want 64K to 2G; WHY"}, // beyond parseSize's ceiling
		{"32K", "--mem 32K: too small: want 64K to 2G; WHY"},
		{"100.5K", "--mem 100.5K: 102912 bytes is not a whole number of 4 KiB pages: use 100K or 104K"},
	}
	for _, tc := range bad {
		_, err := checkSize("mem", tc.in, 64<<10, 2<<30, true, "WHY")
		require.Error(t, err, tc.in)
		assert.True(t, errors.As(err, new(usageError)), "%q: a usage error (exit 2)", tc.in)
		assert.Contains(t, err.Error(), tc.msg)
	}
	// Without pages a size need not be whole pages (--window is bytes).
	v, err := checkSize("window", "100.5K", 4<<10, 1<<30, false, "")
	require.NoError(t, err)
	assert.Equal(t, uint64(102912), v)
}

func TestCheckCountAndDuration(t *testing.T) {
	require.NoError(t, checkCount("max-rounds", 5, 1, 100))
	err := checkCount("max-rounds", -3, 1, 100)
	require.EqualError(t, err, "--max-rounds -3: too small: want 1 to 100")
	assert.True(t, errors.As(err, new(usageError)))
	require.EqualError(t, checkCount("pivots", 2000, 1, 1024), "--pivots 2000: too large: want 1 to 1024")
	require.NoError(t, checkDuration("warmup", time.Second, time.Millisecond, time.Hour))
	require.EqualError(t, checkDuration("warmup", -time.Second, time.Millisecond, time.Hour), "--warmup -1s: too small: want 1ms to 1h0m0s")
	require.EqualError(t, checkDuration("after", 2*time.Hour, time.Millisecond, time.Hour), "--after 2h0m0s: too large: want 1ms to 1h0m0s")
}

func TestShowSize(t *testing.T) {
	for v, want := range map[uint64]string{
		0:                       "0",
		4 << 10:                 "4K",
		65532 << 10:             "65532K",
		384 << 20:               "384M",
		1 << 30:                 "1G",
		1 << 40:                 "1T",
		10551 << 20:             "10551M (10.30 GiB)",
		1000:                    "1000 bytes",
		(1 << 30) + (512 << 10): "1049088K (1.00 GiB)",
	} {
		assert.Equal(t, want, showSize(v), "%d", v)
		if v != 0 && !strings.HasSuffix(want, "bytes") {
			got, err := parseSize(strings.Fields(want)[0])
			require.NoError(t, err)
			assert.Equal(t, v, got, "%s types back as the same size", want)
		}
	}
}

func TestParseMemAvailable(t *testing.T) {
	const meminfo = "MemTotal:       24683584 kB\nMemFree:         1000000 kB\nMemAvailable:   21434636 kB\nBuffers:  1 kB\n"
	v, err := parseMemAvailable(strings.NewReader(meminfo))
	require.NoError(t, err)
	assert.Equal(t, uint64(21434636)<<10, v)
	_, err = parseMemAvailable(strings.NewReader("MemTotal: 1 kB\n"))
	assert.EqualError(t, err, "/proc/meminfo has no MemAvailable line")
	_, err = parseMemAvailable(strings.NewReader("MemAvailable: lots\n"))
	assert.ErrorContains(t, err, "bad MemAvailable line")
}

// The lab's memory limit is half of what the host has beyond headroom,
// since the source and the destination each hold the guest memory.
func TestMaxLabMem(t *testing.T) {
	t.Cleanup(func() { hostMemory = readHostMemory })
	hostMemory = func() (uint64, string, error) { return 10 << 30, "MemAvailable in /proc/meminfo", nil }
	limit, why := maxLabMem()
	assert.Equal(t, uint64(9<<30)/2, limit, "(10 GiB - 1 GiB headroom) / 2")
	assert.Equal(t, "4608M is the most this host can give: the lab needs about 2× --mem, because the source and the destination each hold a full copy of the guest memory, "+
		"and this host has 10.00 GiB available (MemAvailable in /proc/meminfo), less 1.00 GiB of headroom", why)

	hostMemory = func() (uint64, string, error) { return 200 << 20, "MemAvailable in /proc/meminfo", nil }
	limit, _ = maxLabMem()
	assert.Zero(t, limit, "less than the headroom: nothing for the lab")
	_, err := checkSize("mem", "64K", labMinPages*labPageSize, limit, true, "")
	assert.EqualError(t, err, "--mem 64K: too large: want 64K to 0")

	hostMemory = func() (uint64, string, error) { return 0, "", errors.New("no /proc") }
	limit, why = maxLabMem()
	assert.Equal(t, uint64(1<<46), limit, "unknown: parseSize's ceiling")
	assert.Contains(t, why, "this host's free memory is unknown: no /proc")

	// The real host: some memory, and a reason that names its source.
	hostMemory = readHostMemory
	avail, from, err := readHostMemory()
	require.NoError(t, err)
	assert.Positive(t, avail)
	assert.NotEmpty(t, from)
}

func TestCheckPagingOps(t *testing.T) {
	for _, ok := range []string{"auto", "per-gfn"} {
		require.NoError(t, checkPagingOps("paging-ops", ok))
	}
	for _, bad := range []string{"", "batched", "PER-GFN", "libxc"} {
		err := checkPagingOps("dest-paging-ops", bad)
		require.Error(t, err, bad)
		assert.True(t, errors.As(err, new(usageError)), "%q: a usage error (exit 2)", bad)
		assert.Contains(t, err.Error(), "--dest-paging-ops")
		assert.Contains(t, err.Error(), "want auto or per-gfn")
	}
}
