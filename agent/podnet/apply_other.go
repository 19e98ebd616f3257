//go:build !linux

package podnet

import "errors"

// Apply is only implemented on Linux.
func Apply(Plan) ([]string, error) { return nil, errors.New("podnet: Apply needs Linux") }
