package ssh

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	xssh "golang.org/x/crypto/ssh"

	"github.com/kpfree/kpfree/internal/inventory"
)

// Defaults used when a Target or Options leaves a setting at zero.
const (
	DefaultConnectTimeout = 10 * time.Second
	DefaultRetries        = 2 // so 3 attempts
	DefaultRetryBackoff   = 500 * time.Millisecond
	MaxRetryBackoff       = 5 * time.Second
	DefaultConcurrency    = 30
	// KeepaliveInterval is how often an idle connection is probed; a probe
	// unanswered for as long closes it, so commands fail instead of hanging.
	KeepaliveInterval = 30 * time.Second
	// maxSessions stays below OpenSSH's default MaxSessions (10) so that
	// concurrent Runs on one Client queue instead of being refused.
	maxSessions = 8
)

// Options tune connecting; the zero value is ready to use.
type Options struct {
	// Logger receives per-host detail lines; nil means quiet.
	Logger Logger
	// Retries is how many times a failed connection attempt is repeated
	// (refused, SSH handshake timed out or dropped). A TCP connect that
	// times out or finds no route is not retried: a dead host costs one
	// ConnectTimeout.
	// 0 means DefaultRetries, negative means no retry. Authentication,
	// host key and identity file failures are never retried.
	Retries int
	// RetryBackoff is the pause before the first retry, doubled before each
	// next one up to MaxRetryBackoff; 0 means DefaultRetryBackoff. A
	// connection thus gives up after at most (Retries+1) x ConnectTimeout
	// plus the pauses, or when ctx ends.
	RetryBackoff time.Duration
	// Concurrency bounds DialAll's parallel connections; 0 means
	// DefaultConcurrency.
	Concurrency int
}

func (o Options) retries() int {
	switch {
	case o.Retries < 0:
		return 0
	case o.Retries == 0:
		return DefaultRetries
	}
	return o.Retries
}

func (o Options) backoff() time.Duration {
	if o.RetryBackoff > 0 {
		return o.RetryBackoff
	}
	return DefaultRetryBackoff
}

// ConnectError is a connection that could not be established after every
// attempt (or before ctx ended).
type ConnectError struct {
	Host     string
	Addr     string
	Attempts int
	Err      error
}

func (e *ConnectError) Error() string {
	n := "1 attempt"
	if e.Attempts != 1 {
		n = fmt.Sprintf("%d attempts", e.Attempts)
	}
	return fmt.Sprintf("host %s: cannot connect to %s (%s): %v", e.Host, e.Addr, n, e.Err)
}

func (e *ConnectError) Unwrap() error { return e.Err }

// retryable marks an attempt's error as worth another attempt; final marks
// a failure to connect that is not (ctx ended, unknown host name). connect
// turns both into a *ConnectError.
type (
	retryable struct{ err error }
	final     struct{ err error }
)

func (r retryable) Error() string { return r.err.Error() }
func (r retryable) Unwrap() error { return r.err }
func (f final) Error() string     { return f.err.Error() }
func (f final) Unwrap() error     { return f.err }

// expandHome turns a leading ~/ into the user's home directory.
func expandHome(p string) string {
	if p == "~" || strings.HasPrefix(p, "~/") {
		if home, err := os.UserHomeDir(); err == nil {
			return filepath.Join(home, p[1:])
		}
	}
	return p
}

// normalizeTarget fills the defaults: port 22, ~/.ssh/known_hosts,
// DefaultConnectTimeout, the name from the address; a bastion inherits the
// host's known_hosts file and connect timeout when it has none.
func normalizeTarget(t inventory.Target) (inventory.Target, error) {
	if t.Address == "" {
		return t, fmt.Errorf("host %s: no address", t.Name)
	}
	if t.Name == "" {
		t.Name = t.Address
	}
	if t.User == "" {
		return t, fmt.Errorf("host %s: no SSH user", t.Name)
	}
	if t.Port == 0 {
		t.Port = 22
	}
	if t.ConnectTimeout <= 0 {
		t.ConnectTimeout = DefaultConnectTimeout
	}
	t.IdentityFile = expandHome(t.IdentityFile)
	t.KnownHostsFile = expandHome(t.KnownHostsFile)
	if t.KnownHostsFile == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return t, fmt.Errorf("host %s: no knownHostsFile and no home directory: %w", t.Name, err)
		}
		t.KnownHostsFile = filepath.Join(home, ".ssh", "known_hosts")
	}
	if t.Bastion != nil {
		b := *t.Bastion
		if b.Name == "" {
			b.Name = "bastion " + b.Address
		}
		if b.KnownHostsFile == "" {
			b.KnownHostsFile = t.KnownHostsFile
		}
		if b.ConnectTimeout <= 0 {
			b.ConnectTimeout = t.ConnectTimeout
		}
		nb, err := normalizeTarget(b)
		if err != nil {
			return t, fmt.Errorf("host %s: bastion: %w", t.Name, err)
		}
		t.Bastion = &nb
	}
	return t, nil
}

