package xenstore_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/xl-postcopy/xl-postcopy/xen/xenstore"
)

func next(t *testing.T, w *xenstore.Watch) xenstore.WatchEvent {
	t.Helper()
	select {
	case ev, ok := <-w.Events():
		require.True(t, ok, "watch channel closed: %v", w.Err())
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("no watch event within 5s")
	}
	return xenstore.WatchEvent{}
}

func TestWatchRelativeAndAbsolute(t *testing.T) {
	s := newServer(t)
	s.AddDomain(3, "g")
	g := dial(t, s, 3)
	dom0 := dial(t, s, 0)
	ctx := ctxT(t)

	w, err := g.Watch(ctx, "data/balloon/request")
	require.NoError(t, err)
	ev := next(t, w)
	assert.Equal(t, "data/balloon/request", ev.Path, "a watch fires once when set")

	wa, err := dom0.Watch(ctx, "/local/domain/3/data/balloon")
	require.NoError(t, err)
	assert.Equal(t, "/local/domain/3/data/balloon", next(t, wa).Path)

	require.NoError(t, dom0.Write(ctx, "/local/domain/3/data/balloon/request", "balloon-now:1"))
	ev = next(t, w)
	assert.Equal(t, "data/balloon/request", ev.Path, "relative watch, relative event path")
	assert.Equal(t, "/local/domain/3/data/balloon/request", next(t, wa).Path, "a change of a child fires the parent's watch")

	// Unrelated paths do not fire.
	require.NoError(t, g.Write(ctx, "data/other", "x"))
	require.NoError(t, g.Write(ctx, "data/balloon/ack", "1 2 ok"))
	assert.Equal(t, "/local/domain/3/data/balloon/ack", next(t, wa).Path)
	select {
	case ev := <-w.Events():
		t.Fatalf("unexpected event %v", ev)
	case <-time.After(50 * time.Millisecond):
	}

	// Removing a parent fires the watch on the child with the watched path.
	require.NoError(t, dom0.Remove(ctx, "/local/domain/3/data/balloon"))
	assert.Equal(t, "data/balloon/request", next(t, w).Path)

	require.NoError(t, w.Close())
	_, open := <-w.Events()
	assert.False(t, open, "Close closes the channel")
	assert.NoError(t, w.Err())
	require.NoError(t, dom0.Write(ctx, "/local/domain/3/data/balloon/request", "again"))
	assert.Equal(t, "/local/domain/3/data/balloon", next(t, wa).Path)
}

func TestWatchQueuesForSlowConsumer(t *testing.T) {
	s := newServer(t)
	c := dial(t, s, 0)
	ctx := ctxT(t)
	w, err := c.Watch(ctx, "/q")
	require.NoError(t, err)
	// Nobody reads events while 200 writes go through: the connection
	// must not stall on the unread channel.
	for i := 0; i < 200; i++ {
		require.NoError(t, c.Write(ctx, fmt.Sprintf("/q/k%d", i), "v"))
	}
	assert.Equal(t, "/q", next(t, w).Path)
	for i := 0; i < 200; i++ {
		assert.Equal(t, fmt.Sprintf("/q/k%d", i), next(t, w).Path)
	}
}

func TestWatchEndsWithConnection(t *testing.T) {
	s := newServer(t)
	c, err := s.Dial(0)
	require.NoError(t, err)
	w, err := c.Watch(ctxT(t), "/x")
	require.NoError(t, err)
	next(t, w)
	s.Close()
	select {
	case _, ok := <-w.Events():
		assert.False(t, ok)
	case <-time.After(5 * time.Second):
		t.Fatal("watch channel not closed after the server went away")
	}
	assert.ErrorIs(t, w.Err(), xenstore.ErrClosed)
	c.Close()
}

func TestWatchRefused(t *testing.T) {
	s := newServer(t)
	c := dial(t, s, 0)
	_, err := c.Watch(ctxT(t), "/bad//path")
	assert.ErrorIs(t, err, xenstore.ErrInvalid)
}

