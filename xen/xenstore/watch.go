package xenstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
)

// WatchEvent is one WATCH_EVENT: Path is the node that changed (relative
// if the watch was set on a relative path), Token identifies the watch.
type WatchEvent struct {
	Path  string
	Token string
}

// Watch is a registered xenstore watch. xenstored fires it once right
// after it is set up and then for every change of its path or a child;
// it may also fire spuriously, so consumers re-read the state they care
// about on each event rather than counting events.
type Watch struct {
	c     *Client
	path  string
	token string
	out   chan WatchEvent

	mu     sync.Mutex
	queue  []WatchEvent
	wake   chan struct{} // cap 1: "queue changed or stopping"
	closed bool
	err    error
	stop   chan struct{}
}

// Watch sets a watch on path (absolute, relative to the domain's home for
// a guest, or a special "@releaseDomain"-style path). Events are queued
// without limit, so a slow consumer never stalls the connection.
func (c *Client) Watch(ctx context.Context, path string) (*Watch, error) {
	if err := checkPath(path); err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.nextTok++
	token := "xlpc-" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatUint(c.nextTok, 10)
	w := &Watch{
		c: c, path: path, token: token,
		out:  make(chan WatchEvent),
		wake: make(chan struct{}, 1),
		stop: make(chan struct{}),
	}
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, fmt.Errorf("xenstore WATCH %s: %w", path, err)
	}
	// Registered before the request: the first event may arrive before
	// the reply.
	c.watches[token] = w
	c.mu.Unlock()
	go w.pump()

	p, err := c.request(ctx, 0, OpWatch, path, joinNul(path, token))
	if err == nil {
		err = expectOK(OpWatch, path, p)
	}
	if err != nil {
		c.mu.Lock()
		delete(c.watches, token)
		c.mu.Unlock()
		w.finishWith(err)
		return nil, err
	}
	return w, nil
}

// WatchDomains fires when any domain's state changes: xenstored's
// @releaseDomain watch, which it fires when a domain shuts down (a suspend
// is a shutdown), dies or is destroyed. The channel holds at most one
// pending signal (consumers re-read the state they care about); stop
// removes the watch. It is how a toolstack waits for a guest's suspend
// without polling the hypervisor.
func (c *Client) WatchDomains(ctx context.Context) (<-chan struct{}, func(), error) {
	w, err := c.Watch(ctx, "@releaseDomain")
	if err != nil {
		return nil, nil, err
	}
	ch := make(chan struct{}, 1)
	go func() {
		for range w.Events() {
			select {
			case ch <- struct{}{}:
			default:
			}
		}
	}()
	return ch, func() { _ = w.Close() }, nil
}

// Events returns the channel of events. It is closed after Close or when
// the connection ends; Err then says why.
func (w *Watch) Events() <-chan WatchEvent { return w.out }

// Path returns the watched path as given to Client.Watch.
func (w *Watch) Path() string { return w.path }

// Err returns why the event channel was closed, or nil while it is open
// or after a plain Close.
func (w *Watch) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// Close removes the watch from xenstored and closes the event channel.
// Events still queued are discarded.
func (w *Watch) Close() error {
	c := w.c
	c.mu.Lock()
	_, live := c.watches[w.token]
	delete(c.watches, w.token)
	c.mu.Unlock()
	w.finishWith(nil)
	if !live {
		return nil
	}
	p, err := c.request(context.Background(), 0, OpUnwatch, w.path, joinNul(w.path, w.token))
	if err != nil {
		if errors.Is(err, ErrClosed) {
			return nil
		}
		return err
	}
	return expectOK(OpUnwatch, w.path, p)
}

func (w *Watch) push(ev WatchEvent) {
	w.mu.Lock()
	if !w.closed {
		w.queue = append(w.queue, ev)
	}
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// finish ends delivery because the connection ended.
func (w *Watch) finish() { w.finishWith(w.c.err) }

func (w *Watch) finishWith(err error) {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	w.closed = true
	w.err = err
	w.queue = nil
	close(w.stop)
	w.mu.Unlock()
}

func (w *Watch) pump() {
	defer close(w.out)
	for {
		w.mu.Lock()
		if w.closed {
			w.mu.Unlock()
			return
		}
		if len(w.queue) == 0 {
			w.mu.Unlock()
			select {
			case <-w.wake:
				continue
			case <-w.stop:
				return
			}
		}
		ev := w.queue[0]
		w.queue = w.queue[1:]
		w.mu.Unlock()
		select {
		case w.out <- ev:
		case <-w.stop:
			return
		}
	}
}
