package xendom

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// An xl create killed by its time limit leaves the half-made domain
// behind under its name: CreatePaused destroys it before it fails.
func TestCreateKilledByTheLimitDestroysTheHalfMadeDomain(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "log")
	script := `#!/bin/sh
echo "$@" >>` + log + `
case "$1" in
create) exec sleep 30 ;;
domid) echo 17 ;;
destroy) exit 0 ;;
esac
`
	xl := filepath.Join(dir, "xl")
	require.NoError(t, os.WriteFile(xl, []byte(script), 0o755))
	start := time.Now()
	_, err := XL{Path: xl, Timeout: 300 * time.Millisecond}.CreatePaused("/dev/null", "vm1--incoming")
	require.Error(t, err)
	require.Less(t, time.Since(start), 20*time.Second, "the limit did not stop xl create")
	require.ErrorContains(t, err, "half-made domain vm1--incoming was destroyed")
	b, err := os.ReadFile(log)
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	require.Equal(t, []string{`create -p /dev/null name="vm1--incoming"`, "domid vm1--incoming", "destroy 17"}, lines)
}
