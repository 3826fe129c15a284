package nbdclient

import (
	"fmt"
	"net"
	"net/url"
	"strings"
)

// URI is where an export is: a network address and an export name.
type URI struct {
	// Network is "tcp" or "unix".
	Network string
	// Address is HOST:PORT for tcp, the socket path for unix.
	Address string
	// Export is the export name, possibly empty (the server's default export).
	Export string
}

// ParseURI reads an NBD URI as written by the NBD URI specification (doc/uri.md) and by Basalt's API:
// nbd://HOST[:PORT][/EXPORT] (port 10809 by default) or nbd+unix:///[EXPORT]?socket=PATH. The export name is
// the path without its leading slash, percent-decoded. TLS schemes are refused: this client does not speak
// TLS.
func ParseURI(s string) (URI, error) {
	u, err := url.Parse(s)
	if err != nil {
		return URI{}, fmt.Errorf("NBD URI %q: %w", s, err)
	}
	export := strings.TrimPrefix(u.Path, "/")
	switch u.Scheme {
	case "nbd":
		if u.Hostname() == "" {
			return URI{}, fmt.Errorf("NBD URI %q has no host (want nbd://HOST[:PORT]/EXPORT)", s)
		}
		port := u.Port()
		if port == "" {
			port = defaultPort
		}
		return URI{Network: "tcp", Address: net.JoinHostPort(u.Hostname(), port), Export: export}, nil
	case "nbd+unix":
		if u.Host != "" {
			return URI{}, fmt.Errorf("NBD URI %q: nbd+unix takes no host (want nbd+unix:///EXPORT?socket=PATH)", s)
		}
		// The query is split by hand: url.ParseQuery would turn '+' into a space, and socket paths are
		// written with only '%', '&', '#' and ' ' escaped.
		var socket string
		for _, kv := range strings.Split(u.RawQuery, "&") {
			k, v, _ := strings.Cut(kv, "=")
			if k != "socket" {
				continue
			}
			if socket, err = url.PathUnescape(v); err != nil {
				return URI{}, fmt.Errorf("NBD URI %q: socket path: %w", s, err)
			}
		}
		if socket == "" {
			return URI{}, fmt.Errorf("NBD URI %q has no socket (want nbd+unix:///EXPORT?socket=PATH)", s)
		}
		return URI{Network: "unix", Address: socket, Export: export}, nil
	case "nbds", "nbds+unix":
		return URI{}, fmt.Errorf("NBD URI %q: TLS (%s://) is not supported by this client", s, u.Scheme)
	case "":
		return URI{}, fmt.Errorf("%q is not an NBD URI (want nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)", s)
	}
	return URI{}, fmt.Errorf("NBD URI %q: scheme %q is not supported (want nbd or nbd+unix)", s, u.Scheme)
}

// String writes the URI back in the form ParseURI reads.
func (u URI) String() string {
	export := (&url.URL{Path: u.Export}).EscapedPath()
	if u.Network == "unix" {
		return "nbd+unix:///" + export + "?socket=" + strings.NewReplacer("%", "%25", "&", "%26", "#", "%23", " ", "%20").Replace(u.Address)
	}
	return "nbd://" + u.Address + "/" + export
}
