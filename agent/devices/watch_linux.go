package devices

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Run selects the devices in the calling thread's network namespace, hands
// the result to OnChange, then follows changes until ctx ends. It returns
// the first selection's error (a misspelt device name is a configuration
// error), an error when netlink cannot be opened, or ctx's error.
func (w *Watcher) Run(ctx context.Context) error {
	if w.OnChange == nil {
		return errors.New("devices: Watcher.OnChange is required")
	}
	debounce, resync := w.Debounce, w.Resync
	if debounce <= 0 {
		debounce = 200 * time.Millisecond
	}
	if resync <= 0 {
		resync = time.Minute
	}
	// Pin the namespace now: Run's goroutine may move between threads, and
	// the subscriptions and later selections must all look at this one.
	ns, err := netns.Get()
	if err != nil {
		return fmt.Errorf("devices: get the current network namespace: %w", err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("devices: open netlink: %w", err)
	}
	defer h.Close()

	events := make(chan struct{}, 1)
	poke := func() {
		select {
		case events <- struct{}{}:
		default:
		}
	}
	subErr := make(chan error, 1)
	sub, err := w.subscribe(ns, poke, subErr)
	if err != nil {
		return err
	}
	defer func() { sub() }()

	last, err := selectWith(h, w.Spec, w.nodeIPs())
	if err != nil {
		return err
	}
	w.OnChange(last)

	ticker := time.NewTicker(resync)
	defer ticker.Stop()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	pending := false
	arm := func() {
		if !pending {
			pending = true
			timer.Reset(debounce)
		}
	}
	resub := time.NewTimer(time.Hour)
	resub.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-events:
			arm()
		case <-w.kicks():
			arm()
		case <-ticker.C:
			arm()
		case err := <-subErr:
			// Events may have been lost (ENOBUFS, ...): subscribe again
			// shortly and select again then.
			w.fail(fmt.Errorf("devices: netlink subscription failed, subscribing again: %w", err))
			sub()
			sub = func() {}
			resub.Reset(time.Second)
		case <-resub.C:
			s, err := w.subscribe(ns, poke, subErr)
			if err != nil {
				w.fail(err)
				resub.Reset(5 * time.Second)
				continue
			}
			sub = s
			arm()
		case <-timer.C:
			pending = false
			devs, err := selectWith(h, w.Spec, w.nodeIPs())
			if err != nil {
				w.fail(err)
				continue
			}
			if !Equal(devs, last) {
				last = devs
				w.OnChange(devs)
			}
		}
	}
}

// subscribe opens link, address and (auto mode) route subscriptions in ns;
// every update calls poke, the first failure goes to errs. The returned
// function ends them.
func (w *Watcher) subscribe(ns netns.NsHandle, poke func(), errs chan<- error) (func(), error) {
	done := make(chan struct{})
	stop := func() { close(done) }
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	links := make(chan netlink.LinkUpdate, 64)
	addrs := make(chan netlink.AddrUpdate, 64)
	routes := make(chan netlink.RouteUpdate, 64)
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{Namespace: &ns, ErrorCallback: report}); err != nil {
		stop()
		return nil, fmt.Errorf("devices: subscribe to link changes: %w", err)
	}
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{Namespace: &ns, ErrorCallback: report}); err != nil {
		stop()
		return nil, fmt.Errorf("devices: subscribe to address changes: %w", err)
	}
	if len(w.Spec) == 0 {
		if err := netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{Namespace: &ns, ErrorCallback: report}); err != nil {
			stop()
			return nil, fmt.Errorf("devices: subscribe to route changes: %w", err)
		}
	} else {
		routes = nil
	}
	// Drain the channels until netlink closes them (after an error, or
	// after done): a subscription blocked on a full channel would never end.
	stopped := func() bool {
		select {
		case <-done:
			return true
		default:
			return false
		}
	}
	go func() {
		for links != nil || addrs != nil || routes != nil {
			var closed string
			select {
			case _, ok := <-links:
				if !ok {
					links, closed = nil, "link"
				}
			case _, ok := <-addrs:
				if !ok {
					addrs, closed = nil, "address"
				}
			case u, ok := <-routes:
				if !ok {
					routes, closed = nil, "route"
					break
				}
				// Only default routes matter to the selection.
				if u.Dst != nil {
					if ones, _ := u.Dst.Mask.Size(); ones != 0 {
						continue
					}
				}
			}
			if stopped() {
				continue
			}
			if closed != "" {
				report(fmt.Errorf("%s subscription closed", closed))
				continue
			}
			poke()
		}
	}()
	return stop, nil
}
