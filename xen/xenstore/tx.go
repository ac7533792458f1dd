package xenstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
)

// Tx is a xenstore transaction: reads and writes see a private copy of the
// store, and Commit applies the writes atomically or fails with ErrAgain
// if something else changed the store meanwhile.
type Tx struct {
	c  *Client
	id uint32
}

// Begin starts a transaction.
func (c *Client) Begin(ctx context.Context) (*Tx, error) {
	p, err := c.request(ctx, 0, OpTransactionStart, "", []byte{0})
	if err != nil {
		return nil, err
	}
	parts, err := SplitNul(p)
	if err != nil {
		return nil, fmt.Errorf("xenstore TRANSACTION_START: %w", err)
	}
	if len(parts) != 1 {
		return nil, fmt.Errorf("%w: TRANSACTION_START reply %q is not one id", ErrProtocol, truncate(p))
	}
	id, err := strconv.ParseUint(parts[0], 10, 32)
	if err != nil || id == 0 {
		return nil, fmt.Errorf("%w: TRANSACTION_START reply %q is not a transaction id", ErrProtocol, parts[0])
	}
	return &Tx{c: c, id: uint32(id)}, nil
}

// ID returns the transaction id xenstored allocated.
func (t *Tx) ID() uint32 { return t.id }

// Read is Client.Read inside the transaction.
func (t *Tx) Read(ctx context.Context, path string) (string, error) {
	return t.c.read(ctx, t.id, path)
}

// Write is Client.Write inside the transaction.
func (t *Tx) Write(ctx context.Context, path, value string) error {
	return t.c.write(ctx, t.id, path, value)
}

// Mkdir is Client.Mkdir inside the transaction.
func (t *Tx) Mkdir(ctx context.Context, path string) error {
	return t.c.simple(ctx, t.id, OpMkdir, path)
}

// Remove is Client.Remove inside the transaction.
func (t *Tx) Remove(ctx context.Context, path string) error {
	return t.c.simple(ctx, t.id, OpRm, path)
}

// Directory is Client.Directory inside the transaction.
func (t *Tx) Directory(ctx context.Context, path string) ([]string, error) {
	return t.c.directory(ctx, t.id, path)
}

// SetPerms is Client.SetPerms inside the transaction.
func (t *Tx) SetPerms(ctx context.Context, path string, perms ...Perm) error {
	return t.c.setPerms(ctx, t.id, path, perms)
}

func (t *Tx) end(ctx context.Context, commit bool) error {
	arg := "F"
	if commit {
		arg = "T"
	}
	p, err := t.c.request(ctx, t.id, OpTransactionEnd, "", joinNul(arg))
	if err != nil {
		return err
	}
	return expectOK(OpTransactionEnd, "", p)
}

// Commit ends the transaction applying its writes. errors.Is(err,
// ErrAgain) means another writer got in first: run the transaction again.
func (t *Tx) Commit(ctx context.Context) error { return t.end(ctx, true) }

// Abort ends the transaction discarding its writes.
func (t *Tx) Abort(ctx context.Context) error { return t.end(ctx, false) }

// Update runs fn in a transaction and commits it, retrying the whole
// transaction up to 16 times on a conflict (xenstored's answer to
// concurrent writers is "try again"). fn's error aborts it.
func (c *Client) Update(ctx context.Context, fn func(tx *Tx) error) error {
	const attempts = 16
	for i := 0; ; i++ {
		tx, err := c.Begin(ctx)
		if err != nil {
			return err
		}
		if err := fn(tx); err != nil {
			// The abort's own failure adds nothing useful to fn's error.
			_ = tx.Abort(ctx)
			return err
		}
		err = tx.Commit(ctx)
		if err == nil || !errors.Is(err, ErrAgain) || i == attempts-1 {
			return err
		}
	}
}
