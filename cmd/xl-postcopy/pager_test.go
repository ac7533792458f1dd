//go:build cgo

package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The self-test itself is tested in xen/xendom (selftest_test.go) against
// the fake hypervisor; the command only parses the gfn list.

func TestParseGFNList(t *testing.T) {
	g, err := parseGFNList("0x10-12,5, 11\n20")
	require.NoError(t, err)
	assert.Equal(t, []uint64{0x5, 0x10, 0x11, 0x12, 0x20}, g)

	f := filepath.Join(t.TempDir(), "gfns")
	require.NoError(t, os.WriteFile(f, []byte("a-b\nc\n"), 0o600))
	g, err = parseGFNList("@" + f)
	require.NoError(t, err)
	assert.Equal(t, []uint64{0xa, 0xb, 0xc}, g)

	for _, bad := range []string{"", "zz", "12-10", "1-", "0-ffffffff", "@/nonexistent/gfns"} {
		_, err := parseGFNList(bad)
		assert.Error(t, err, bad)
	}
}
