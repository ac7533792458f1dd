package xendom

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The HVM save context (xc_domain_hvm_getcontext) is a sequence of records,
// each a descriptor {typecode u16, instance u16, length u32} followed by
// length bytes, ended by a record of type 0. The engine carries it opaque;
// the source only looks inside for each vCPU's paging registers, to walk
// its page tables.
const (
	hvmSaveEnd = 0
	hvmSaveCPU = 2
	// Offsets in struct hvm_hw_cpu (public/arch-x86/hvm/save.h), checked
	// against the C header by cgo/xenctrl's layout test.
	cpuOffRSP      = 568
	cpuOffRIP      = 640
	cpuOffCR0      = 656
	cpuOffCR3      = 672
	cpuOffCR4      = 680
	cpuOffGSBase   = 840
	cpuOffShadowGS = 944
	cpuOffEFER     = 992
)

// CPURegs are the registers of one vCPU the source looks at.
type CPURegs struct {
	VCPU                uint16
	CR0, CR3, CR4, EFER uint64
	RIP, RSP            uint64
	// GSBase and ShadowGS: in a 64-bit kernel one of them is the
	// per-CPU area's base (GSBase while the vCPU runs kernel code).
	GSBase, ShadowGS uint64
}

// ParseCPUs returns the paging registers of every vCPU in an HVM context.
func ParseCPUs(ctx []byte) ([]CPURegs, error) {
	var out []CPURegs
	for off := 0; ; {
		if len(ctx)-off < 8 {
			return nil, fmt.Errorf("hvm context: truncated descriptor at offset %d of %d", off, len(ctx))
		}
		typ := binary.LittleEndian.Uint16(ctx[off:])
		inst := binary.LittleEndian.Uint16(ctx[off+2:])
		n := int(binary.LittleEndian.Uint32(ctx[off+4:]))
		off += 8
		if n < 0 || n > len(ctx)-off {
			return nil, fmt.Errorf("hvm context: record type %d of %d bytes overruns the %d-byte context", typ, n, len(ctx))
		}
		body := ctx[off : off+n]
		off += n
		switch typ {
		case hvmSaveEnd:
			if len(out) == 0 {
				return nil, errors.New("hvm context: no CPU record")
			}
			return out, nil
		case hvmSaveCPU:
			if n < cpuOffEFER+8 {
				return nil, fmt.Errorf("hvm context: CPU record of vcpu %d is %d bytes, want at least %d", inst, n, cpuOffEFER+8)
			}
			out = append(out, CPURegs{
				VCPU:     inst,
				CR0:      binary.LittleEndian.Uint64(body[cpuOffCR0:]),
				CR3:      binary.LittleEndian.Uint64(body[cpuOffCR3:]),
				CR4:      binary.LittleEndian.Uint64(body[cpuOffCR4:]),
				EFER:     binary.LittleEndian.Uint64(body[cpuOffEFER:]),
				RIP:      binary.LittleEndian.Uint64(body[cpuOffRIP:]),
				RSP:      binary.LittleEndian.Uint64(body[cpuOffRSP:]),
				GSBase:   binary.LittleEndian.Uint64(body[cpuOffGSBase:]),
				ShadowGS: binary.LittleEndian.Uint64(body[cpuOffShadowGS:]),
			})
		}
	}
}

// CPUOffsets lists the offsets ParseCPUs reads, in the order rsp, rip,
// cr0, cr3, cr4, gs_base, shadow_gs, msr_efer, so that a test can hold
// them against the C header's (cgo/xenctrl.ABILayout).
func CPUOffsets() [8]uint64 {
	return [8]uint64{cpuOffRSP, cpuOffRIP, cpuOffCR0, cpuOffCR3, cpuOffCR4, cpuOffGSBase, cpuOffShadowGS, cpuOffEFER}
}
