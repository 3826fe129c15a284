// Package agent is netd's control plane on one host: it watches the virtual networks, ports and netd hosts
// declared in etcd, builds the dataplane.HostState of its own host from them (its ports, and the ports a live
// migration brings to it, as local ports; the ports of the same networks on other hosts as remote ports behind
// those hosts' VTEPs), hands it to the data
// plane, and does so again whenever etcd changes. It publishes its host's underlay address for the other
// hosts, and serves the port counters (NetdService). It depends on metad/store, metad/watch, metad/schema,
// the API types and netd/dataplane; it never imports metad's server side.
//
// Restart behaviour: nothing is applied before every watched prefix has been read once, and the state built
// from the same records is the same state, so a restarted agent's first Apply changes only what changed in
// etcd meanwhile (the data plane leaves everything else untouched, see docs/netd.md).
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"github.com/basalt-hv/basalt/metad/watch"
	"github.com/basalt-hv/basalt/netd/dataplane"
	"github.com/basalt-hv/basalt/netd/extension"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Config configures an Agent.
type Config struct {
	// NodeID is this netd's node ID: ports whose host is NodeID are local.
	NodeID string
	Store  *store.Store
	// Plane programs the host. The agent does not close it.
	Plane *dataplane.Plane
	// NetNS is the namespace Plane programs (for reading interface addresses and statistics); <= 0 means
	// the caller's.
	NetNS netns.NsHandle
	// UnderlayDev carries the VXLAN traffic; UnderlayIP is this host's VTEP address on it (if invalid, the
	// first global unicast IPv4 address of UnderlayDev, else its first global IPv6 address, looked up until
	// found: a host without it programs nothing, but netd still runs).
	UnderlayDev string
	UnderlayIP  netip.Addr
	// Uplink is the interface gateways masquerade to (empty: UnderlayDev); UplinkBps its capacity, shared by
	// the ports with bandwidth settings (0: 10 Gbit/s).
	Uplink    string
	UplinkBps uint64
	// Extensions runs the extension processes of local ports; nil: no extension is configured, and ports that
	// name one are left out.
	Extensions *extension.Runner
	// Debounce is how long to wait after a change for more changes before applying (default 20 ms).
	Debounce time.Duration
	// Resync is how often to apply even without change, repairing manual changes to the host (default 30 s).
	Resync time.Duration
	Logger *slog.Logger
}

// Agent is one host's netd control plane.
type Agent struct {
	basaltv1.UnimplementedNetdServiceServer
	cfg Config
	log *slog.Logger
	nl  *netlink.Handle

	underlay  netip.Addr // resolved VTEP address; only the loop goroutine writes it
	published bool

	mu      sync.Mutex
	nets    map[string]*basaltv1.Network // by name
	ports   map[string]*basaltv1.Port    // by "<network>/<port>"
	hosts   map[string]netip.Addr        // node -> VTEP
	synced  [3]bool
	applied *dataplane.HostState // last state applied successfully
	gen     uint64               // applies that succeeded
	applyCh chan struct{}        // closed and replaced after every successful apply

	dirty chan struct{}
	ready chan struct{}
}

