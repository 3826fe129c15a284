//go:build !amd64

package cloudhv

import "errors"

// probeKVM is implemented for x86-64 only, where the end-to-end test's Debian cloud kernel runs.
func probeKVM() error {
	return errors.New("the KVM probe is implemented for x86-64 only")
}
