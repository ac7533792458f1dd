package trace

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestRoundTrip(t *testing.T) {
	in := &Trace{Pages: 100, PageSize: 4096, Interval: 50 * time.Millisecond, Source: "pvh:dom1",
		Accesses: []Access{{0, 0, 5, true}, {50 * time.Millisecond, 1, 99, false}, {50 * time.Millisecond, 1, 7, true}}}
	var b bytes.Buffer
	require.NoError(t, Write(&b, in))
	out, err := Read(&b)
	require.NoError(t, err)
	require.Equal(t, in, out)
}

func TestReadErrors(t *testing.T) {
	head := Magic + "\npages 10\n"
	for _, c := range []struct{ text, want string }{
		{"", "empty"},
		{"hello\n", "not an xl-postcopy v1 trace"},
		{Magic + "\n0 0 1 w\n", "before the pages header"},
		{head + "0 0 10 w\n", "beyond pages"},
		{head + "0 0 1 x\n", "neither r nor w"},
		{head + "5 1 1 w\n4 1 2 w\n", "backwards"},
		{head + "0 0 1\n", "want"},
		{Magic + "\npages 0\n", "out of range"},
		{Magic + "\npage_size 3000\n", "power of two"},
		{Magic + "\n", "no pages header"},
	} {
		_, err := Read(strings.NewReader(c.text))
		require.ErrorContains(t, err, c.want, "input %q", c.text)
	}
}