func hostPort(t inventory.Target) string {
	return net.JoinHostPort(t.Address, strconv.Itoa(t.Port))
}

// dialer opens connections. Within one dialer (one DialAll), hosts behind
// the same bastion share a single connection to it: their tunnels are
// channels of that connection, which keeps a fan-out over 50 hosts clear of
// the bastion sshd's MaxStartups limit.
type dialer struct {
	opts     Options
	mu       sync.Mutex
	bastions map[string]*sharedConn
}

type sharedConn struct {
	ready   chan struct{}
	client  *xssh.Client
	release func()
	err     error
	refs    int
}

func newDialer(opts Options) *dialer {
	return &dialer{opts: opts, bastions: map[string]*sharedConn{}}
}

// Dial connects to one host: through its bastion if it has one, verifying
// every host key against known_hosts, retrying only failures to connect.
func Dial(ctx context.Context, t inventory.Target, opts Options) (*Client, error) {
	return newDialer(opts).dial(ctx, t)
}

func (d *dialer) dial(ctx context.Context, t inventory.Target) (*Client, error) {
	t, err := normalizeTarget(t)
	if err != nil {
		return nil, err
	}
	conn, release, err := d.sshConn(ctx, t)
	if err != nil {
		return nil, err
	}
	d.opts.Logger.logf(t.Name, "connected to %s as %s", hostPort(t), t.User)
	stop := make(chan struct{})
	go keepalive(conn, KeepaliveInterval, stop, func(err error) {
		d.opts.Logger.logf(t.Name, "connection lost: %v", err)
	})
	return &Client{
		name:       t.Name,
		user:       t.User,
		addr:       hostPort(t),
		conn:       conn,
		release:    func() { close(stop); release() },
		log:        d.opts.Logger,
		cmdTimeout: t.CommandTimeout,
		sessions:   make(chan struct{}, maxSessions),
	}, nil
}

// keepalive sends an OpenSSH keepalive request every interval until stop is
// closed; when one fails or goes unanswered for an interval, it closes conn.
func keepalive(conn *xssh.Client, interval time.Duration, stop <-chan struct{}, lost func(error)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		reply := make(chan error, 1)
		go func() {
			_, _, err := conn.SendRequest("keepalive@openssh.com", true, nil)
			reply <- err
		}()
		var err error
		select {
		case <-stop:
			return
		case err = <-reply:
		case <-time.After(interval):
			err = fmt.Errorf("no keepalive reply in %s", interval)
		}
		if err != nil {
			lost(err)
			conn.Close()
			return
		}
	}
}

// sshConn opens the SSH connection to t (normalized), through its bastion if
// any. release closes it and drops its share of the bastion.
func (d *dialer) sshConn(ctx context.Context, t inventory.Target) (*xssh.Client, func(), error) {
	var via *xssh.Client
	releaseVia := func() {}
	if t.Bastion != nil {
		var err error
		via, releaseVia, err = d.bastion(ctx, *t.Bastion)
		if err != nil {
			return nil, nil, fmt.Errorf("host %s: through %w", t.Name, err)
		}
	}
	c, err := d.connect(ctx, t, via)
	if err != nil {
		releaseVia()
		return nil, nil, err
	}
	return c, func() { c.Close(); releaseVia() }, nil
}

func bastionKey(b inventory.Target) string {
	k := fmt.Sprintf("%s@%s|%s|%v|%s|%v", b.User, hostPort(b), b.IdentityFile, b.UseAgent, b.KnownHostsFile, b.AcceptNewHostKeys)
	if b.Bastion != nil {
		k += ">" + bastionKey(*b.Bastion)
	}
	return k
}

// bastion returns a (shared) connection to b and the function that releases
// this user's share of it.
func (d *dialer) bastion(ctx context.Context, b inventory.Target) (*xssh.Client, func(), error) {
	key := bastionKey(b)
	d.mu.Lock()
	s := d.bastions[key]
	first := s == nil
	if first {
		s = &sharedConn{ready: make(chan struct{})}
		d.bastions[key] = s
	}
	s.refs++
	d.mu.Unlock()

	release := func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		s.refs--
		if s.refs == 0 {
			if d.bastions[key] == s {
				delete(d.bastions, key)
			}
			if s.release != nil {
				s.release()
			}
		}
	}
	if first {
		s.client, s.release, s.err = d.sshConn(ctx, b)
		close(s.ready)
	} else {
		select {
		case <-s.ready:
		case <-ctx.Done():
			release()
			return nil, nil, ctx.Err()
		}
	}
	if s.err != nil {
		release()
		return nil, nil, s.err
	}
	return s.client, release, nil
}

