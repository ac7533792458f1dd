package dsb

import (
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A 128 MiB Debian guest, trimmed (shape of a 6.1 kernel's file).
const guestMeminfo = `MemTotal:         104300 kB
MemFree:           61017 kB
MemAvailable:      81517 kB
Buffers:            1024 kB
Cached:            22000 kB
SwapCached:            0 kB
Active:            18000 kB
Inactive:          12000 kB
AnonPages:          9000 kB
Shmem:              1500 kB
Slab:              14000 kB
SReclaimable:       5000 kB
PageTables:          600 kB
HugePages_Total:       0
HugePages_Free:        0
Hugepagesize:       2048 kB
`

func TestParseMeminfo(t *testing.T) {
	m, err := ParseMeminfo(guestMeminfo)
	require.NoError(t, err)
	assert.Equal(t, uint64(104300), m.MemTotal)
	assert.Equal(t, uint64(61017), m.MemFree)
	assert.Equal(t, uint64(81517), m.MemAvailable)
	assert.Equal(t, uint64(22000), m.Cached)
	assert.Equal(t, uint64(5000), m.SReclaimable)
	assert.Equal(t, uint64(600), m.PageTables)
	assert.False(t, m.AvailableEstimated)
	assert.Equal(t, uint64(0), m.Fields["HugePages_Total"], "unit-less lines are kept")
	assert.Equal(t, uint64(2048), m.Fields["Hugepagesize"])

	host, err := os.ReadFile("testdata/meminfo-host.txt")
	require.NoError(t, err)
	m, err = ParseMeminfo(string(host))
	require.NoError(t, err, "a real /proc/meminfo parses")
	assert.NotZero(t, m.MemTotal)
	assert.LessOrEqual(t, m.MemAvailable, m.MemTotal)
}

func TestParseMeminfoWithoutAvailable(t *testing.T) {
	old := strings.Replace(guestMeminfo, "MemAvailable:      81517 kB\n", "", 1)
	m, err := ParseMeminfo(old)
	require.NoError(t, err)
	assert.True(t, m.AvailableEstimated)
	// free + cached + buffers + reclaimable slab - shmem
	assert.Equal(t, uint64(61017+22000+1024+5000-1500), m.MemAvailable)
}

func TestParseMeminfoErrors(t *testing.T) {
	for name, text := range map[string]string{
		"no MemFree":   "MemTotal: 100 kB\n",
		"no MemTotal":  "MemFree: 100 kB\n",
		"bad number":   "MemTotal: 100 kB\nMemFree: 1x0 kB\n",
		"bad unit":     "MemTotal: 100 MB\nMemFree: 10 kB\n",
		"no colon":     "MemTotal 100 kB\nMemFree: 10 kB\n",
		"free > total": "MemTotal: 100 kB\nMemFree: 200 kB\n",
		"empty value":  "MemTotal:\nMemFree: 1 kB\n",
	} {
		_, err := ParseMeminfo(text)
		assert.Error(t, err, name)
	}
}

func TestParsePSI(t *testing.T) {
	p, err := ParsePSI("some avg10=1.50 avg60=0.30 avg300=0.05 total=123456\nfull avg10=0.25 avg60=0.01 avg300=0.00 total=6789\n")
	require.NoError(t, err)
	assert.True(t, p.Valid)
	assert.Equal(t, PSILine{1.5, 0.3, 0.05, 123456}, p.Some)
	assert.Equal(t, PSILine{0.25, 0.01, 0, 6789}, p.Full)

	host, err := os.ReadFile("testdata/psi-host.txt")
	require.NoError(t, err)
	_, err = ParsePSI(string(host))
	require.NoError(t, err, "a real /proc/pressure/memory parses")

	for name, text := range map[string]string{
		"empty":      "",
		"only full":  "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
		"bad total":  "some avg10=0.00 avg60=0.00 avg300=0.00 total=-1\n",
		"bad avg":    "some avg10=x avg60=0.00 avg300=0.00 total=0\n",
		"missing":    "some avg10=0.00 total=0\n",
		"no equals":  "some avg10 avg60=0.00 avg300=0.00 total=0\n",
		"other line": "most avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
	} {
		_, err := ParsePSI(text)
		assert.Error(t, err, name)
	}
}
