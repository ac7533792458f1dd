package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// --debug lines are slog records: key=value text by default, one JSON
// object a line with --log-format json; a third format is a usage error.
func TestDebugLogFormats(t *testing.T) {
	var buf bytes.Buffer
	newLogger(&buf, "json", "xen-dest").Debug("new domain 2: 1024 RAM pages")
	var m map[string]any
	require.NoError(t, json.Unmarshal(buf.Bytes(), &m), buf.String())
	require.Equal(t, "DEBUG", m["level"])
	require.Equal(t, "xen-dest", m["who"])
	require.Equal(t, "new domain 2: 1024 RAM pages", m["msg"])

	buf.Reset()
	newLogger(&buf, "text", "migrate-receive").Debug("domain 3 complete: {Loaded:5}")
	// What the lab's scripts look for (scripts/lab/dom0/lab-lib.sh, lab_dest_kv).
	require.Regexp(t, `level=DEBUG msg="domain [0-9]+ complete: .* who=migrate-receive`, strings.TrimSpace(buf.String()))

	defer func() { logFormat = "text" }()
	logFormat = "xml"
	var ue usageError
	require.ErrorAs(t, checkLogFormat(), &ue)
	require.Equal(t, 2, runMain([]string{"lab", "migrate", "--log-format", "xml"}))
}