func TestTransactions(t *testing.T) {
	s := newServer(t)
	c := dial(t, s, 0)
	other := dial(t, s, 0)
	ctx := ctxT(t)
	w, err := other.Watch(ctx, "/tx")
	require.NoError(t, err)
	next(t, w)

	tx, err := c.Begin(ctx)
	require.NoError(t, err)
	require.NoError(t, tx.Write(ctx, "/tx/a", "1"))
	require.NoError(t, tx.Write(ctx, "/tx/b", "2"))
	v, err := tx.Read(ctx, "/tx/a")
	require.NoError(t, err)
	assert.Equal(t, "1", v)
	_, err = c.Read(ctx, "/tx/a")
	assert.ErrorIs(t, err, xenstore.ErrNotFound, "uncommitted writes are invisible outside")
	require.NoError(t, tx.Commit(ctx))
	v, err = c.Read(ctx, "/tx/b")
	require.NoError(t, err)
	assert.Equal(t, "2", v)
	assert.Equal(t, "/tx/a", next(t, w).Path, "events fire at commit")
	assert.Equal(t, "/tx/b", next(t, w).Path)

	// A conflicting write makes the commit fail with EAGAIN.
	tx, err = c.Begin(ctx)
	require.NoError(t, err)
	require.NoError(t, tx.Write(ctx, "/tx/a", "mine"))
	require.NoError(t, other.Write(ctx, "/tx/a", "theirs"))
	assert.ErrorIs(t, tx.Commit(ctx), xenstore.ErrAgain)
	v, _ = c.Read(ctx, "/tx/a")
	assert.Equal(t, "theirs", v)

	// Abort discards.
	tx, err = c.Begin(ctx)
	require.NoError(t, err)
	require.NoError(t, tx.Write(ctx, "/tx/a", "aborted"))
	require.NoError(t, tx.Abort(ctx))
	v, _ = c.Read(ctx, "/tx/a")
	assert.Equal(t, "theirs", v)

	// Update retries a conflicting transaction.
	tries := 0
	err = c.Update(ctx, func(tx *xenstore.Tx) error {
		tries++
		cur, err := tx.Read(ctx, "/tx/n")
		if err != nil && !errors.Is(err, xenstore.ErrNotFound) {
			return err
		}
		if tries == 1 {
			require.NoError(t, other.Write(context.Background(), "/tx/n", "5"))
		}
		return tx.Write(ctx, "/tx/n", cur+"+1")
	})
	require.NoError(t, err)
	assert.Equal(t, 2, tries)
	v, _ = c.Read(ctx, "/tx/n")
	assert.Equal(t, "5+1", v, "the retry saw the other writer's value")
}

// Linux's /dev/xen/xenbus synthesizes the OK of WATCH and UNWATCH itself,
// with req_id and tx_id left zero: the client must still match it.
func TestWatchReplyWithZeroReqID(t *testing.T) {
	c := rawServer(t, func(conn net.Conn) {
		for {
			h, p, err := xenstore.ReadMessage(conn)
			if err != nil {
				return
			}
			switch h.Op {
			case xenstore.OpWatch, xenstore.OpUnwatch:
				conn.Write(xenstore.AppendMessage(nil, xenstore.Header{Op: h.Op}, []byte("OK\x00")))
				if h.Op == xenstore.OpWatch {
					// The kernel appends the path and token, like xenstored.
					conn.Write(xenstore.AppendMessage(nil, xenstore.Header{Op: xenstore.OpWatchEvent}, p))
				}
			default:
				conn.Write(xenstore.AppendMessage(nil, xenstore.Header{Op: h.Op, ReqID: h.ReqID, TxID: h.TxID}, []byte("v")))
			}
		}
	})
	ctx := ctxT(t)
	w1, err := c.Watch(ctx, "data/a")
	require.NoError(t, err)
	w2, err := c.Watch(ctx, "data/b")
	require.NoError(t, err)
	assert.Equal(t, "data/a", next(t, w1).Path)
	assert.Equal(t, "data/b", next(t, w2).Path)
	v, err := c.Read(ctx, "data/a")
	require.NoError(t, err)
	assert.Equal(t, "v", v)
	require.NoError(t, w1.Close())
	require.NoError(t, w2.Close())
}
