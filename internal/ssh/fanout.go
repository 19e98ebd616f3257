package ssh

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
	"strings"
	"sync"

	"github.com/kpfree/kpfree/internal/inventory"
)

// HostError is one host's failure in a fan-out.
type HostError struct {
	Host string
	Err  error
}

func (e *HostError) Error() string { return e.Host + ": " + e.Err.Error() }
func (e *HostError) Unwrap() error { return e.Err }

// MultiError lists every host a fan-out failed on, in inventory order.
type MultiError struct {
	// Total is the number of hosts the fan-out was over.
	Total int
	// Failed holds one entry per failed host, in inventory order.
	Failed []*HostError
}

// Error reads:
//
//	failed on 2 of 5 hosts:
//	  - node2: ...
//	  - node4: ...
//
// A host's message that already starts with "host NAME: " or "NAME: " is not
// prefixed twice; its further lines are indented.
func (e *MultiError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "failed on %d of %d hosts:", len(e.Failed), e.Total)
	for _, f := range e.Failed {
		msg := f.Err.Error()
		for _, p := range []string{"host " + f.Host + ": ", f.Host + ": "} {
			msg = strings.TrimPrefix(msg, p)
		}
		msg = strings.ReplaceAll(msg, "\n", "\n    ")
		fmt.Fprintf(&b, "\n  - %s: %s", f.Host, msg)
	}
	return b.String()
}

// Unwrap returns the *HostError of every failed host, so errors.Is and
// errors.As see each host's error.
func (e *MultiError) Unwrap() []error {
	errs := make([]error, len(e.Failed))
	for i, f := range e.Failed {
		errs[i] = f
	}
	return errs
}

// Errors maps each failed host to its error.
func (e *MultiError) Errors() map[string]error {
	m := make(map[string]error, len(e.Failed))
	for _, f := range e.Failed {
		m[f.Host] = f.Err
	}
	return m
}

// Hosts lists the failed hosts in inventory order.
func (e *MultiError) Hosts() []string {
	hosts := make([]string, len(e.Failed))
	for i, f := range e.Failed {
		hosts[i] = f.Host
	}
	return hosts
}

// MarshalJSON renders {"total":5,"failed":[{"host":"node2","error":"..."}]}.
func (e *MultiError) MarshalJSON() ([]byte, error) {
	type hostErr struct {
		Host  string `json:"host"`
		Error string `json:"error"`
	}
	out := struct {
		Total  int       `json:"total"`
		Failed []hostErr `json:"failed"`
	}{Total: e.Total, Failed: []hostErr{}}
	for _, f := range e.Failed {
		out.Failed = append(out.Failed, hostErr{Host: f.Host, Error: f.Err.Error()})
	}
	return json.Marshal(out)
}

// ErrNotStarted is the error of the items a fan-out never started because
// ctx ended first (it wraps ctx's error too).
var ErrNotStarted = errors.New("not started")

// ForEach calls fn for every item with at most concurrency calls at once
// (<= 0: all at once). Every item runs whatever the others return; once ctx
// ends, the items not yet started are skipped and reported as failed with
// ErrNotStarted. A panic in fn is that item's error. The result is nil or a
// *MultiError naming every failed item by name(item), in the order of items.
func ForEach[T any](ctx context.Context, items []T, concurrency int, name func(T) string, fn func(ctx context.Context, item T) error) error {
	if concurrency <= 0 || concurrency > len(items) {
		concurrency = len(items)
	}
	errs := make([]error, len(items))
	sem := make(chan struct{}, max(concurrency, 1))
	var wg sync.WaitGroup
	for i, item := range items {
		acquired := false
		if ctx.Err() == nil {
			select {
			case sem <- struct{}{}:
				acquired = true
			case <-ctx.Done():
			}
		}
		if err := ctx.Err(); err != nil {
			if acquired {
				<-sem
			}
			for j := i; j < len(items); j++ {
				errs[j] = fmt.Errorf("%w: %w", ErrNotStarted, err)
			}
			break
		}
		wg.Go(func() {
			defer func() { <-sem }()
			defer func() {
				if p := recover(); p != nil {
					errs[i] = fmt.Errorf("panic: %v\n%s", p, debug.Stack())
				}
			}()
			errs[i] = fn(ctx, item)
		})
	}
	wg.Wait()

	me := &MultiError{Total: len(items)}
	for i, err := range errs {
		if err != nil {
			me.Failed = append(me.Failed, &HostError{Host: name(items[i]), Err: err})
		}
	}
	if len(me.Failed) == 0 {
		return nil
	}
	return me
}

// DialAll connects to every target in parallel (opts.Concurrency at once).
// Hosts behind the same bastion share one connection to it. It returns the
// clients that connected, by host name, and a *MultiError naming every host
// that did not: the caller decides whether to go on with the others, and
// closes the clients either way (CloseAll).
func DialAll(ctx context.Context, targets []inventory.Target, opts Options) (map[string]*Client, error) {
	d := newDialer(opts)
	var mu sync.Mutex
	clients := make(map[string]*Client, len(targets))
	concurrency := opts.Concurrency
	if concurrency <= 0 {
		concurrency = DefaultConcurrency
	}
	err := ForEach(ctx, targets, concurrency, targetName, func(ctx context.Context, t inventory.Target) error {
		c, err := d.dial(ctx, t)
		if err != nil {
			return err
		}
		mu.Lock()
		clients[c.Name()] = c
		mu.Unlock()
		return nil
	})
	return clients, err
}

func targetName(t inventory.Target) string {
	if t.Name != "" {
		return t.Name
	}
	return t.Address
}

// CloseAll closes every client.
func CloseAll(clients map[string]*Client) {
	for _, c := range clients {
		c.Close()
	}
}
