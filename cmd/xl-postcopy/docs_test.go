package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"
	"github.com/stretchr/testify/require"
)

// Every documented command has a page naming each of its options, and the
// completion offers them: the pages come from the flag definitions.
func TestManPagesAndCompletionCoverEveryFlag(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, writeManPages(dir, "2026-12-03"))
	var comp bytes.Buffer
	require.NoError(t, writeBashCompletion(&comp))
	main, err := os.ReadFile(filepath.Join(dir, "xl-postcopy.1"))
	require.NoError(t, err)
	for _, c := range documented() {
		page, err := os.ReadFile(filepath.Join(dir, manName(c)+".1"))
		require.NoError(t, err, c.name)
		require.Contains(t, string(main), roff(manName(c)), "the main page lists %s", c.name)
		require.Contains(t, string(page), ".SH OPTIONS")
		c.flagSet().VisitAll(func(f *pflag.Flag) {
			if f.Hidden {
				require.NotContains(t, string(page), `\-\-`+roff(f.Name)+"\n", "hidden flag %s documented", f.Name)
				return
			}
			require.Contains(t, string(page), `\-\-`+roff(f.Name), "%s: --%s missing from its man page", c.name, f.Name)
			require.Contains(t, comp.String(), "--"+f.Name, "%s: --%s missing from the completion", c.name, f.Name)
		})
	}
	require.NotContains(t, string(main), "gen-docs", "hidden commands stay out of the pages")
	require.True(t, strings.HasPrefix(string(main), ".TH XL\\-POSTCOPY 1 \"2026-12-03\""))
}
