package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// --log-format json gives one JSON object a line, with the level, the
// message and the daemon's name; text gives key=value; others are refused.
func TestLogFormats(t *testing.T) {
	var buf bytes.Buffer
	l, err := newLogger(&buf, "json")
	require.NoError(t, err)
	l.Warn("reading memory/target: EIO", "to_kb", 1024)
	var m map[string]any
	require.NoError(t, json.Unmarshal(buf.Bytes(), &m), buf.String())
	require.Equal(t, "WARN", m["level"])
	require.Equal(t, "guest-balloon", m["daemon"])
	require.Equal(t, "reading memory/target: EIO", m["msg"])
	require.EqualValues(t, 1024, m["to_kb"])

	buf.Reset()
	l, err = newLogger(&buf, "text")
	require.NoError(t, err)
	l.Info("shrink 1 -> 2 kB")
	require.True(t, strings.Contains(buf.String(), `level=INFO msg="shrink 1 -> 2 kB" daemon=guest-balloon`), buf.String())

	_, err = newLogger(&buf, "xml")
	require.ErrorContains(t, err, "want text or json")
}
