package main

import (
	"fmt"
	"os/exec"
	"strconv"
	"strings"

	"github.com/xl-postcopy/xl-postcopy/xen/xendom"
)

// domainLookup finds a domain by name in xenstore (*xenctrl.Handle).
type domainLookup interface {
	LookupDomain(name string) (uint32, error)
}

// parseDomainArg returns the domid if arg is a number, else ok=false.
func parseDomainArg(arg string) (dom uint32, ok bool, err error) {
	if arg == "" {
		return 0, false, usagef("empty domain")
	}
	if arg[0] < '0' || arg[0] > '9' {
		return 0, false, nil
	}
	v, err := strconv.ParseUint(arg, 10, 16)
	if err != nil || v >= 0x7ff0 { // DOMID_FIRST_RESERVED
		return 0, false, usagef("domain id %q is not a valid domid (0..32751)", arg)
	}
	return uint32(v), true, nil
}

// resolveDomain turns a domid or name into a domid: xenstore first, then
// `xl domid NAME` (which also knows names xenstore has not got yet).
func resolveDomain(h domainLookup, arg string) (uint32, error) {
	dom, ok, err := parseDomainArg(arg)
	if err != nil || ok {
		return dom, err
	}
	dom, xsErr := h.LookupDomain(arg)
	if xsErr == nil {
		return dom, nil
	}
	xlCmd := exec.Command("xl", "domid", arg)
	xlCmd.Env = xendom.CleanEnv()
	out, xlErr := xlCmd.Output()
	if xlErr == nil {
		if v, perr := strconv.ParseUint(strings.TrimSpace(string(out)), 10, 16); perr == nil {
			return uint32(v), nil
		}
	}
	return 0, fmt.Errorf("domain %q not found (xenstore: %v; xl domid: %v)", arg, xsErr, xlErr)
}