// New checks the configuration and resolves the underlay address.
func New(cfg Config) (*Agent, error) {
	if cfg.NodeID == "" || cfg.Store == nil || cfg.Plane == nil || cfg.UnderlayDev == "" {
		return nil, errors.New("agent: NodeID, Store, Plane and UnderlayDev are required")
	}
	if cfg.Debounce == 0 {
		cfg.Debounce = 20 * time.Millisecond
	}
	if cfg.Resync == 0 {
		cfg.Resync = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	var nl *netlink.Handle
	var err error
	if cfg.NetNS > 0 {
		nl, err = netlink.NewHandleAt(cfg.NetNS)
	} else {
		nl, err = netlink.NewHandle()
	}
	if err != nil {
		return nil, fmt.Errorf("agent: netlink handle: %w", err)
	}
	a := &Agent{
		cfg: cfg, log: cfg.Logger.With("component", "netd-agent"), nl: nl,
		nets: map[string]*basaltv1.Network{}, ports: map[string]*basaltv1.Port{}, hosts: map[string]netip.Addr{},
		applyCh: make(chan struct{}), dirty: make(chan struct{}, 1), ready: make(chan struct{}),
	}
	a.underlay = cfg.UnderlayIP.Unmap()
	if !a.underlay.IsValid() {
		a.underlay, _ = a.underlayAddr() // retried by the loop if not there yet
	}
	return a, nil
}

// underlayAddr is the first global unicast address of the underlay device, IPv4 first.
func (a *Agent) underlayAddr() (netip.Addr, error) {
	l, err := a.nl.LinkByName(a.cfg.UnderlayDev)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("agent: underlay device %q: %w", a.cfg.UnderlayDev, err)
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		addrs, err := a.nl.AddrList(l, fam)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("agent: addresses of %s: %w", a.cfg.UnderlayDev, err)
		}
		for _, ad := range addrs {
			if ip, ok := netip.AddrFromSlice(ad.IP); ok && ip.Unmap().IsGlobalUnicast() {
				return ip.Unmap(), nil
			}
		}
	}
	return netip.Addr{}, fmt.Errorf("agent: underlay device %s has no global unicast address; pass the underlay address", a.cfg.UnderlayDev)
}

// Close releases the agent's netlink handle, once Run has returned and nothing calls GetPortCounters any more.
// It does not touch the host's state.
func (a *Agent) Close() { a.nl.Close() }

// UnderlayIP is the VTEP address this agent publishes (invalid while it is not known).
func (a *Agent) UnderlayIP() netip.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.underlay
}

// Ready is closed after the first successful Apply: the host carries what etcd declares.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// Applied returns the last state applied successfully (nil before the first), how many applies succeeded,
// and a channel closed at the next successful apply.
func (a *Agent) Applied() (*dataplane.HostState, uint64, <-chan struct{}) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.applied, a.gen, a.applyCh
}

// Run publishes the host record, follows etcd and keeps the host converged until ctx ends, and returns
// ctx.Err(). Failures (etcd unreachable, a failed apply) are logged and retried.
func (a *Agent) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wctx, cancel := context.WithCancel(ctx)
	defer func() { cancel(); wg.Wait() }()
	wg.Add(3)
	go func() {
		defer wg.Done()
		a.follow(wctx, func() error {
			return watch.Run(wctx, a.cfg.Store, schema.NetworksPrefix, handlers(a, 0, a.nets, func(r *basaltv1.Network) string { return r.GetName() },
				func(k string) string { return schema.IDFromKey(schema.NetworksPrefix, k) }), a.log)
		})
	}()
	go func() {
		defer wg.Done()
		a.follow(wctx, func() error {
			return watch.Run(wctx, a.cfg.Store, schema.PortsPrefix, handlers(a, 1, a.ports, func(r *basaltv1.Port) string { return r.GetNetwork() + "/" + r.GetName() },
				func(k string) string { return schema.IDFromKey(schema.PortsPrefix, k) }), a.log)
		})
	}()
	go func() {
		defer wg.Done()
		a.follow(wctx, func() error { return watch.Run(wctx, a.cfg.Store, schema.NetdHostsPrefix, a.hostHandlers(), a.log) })
	}()
	a.loop(ctx)
	return ctx.Err()
}

