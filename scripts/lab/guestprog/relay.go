package main

import (
	"fmt"
	"io"
	"os"
)

// relay copies in to out in large blocks and writes the number of bytes copied to
// countFile when in ends (or out fails). The lab puts it in the middle of a local
// `xl migrate` to measure the migration stream: busybox dd does not print byte counts
// and busybox tee moves 1 KiB per system call, which under TCG slows the stream tenfold.
func relay(in io.Reader, out io.Writer, countFile string) error {
	n, err := io.CopyBuffer(out, in, make([]byte, 1<<20))
	if werr := os.WriteFile(countFile, fmt.Appendf(nil, "%d\n", n), 0o644); werr != nil {
		return fmt.Errorf("writing byte count to %s: %w", countFile, werr)
	}
	if err != nil {
		return fmt.Errorf("relaying after %d bytes: %w", n, err)
	}
	return nil
}
