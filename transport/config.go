package transport

import (
	"errors"
	"fmt"
	"os"
	"time"
)

// Defaults.
const (
	DefaultConns       = 4
	DefaultTimeout     = 1000 * time.Millisecond
	DefaultForkTimeout = 30 * time.Second
	// HandshakeTimeout bounds the TLS and authentication handshake of a
	// new connection on the server.
	HandshakeTimeout = 2 * time.Second
	// MaxInFlight is the number of requests the server processes
	// concurrently per connection; further requests wait to be read.
	MaxInFlight = 16
)

var errNoSecret = errors.New("refusing to serve peers without a cluster secret; give --secret-file or --insecure")

// normalize validates cfg and fills in defaults.
func (c Config) normalize() (Config, error) {
	if len(c.Secret) == 0 && !c.Insecure {
		return c, errNoSecret
	}
	if c.Node == "" {
		h, err := os.Hostname()
		if err != nil {
			return c, fmt.Errorf("transport: node name not set and no hostname: %w", err)
		}
		c.Node = h
	}
	if err := checkNodeName(c.Node); err != nil {
		return c, fmt.Errorf("transport: %w", err)
	}
	if c.Conns <= 0 {
		c.Conns = DefaultConns
	}
	if c.Timeout <= 0 {
		c.Timeout = DefaultTimeout
	}
	if c.ForkTimeout <= 0 {
		c.ForkTimeout = DefaultForkTimeout
	}
	return c, nil
}