// follow runs a watch until ctx ends; a watch that stops on a handler error (a record that does not decode)
// is restarted after a pause rather than taking the agent down.
func (a *Agent) follow(ctx context.Context, run func() error) {
	for {
		err := run()
		if ctx.Err() != nil {
			return
		}
		a.log.Error("watch stopped; restarting", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}

func handlers[M any, P store.Message[M]](a *Agent, idx int, m map[string]P, keyOf func(P) string, keyFromKey func(string) string) watch.Handlers[P] {
	return watch.Handlers[P]{
		Sync: func(recs []store.Record[P], _ int64) error {
			a.mu.Lock()
			clear(m)
			for _, r := range recs {
				m[keyOf(r.Value)] = r.Value
			}
			a.synced[idx] = true
			a.mu.Unlock()
			a.kick()
			return nil
		},
		Put: func(r store.Record[P]) error {
			a.mu.Lock()
			m[keyOf(r.Value)] = r.Value
			a.mu.Unlock()
			a.kick()
			return nil
		},
		Delete: func(key string, _ int64) error {
			a.mu.Lock()
			delete(m, keyFromKey(key))
			a.mu.Unlock()
			a.kick()
			return nil
		},
	}
}

func (a *Agent) hostHandlers() watch.Handlers[*basaltv1.NetdHost] {
	set := func(h *basaltv1.NetdHost) {
		ip, err := netip.ParseAddr(h.GetUnderlayAddress())
		if err != nil {
			a.log.Warn("netd host record with a bad underlay address; ignoring it", "node", h.GetNode(), "address", h.GetUnderlayAddress())
			delete(a.hosts, h.GetNode())
			return
		}
		a.hosts[h.GetNode()] = ip.Unmap()
	}
	return watch.Handlers[*basaltv1.NetdHost]{
		Sync: func(recs []store.Record[*basaltv1.NetdHost], _ int64) error {
			a.mu.Lock()
			clear(a.hosts)
			for _, r := range recs {
				set(r.Value)
			}
			a.synced[2] = true
			a.mu.Unlock()
			a.kick()
			return nil
		},
		Put: func(r store.Record[*basaltv1.NetdHost]) error {
			a.mu.Lock()
			set(r.Value)
			a.mu.Unlock()
			a.kick()
			return nil
		},
		Delete: func(key string, _ int64) error {
			a.mu.Lock()
			delete(a.hosts, schema.IDFromKey(schema.NetdHostsPrefix, key))
			a.mu.Unlock()
			a.kick()
			return nil
		},
	}
}

func (a *Agent) kick() {
	select {
	case a.dirty <- struct{}{}:
	default:
	}
}

// publishHost writes this host's record. It is not on a lease: the other hosts keep forwarding to this
// host's ports while its netd restarts.
func (a *Agent) publishHost(ctx context.Context) error {
	key := schema.NetdHostKey(a.cfg.NodeID)
	rec := &basaltv1.NetdHost{Node: a.cfg.NodeID, UnderlayAddress: a.underlay.String(), UpdatedAt: timestamppb.Now()}
	cur, err := store.Get[basaltv1.NetdHost](ctx, a.cfg.Store, key)
	if err == nil && cur.Value.GetUnderlayAddress() == rec.GetUnderlayAddress() {
		return nil // unchanged: do not wake every other host for nothing
	}
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("read host record: %w", err)
	}
	if _, err := a.cfg.Store.Put(ctx, key, rec); err != nil {
		return fmt.Errorf("publish host record: %w", err)
	}
	a.log.Info("published host record", "underlay", rec.GetUnderlayAddress())
	return nil
}

// loop applies the state after every change (debounced), periodically, and after failures (with backoff).
func (a *Agent) loop(ctx context.Context) {
	resync := time.NewTimer(a.cfg.Resync)
	defer resync.Stop()
	var retry <-chan time.Time
	backoff := 200 * time.Millisecond
	var lastProblems string
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.dirty:
		case <-resync.C:
		case <-retry:
		}
		// Let a burst of changes (a VM with several ports, a migration) land before applying.
		select {
		case <-ctx.Done():
			return
		case <-time.After(a.cfg.Debounce):
		}
		select {
		case <-a.dirty:
		default:
		}
		a.mu.Lock()
		synced := a.synced == [3]bool{true, true, true}
		a.mu.Unlock()
		if !synced {
			continue // never apply a partial view: it would remove what is not read yet
		}
		if wait, why := a.prepare(ctx); why != "" {
			if why != lastProblems {
				a.log.Warn("cannot program this host yet", "why", why)
				lastProblems = why
			}
			retry = time.After(wait)
			continue
		}
		st, problems := a.build()
		if p := fmt.Sprint(problems); p != lastProblems {
			for _, pr := range problems {
				a.log.Warn("not programmed", "why", pr)
			}
			lastProblems = p
		}
		if skip, err := a.nothingToDo(ctx, st); err != nil {
			a.log.Error("inspect the host", "err", err)
		} else if skip {
			a.markReady(st, 0)
			continue
		}
		start := time.Now()
		err := a.cfg.Plane.Apply(ctx, st)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			a.log.Error("apply failed; retrying", "err", err, "retry_in", backoff)
			retry = time.After(backoff)
			backoff = min(2*backoff, 10*time.Second)
			continue
		}
		retry, backoff = nil, 200*time.Millisecond
		resync.Reset(a.cfg.Resync)
		if a.cfg.Extensions != nil {
			a.cfg.Extensions.Sync(ctx, a.extensionPorts(st))
		}
		a.markReady(st, time.Since(start))
	}
}

