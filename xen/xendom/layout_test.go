//go:build cgo

package xendom

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/cgo/xenctrl"
)

// The HVM context parser reads fixed offsets: they must be the C header's.
func TestCPUOffsetsMatchXenHeader(t *testing.T) {
	l := xenctrl.ABILayout()
	require.Equal(t, l.HVMCPUOffsets, CPUOffsets())
	require.Equal(t, uint64(hvmSaveCPU), l.HVMCPUSaveCode)
	require.GreaterOrEqual(t, l.HVMCPUSaveLength, uint64(cpuOffEFER+8))
}
