package xenstore

import (
	"bytes"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMessageRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	h := Header{Op: OpWrite, ReqID: 0x01020304, TxID: 9}
	require.NoError(t, WriteMessage(&buf, h, []byte("/a\x00v")))
	// The header is four little-endian u32s.
	assert.Equal(t, []byte{11, 0, 0, 0, 4, 3, 2, 1, 9, 0, 0, 0, 4, 0, 0, 0}, buf.Bytes()[:HeaderSize])
	got, p, err := ReadMessage(&buf)
	require.NoError(t, err)
	h.Len = 4
	assert.Equal(t, h, got)
	assert.Equal(t, "/a\x00v", string(p))
}

func TestReadMessageErrors(t *testing.T) {
	_, _, err := ReadMessage(bytes.NewReader(AppendMessage(nil, Header{Op: OpRead}, []byte("abc"))[:17]))
	assert.ErrorContains(t, err, "unexpected EOF")
	big := AppendMessage(nil, Header{Op: OpRead}, nil)
	big[13] = 0x10 // 4096
	big[12] = 1    // 4097
	_, _, err = ReadMessage(bytes.NewReader(big))
	assert.ErrorIs(t, err, ErrProtocol)
	assert.Error(t, WriteMessage(&bytes.Buffer{}, Header{}, make([]byte, PayloadMax+1)))
}

func TestSplitNul(t *testing.T) {
	parts, err := SplitNul([]byte("a\x00\x00bc\x00"))
	require.NoError(t, err)
	assert.Equal(t, []string{"a", "", "bc"}, parts)
	parts, err = SplitNul(nil)
	require.NoError(t, err)
	assert.Empty(t, parts)
	_, err = SplitNul([]byte("a\x00b"))
	assert.ErrorIs(t, err, ErrProtocol)
}

func TestErrnoNames(t *testing.T) {
	e := parseError(OpRead, "/x", []byte("EACCES\x00"))
	assert.ErrorIs(t, e, ErrPermission)
	assert.Equal(t, "EACCES", ErrnoName(e))
	assert.Equal(t, "ENOENT", ErrnoName(ErrNotFound))
	assert.True(t, errors.Is(parseError(OpWrite, "", []byte("EQUOTA")), ErrQuota), "oxenstored's EQUOTA, without a NUL")
	assert.ErrorIs(t, parseError(OpRead, "/x", []byte("E")), ErrProtocol)
	assert.ErrorIs(t, parseError(OpRead, "/x", []byte("enoent\x00")), ErrProtocol)
}

func TestParsePerm(t *testing.T) {
	p, err := ParsePerm("b12")
	require.NoError(t, err)
	assert.Equal(t, Perm{Domid: 12, Access: AccessReadWrite}, p)
	assert.Equal(t, "b12", p.String())
	for _, bad := range []string{"", "b", "x1", "r-1", "r70000", "rq"} {
		_, err := ParsePerm(bad)
		assert.Error(t, err, bad)
	}
}

func FuzzReadMessage(f *testing.F) {
	f.Add(AppendMessage(nil, Header{Op: OpRead, ReqID: 1}, []byte("/a\x00")))
	f.Add([]byte{16, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, p, err := ReadMessage(bytes.NewReader(b))
		if err != nil {
			return
		}
		if int(h.Len) != len(p) || len(p) > PayloadMax {
			t.Fatalf("header len %d, payload %d", h.Len, len(p))
		}
		again := AppendMessage(nil, h, p)
		if !bytes.Equal(again, b[:HeaderSize+len(p)]) {
			t.Fatalf("re-encoding differs")
		}
	})
}