// connect opens an SSH connection to t (through via when not nil), with
// retries for failures to connect only.
func (d *dialer) connect(ctx context.Context, t inventory.Target, via *xssh.Client) (*xssh.Client, error) {
	addr := hostPort(t)
	auth, err := newAuth(t.Name, t.IdentityFile, t.UseAgent, d.opts.Logger)
	if err != nil {
		return nil, fmt.Errorf("host %s: %w", t.Name, err)
	}
	defer auth.Close()

	retries, backoff := d.opts.retries(), d.opts.backoff()
	for attempt := 1; ; attempt++ {
		c, err := d.attempt(ctx, t, addr, via, auth)
		if err == nil {
			return c, nil
		}
		var r retryable
		var f final
		switch {
		case errors.As(err, &f):
			return nil, &ConnectError{Host: t.Name, Addr: addr, Attempts: attempt, Err: f.err}
		case !errors.As(err, &r):
			return nil, err
		case attempt > retries || ctx.Err() != nil:
			return nil, &ConnectError{Host: t.Name, Addr: addr, Attempts: attempt, Err: r.err}
		}
		d.opts.Logger.logf(t.Name, "connect attempt %d of %d to %s failed: %v; retrying in %s",
			attempt, retries+1, addr, r.err, backoff)
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return nil, &ConnectError{Host: t.Name, Addr: addr, Attempts: attempt, Err: ctx.Err()}
		}
		backoff = min(2*backoff, MaxRetryBackoff)
	}
}

// attempt is one connection attempt bounded by t.ConnectTimeout (TCP
// connect and SSH handshake together). Errors worth a retry are wrapped in
// retryable.
func (d *dialer) attempt(ctx context.Context, t inventory.Target, addr string, via *xssh.Client, auth *authSetup) (*xssh.Client, error) {
	hk, err := newHostKeyCheck(t.Name, addr, t.KnownHostsFile, t.AcceptNewHostKeys, d.opts.Logger)
	if err != nil {
		return nil, fmt.Errorf("host %s: %w", t.Name, err)
	}
	actx, cancel := context.WithTimeout(ctx, t.ConnectTimeout)
	defer cancel()

	var conn net.Conn
	if via != nil {
		conn, err = via.DialContext(actx, "tcp", addr)
	} else {
		var nd net.Dialer
		conn, err = nd.DialContext(actx, "tcp", addr)
	}
	if err != nil {
		var dnsErr *net.DNSError
		switch {
		case ctx.Err() != nil:
			return nil, final{ctx.Err()}
		case actx.Err() != nil:
			// Nothing answered for a whole connectTimeout: the host is down
			// or filtered. Not retried, so a dead host costs one timeout.
			return nil, final{fmt.Errorf("TCP connect timed out after %s (connectTimeout): host down or port filtered", t.ConnectTimeout)}
		case errors.As(err, &dnsErr) && dnsErr.IsNotFound:
			return nil, final{err}
		case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
			return nil, final{err}
		}
		return nil, retryable{err}
	}

	stop := context.AfterFunc(actx, func() { conn.Close() })
	cfg := &xssh.ClientConfig{
		User:              t.User,
		Auth:              auth.methods,
		HostKeyCallback:   hk.callback,
		HostKeyAlgorithms: hk.algorithms,
	}
	sc, chans, reqs, err := xssh.NewClientConn(conn, addr, cfg)
	expired := !stop()
	if hkErr := hk.refusal(); hkErr != nil {
		// Whatever else happened, a refused host key ends it, unretried.
		conn.Close()
		return nil, hkErr
	}
	if err != nil {
		conn.Close()
		switch {
		case isAuthFailure(err):
			return nil, &AuthError{Host: t.Name, User: t.User, Offered: auth.desc, Err: err}
		case ctx.Err() != nil:
			return nil, final{ctx.Err()}
		case expired:
			return nil, retryable{fmt.Errorf("SSH handshake timed out after %s (connectTimeout)", t.ConnectTimeout)}
		case errors.Is(err, io.EOF), errors.Is(err, syscall.ECONNRESET), errors.Is(err, net.ErrClosed):
			// sshd dropped us (MaxStartups, restarting): try again.
			return nil, retryable{err}
		}
		return nil, fmt.Errorf("host %s: SSH handshake with %s: %w", t.Name, addr, err)
	}
	if expired {
		sc.Close()
		return nil, retryable{fmt.Errorf("SSH handshake timed out after %s (connectTimeout)", t.ConnectTimeout)}
	}
	return xssh.NewClient(sc, chans, reqs), nil
}
