//go:build !linux

package devices

import (
	"context"
	"net/netip"
)

// Select needs Linux; see the Linux documentation.
func Select(spec []string, nodeIPs []netip.Addr) ([]Device, error) { return nil, ErrUnsupported }

// Run needs Linux.
func (w *Watcher) Run(ctx context.Context) error { return ErrUnsupported }
