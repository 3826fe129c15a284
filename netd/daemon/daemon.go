// Package daemon wires a netd process: the host's data plane (netd/dataplane), the agent that keeps it in step
// with etcd (netd/agent), and the agent's NetdService on the node's gRPC server. netd/cmd/netd only parses
// flags into a Config and hands Wire to the node runtime. It depends on the netd packages and internal/node.
package daemon

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/node"
	"github.com/basalt-hv/basalt/netd/agent"
	"github.com/basalt-hv/basalt/netd/dataplane"
	"github.com/basalt-hv/basalt/netd/extension"
	"github.com/vishvananda/netns"
)

// Config is netd's own configuration.
type Config struct {
	// UnderlayDev carries VXLAN traffic between hosts; UnderlayAddr is this host's tunnel endpoint on it
	// (empty: the device's first global address).
	UnderlayDev  string
	UnderlayAddr string
	// Prefix starts the names of the bridges and VXLAN devices netd creates; Table is its nftables table.
	Prefix string
	Table  string
	// NetNS, if set, is the named network namespace (/run/netns/NAME) to program instead of netd's own.
	NetNS string
	// ReadyTimeout bounds how long startup waits for the first convergence before serving anyway.
	ReadyTimeout time.Duration
	// Uplink is where gateways masquerade to (empty: the underlay); UplinkBandwidth its capacity in bit/s.
	Uplink          string
	UplinkBandwidth uint64
	// GatewayNetNS starts the gateway namespaces' names; TransitPool holds their links to the host.
	GatewayNetNS string
	TransitPool  string
	// Extensions maps extension names to their command lines (--extension name=program [args]).
	Extensions map[string][]string
}

// Flags registers netd's flags.
func (c *Config) Flags(fs *flag.FlagSet) {
	fs.StringVar(&c.UnderlayDev, "underlay-interface", "eth0", "interface that carries VXLAN traffic between hosts")
	fs.StringVar(&c.UnderlayAddr, "underlay-address", "", "this host's VXLAN tunnel endpoint address (default: the underlay interface's first global address)")
	fs.StringVar(&c.Prefix, "prefix", "bs", "prefix of the bridge and VXLAN device names netd creates (1 to 6 of a-z 0-9)")
	fs.StringVar(&c.Table, "nft-table", "basalt", "name of the nftables table (bridge family) netd owns")
	fs.StringVar(&c.NetNS, "netns", "", "program this named network namespace instead of netd's own (tests, containers)")
	fs.DurationVar(&c.ReadyTimeout, "ready-timeout", 30*time.Second, "how long startup waits for the host to converge before serving anyway")
	fs.StringVar(&c.Uplink, "uplink-interface", "", "interface network gateways masquerade to (default: the underlay interface)")
	fs.Uint64Var(&c.UplinkBandwidth, "uplink-bandwidth", 10_000_000_000, "capacity in bit/s shared by what the VMs of ports with bandwidth settings send")
	fs.StringVar(&c.GatewayNetNS, "gateway-netns-prefix", "basalt-gw", "prefix of the gateway namespaces' names (<prefix>-<VNI>)")
	fs.StringVar(&c.TransitPool, "gateway-transit-pool", "169.254.64.0/18", "IPv4 prefix for the /30 links between gateways and the host")
	fs.Func("extension", "an extension program: NAME=PROGRAM [ARGS] (repeat for several; docs/netd.md)", func(s string) error {
		name, cmd, ok := strings.Cut(s, "=")
		argv := strings.Fields(cmd)
		if !ok || name == "" || len(argv) == 0 {
			return fmt.Errorf("%q: want NAME=PROGRAM [ARGS]", s)
		}
		if !filepath.IsAbs(argv[0]) {
			return fmt.Errorf("%q: give the program's absolute path", s)
		}
		if c.Extensions == nil {
			c.Extensions = map[string][]string{}
		}
		c.Extensions[name] = argv
		return nil
	})
}

// NFTTrust is how long the data plane trusts the nftables ruleset it verified itself: changes (a port
// moving) then skip reading the table back, which costs about half a second with 1,000 ports; the agent's
// periodic resync (30 s) always reads it, repairing changes made by others.
const NFTTrust = 10 * time.Second

// Daemon is netd's description for the node runtime.
func Daemon(c *Config) node.Daemon {
	return node.Daemon{
		Kind:          basaltv1.NodeKind_NODE_KIND_NETD,
		DefaultListen: "127.0.0.1:7440",
		Flags:         c.Flags,
		Wire:          func(ctx context.Context, n *node.Node) (func(), error) { return Wire(ctx, n, *c) },
	}
}

// Wire starts the data plane and the agent on a started node and returns what to release once it stopped
// serving. It waits (up to ReadyTimeout) for the first convergence, so a node that reports up carries what
// etcd declares.
func Wire(ctx context.Context, n *node.Node, c Config) (_ func(), err error) {
	var closers []func()
	release := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	defer func() {
		if err != nil {
			release()
		}
	}()
	var underlay netip.Addr
	if c.UnderlayAddr != "" {
		if underlay, err = netip.ParseAddr(c.UnderlayAddr); err != nil {
			return nil, fmt.Errorf("--underlay-address %q is not an IP address", c.UnderlayAddr)
		}
	}
	ns := netns.None()
	if c.NetNS != "" {
		if ns, err = netns.GetFromName(c.NetNS); err != nil {
			return nil, fmt.Errorf("--netns %s: %w", c.NetNS, err)
		}
		closers = append(closers, func() { ns.Close() })
	}
	var transit netip.Prefix
	if c.TransitPool != "" {
		if transit, err = netip.ParsePrefix(c.TransitPool); err != nil {
			return nil, fmt.Errorf("--gateway-transit-pool %q is not a prefix", c.TransitPool)
		}
	}
	log := n.Log.With("component", "netd")
	plane, err := dataplane.New(dataplane.Options{Prefix: c.Prefix, Table: c.Table, NetNS: ns, Logger: log,
		GatewayNetNS: c.GatewayNetNS, TransitPool: transit, NFTTrust: NFTTrust})
	if err != nil {
		return nil, err
	}
	closers = append(closers, func() { plane.Close() })
	dir, err := n.Dir.Sub("extensions")
	if err != nil {
		return nil, err
	}
	ext, err := extension.New(extension.Config{Programs: c.Extensions, StateDir: dir, NetNS: ns, Logger: log})
	if err != nil {
		return nil, err
	}
	// Extension processes keep running when netd stops (the ports they serve keep working); the next netd
	// adopts them.
	closers = append(closers, ext.Close)
	a, err := agent.New(agent.Config{
		NodeID: n.Config.ID, Store: n.Store, Plane: plane, NetNS: ns,
		UnderlayDev: c.UnderlayDev, UnderlayIP: underlay, Logger: log,
		Uplink: c.Uplink, UplinkBps: c.UplinkBandwidth, Extensions: ext,
	})
	if err != nil {
		return nil, err
	}
	closers = append(closers, a.Close)
	basaltv1.RegisterNetdServiceServer(n.GRPC, a)

	actx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.Run(actx) }()
	closers = append(closers, func() {
		stop()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			log.Error("agent stopped", "err", err)
		}
	})
	start := time.Now()
	select {
	case <-a.Ready():
		log.Info("host converged", "took", time.Since(start), "underlay", a.UnderlayIP())
	case err := <-done:
		done <- err // for the closer
		return nil, fmt.Errorf("netd agent: %w", err)
	case <-time.After(c.ReadyTimeout):
		log.Warn("host not converged yet; serving anyway (see the errors above)", "waited", c.ReadyTimeout)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return release, nil
}