// prepare makes sure the underlay address is known and published. If not, it says why and when to try again;
// a host with no port bound to it is ready all the same (there is nothing to program).
func (a *Agent) prepare(ctx context.Context) (time.Duration, string) {
	if !a.underlay.IsValid() {
		ip, err := a.underlayAddr()
		if err != nil {
			if a.localPorts() == 0 {
				a.markReady(dataplane.HostState{}, 0)
			}
			return 2 * time.Second, err.Error()
		}
		a.mu.Lock()
		a.underlay = ip
		a.mu.Unlock()
	}
	if !a.published {
		if err := a.publishHost(ctx); err != nil {
			return time.Second, err.Error()
		}
		a.published = true
	}
	return 0, ""
}

func (a *Agent) localPorts() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, p := range a.ports {
		if p.GetHost() == a.cfg.NodeID || p.GetIncomingHost() == a.cfg.NodeID {
			n++
		}
	}
	return n
}

// nothingToDo is true when nothing is declared for this host and the host holds nothing of ours: netd then
// never touches a host it has no business on (no empty nftables table on a development machine).
func (a *Agent) nothingToDo(ctx context.Context, st dataplane.HostState) (bool, error) {
	if len(st.Networks) > 0 {
		return false, nil
	}
	owns, err := a.cfg.Plane.Owns(ctx)
	return !owns, err
}

// markReady records a converged state.
func (a *Agent) markReady(st dataplane.HostState, took time.Duration) {
	a.mu.Lock()
	a.applied = &st
	a.gen++
	close(a.applyCh)
	a.applyCh = make(chan struct{})
	first := a.gen == 1
	a.mu.Unlock()
	if first {
		close(a.ready)
		a.log.Info("host converged", "ports", len(st.Ports), "remote_ports", len(st.Remote), "networks", len(st.Networks), "took", took)
	}
}

// build computes the host's desired state from the records, and what it had to leave out and why.
func (a *Agent) build() (dataplane.HostState, []string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	in := inputs{me: a.cfg.NodeID, underlayDev: a.cfg.UnderlayDev, underlay: a.underlay, uplink: a.cfg.Uplink, uplinkBps: a.cfg.UplinkBps,
		nets: a.nets, ports: a.ports, hosts: a.hosts}
	if a.cfg.Extensions != nil {
		in.hasExtension = a.cfg.Extensions.Has
	}
	return buildState(in)
}

// extensionPorts lists the applied ports that have an extension, for the runner.
func (a *Agent) extensionPorts(st dataplane.HostState) []extension.Port {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []extension.Port
	for _, p := range st.Ports {
		if !p.Policy.Extension {
			continue
		}
		rec := a.ports[p.Name]
		out = append(out, extension.Port{Name: p.Name, Tap: p.Tap, ExtTap: a.cfg.Plane.ExtensionTap(p.Tap), Extension: rec.GetPolicy().GetExtension()})
	}
	return out
}

// portName is the data plane's name of a port (and the key of its counters).
func portName(network, port string) string { return network + "/" + port }

// inputs are what a host's state is built from.
type inputs struct {
	me, underlayDev string
	underlay        netip.Addr
	uplink          string
	uplinkBps       uint64
	nets            map[string]*basaltv1.Network
	ports           map[string]*basaltv1.Port
	hosts           map[string]netip.Addr
	hasExtension    func(string) bool
}

