package ssh

import (
	"context"
	"io/fs"
	"sync"

	"github.com/kpfree/kpfree/internal/inventory"
)

// Dialer connects to many hosts, sharing one connection per bastion. It is
// safe for concurrent use.
type Dialer struct{ d *dialer }

// NewDialer returns a Dialer with opts.
func NewDialer(opts Options) *Dialer { return &Dialer{d: newDialer(opts)} }

// Dial connects to one host (see Dial).
func (d *Dialer) Dial(ctx context.Context, t inventory.Target) (*Client, error) {
	return d.d.dial(ctx, t)
}

// Lazy returns an Executor for t that connects on first use. A fan-out over
// lazy executors connects and works on each host in one go, so a slow or
// dead host delays nobody else. The connection error, if any, is returned
// by every call.
func (d *Dialer) Lazy(t inventory.Target) *LazyClient {
	return &LazyClient{d: d, t: t}
}

// LazyClient is an Executor that dials on first use.
type LazyClient struct {
	d    *Dialer
	t    inventory.Target
	once sync.Once
	c    *Client
	err  error
}

var _ Executor = (*LazyClient)(nil)

func (l *LazyClient) Name() string { return targetName(l.t) }

// Connect dials now if not done yet, and returns the connection's error.
func (l *LazyClient) Connect(ctx context.Context) (*Client, error) {
	l.once.Do(func() { l.c, l.err = l.d.Dial(ctx, l.t) })
	return l.c, l.err
}

func (l *LazyClient) Run(ctx context.Context, cmd string) (Result, error) {
	c, err := l.Connect(ctx)
	if err != nil {
		return Result{}, err
	}
	return c.Run(ctx, cmd)
}

func (l *LazyClient) Upload(ctx context.Context, data []byte, path string, mode fs.FileMode) error {
	c, err := l.Connect(ctx)
	if err != nil {
		return err
	}
	return c.Upload(ctx, data, path, mode)
}

// Close closes the connection if one was made.
func (l *LazyClient) Close() error {
	l.once.Do(func() { l.err = errClosedBeforeUse })
	if l.c != nil {
		return l.c.Close()
	}
	return nil
}

var errClosedBeforeUse = errorString("ssh: closed before use")

type errorString string

func (e errorString) Error() string { return string(e) }