// buildState is the pure part of build.
func buildState(in inputs) (dataplane.HostState, []string) {
	st := dataplane.HostState{UnderlayIP: in.underlay, UnderlayDev: in.underlayDev, Uplink: in.uplink, UplinkBps: in.uplinkBps}
	var problems []string
	keys := sortedKeys(in.ports)
	local := map[string]bool{} // networks with a local port
	taps := map[string]string{}
	for _, k := range keys {
		p := in.ports[k]
		// A live migration's destination gets the tap and policy of the ports coming to it, so that its
		// hypervisor can open the tap before the switchover; their traffic follows host until then (below).
		incoming := p.GetHost() != in.me && p.GetIncomingHost() == in.me
		if p.GetHost() != in.me && !incoming {
			continue
		}
		nw := in.nets[p.GetNetwork()]
		if nw == nil {
			problems = append(problems, fmt.Sprintf("port %s: network %q does not exist", k, p.GetNetwork()))
			continue
		}
		dp, err := localPort(p)
		if err != nil {
			problems = append(problems, fmt.Sprintf("port %s: %v", k, err))
			continue
		}
		if dp.Tap == in.underlayDev || dp.Tap == in.uplink || dp.Tap == "lo" {
			problems = append(problems, fmt.Sprintf("port %s: tap %s is a host interface", k, dp.Tap))
			continue
		}
		if o, dup := taps[dp.Tap]; dup {
			problems = append(problems, fmt.Sprintf("port %s: tap %s is already used by port %s", k, dp.Tap, o))
			continue
		}
		if e := p.GetPolicy().GetExtension(); e != "" {
			if in.hasExtension == nil || !in.hasExtension(e) {
				problems = append(problems, fmt.Sprintf("port %s: extension %q is not configured on this netd (--extension)", k, e))
				continue
			}
			dp.Policy.Extension = true
		}
		// With a host elsewhere the port is also a remote port here: its MAC's FDB and neighbour entries keep
		// pointing at that host. Without a host there is nowhere else for its traffic to go.
		dp.Incoming = incoming && p.GetHost() != ""
		taps[dp.Tap] = k
		st.Ports = append(st.Ports, dp)
		local[p.GetNetwork()] = true
	}
	// Mirroring needs its target on this host too (mirrored frames do not cross the overlay).
	for i := range st.Ports {
		pt := &st.Ports[i]
		m := pt.Policy.MirrorTo
		if m == "" {
			continue
		}
		if _, ok := taps[in.ports[m].GetTap()]; !ok || in.ports[m].GetHost() != in.me {
			problems = append(problems, fmt.Sprintf("port %s: mirror target %s is not on this host; not mirroring", pt.Name, m))
			pt.Policy.MirrorTo = ""
		}
	}
	for _, name := range sortedKeys(local) {
		nw := in.nets[name]
		dn := dataplane.Network{Name: name, VNI: nw.GetVni(), MTU: int(nw.GetMtu())}
		if g := nw.GetGateway(); g != nil {
			gw, err := gateway(nw)
			if err != nil {
				problems = append(problems, fmt.Sprintf("network %s: gateway: %v; no gateway", name, err))
			} else {
				dn.Gateway = gw
			}
		}
		st.Networks = append(st.Networks, dn)
	}
	for _, k := range keys {
		p := in.ports[k]
		if p.GetHost() == in.me || p.GetHost() == "" || !local[p.GetNetwork()] {
			continue
		}
		vtep, ok := in.hosts[p.GetHost()]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("remote port %s: host %q has published no underlay address (is its netd running?)", k, p.GetHost()))
			continue
		case vtep.Is4() != in.underlay.Is4():
			problems = append(problems, fmt.Sprintf("remote port %s: host %q's underlay address %s is not of this host's family", k, p.GetHost(), vtep))
			continue
		case vtep == in.underlay:
			problems = append(problems, fmt.Sprintf("remote port %s: host %q publishes this host's underlay address %s", k, p.GetHost(), vtep))
			continue
		}
		rp, err := remotePort(p, vtep)
		if err != nil {
			problems = append(problems, fmt.Sprintf("remote port %s: %v", k, err))
			continue
		}
		st.Remote = append(st.Remote, rp)
	}
	return st, problems
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
