package netbench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/node"
	"github.com/basalt-hv/basalt/metad/api"
	"github.com/basalt-hv/basalt/metad/etcdserver"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"github.com/basalt-hv/basalt/netd/agent"
	"github.com/basalt-hv/basalt/netd/daemon"
	"github.com/basalt-hv/basalt/netd/dataplane"
	"github.com/basalt-hv/basalt/netd/netlab"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// ConvergeOptions configure Converge.
type ConvergeOptions struct {
	LabID string
	// Ports on the measured host, spread over Networks; Remote ports of the same networks on another host.
	Ports, Networks, Remote int
	// Changed ports (deleted, created, given another ACL) while netd is down, for the third measurement.
	Changed int
	// TmpDir holds the embedded etcd's data.
	TmpDir string
	Logger *slog.Logger
	// AgentLogger receives the measured agents' and data planes' logs (default: warnings on stderr; at
	// debug level the data plane times each step of every Apply).
	AgentLogger *slog.Logger
}

// ConvergeResult are the times from agent start to a converged host.
type ConvergeResult struct {
	// Fresh: nothing programmed yet (every tap, bridge, rule created).
	Fresh time.Duration
	// Restart: netd restarted, nothing changed in etcd (the host is checked and left alone).
	Restart time.Duration
	// RestartChanged: netd restarted after Changed ports were deleted, Changed created and Changed changed.
	RestartChanged time.Duration
	// Unchanged reports whether the restart without changes left every tap with its interface index.
	Unchanged bool
	// Move is the time from a port's move to another host in etcd to this host having applied it (its
	// entries point at the new host), with all the ports in place.
	Move    time.Duration
	Options ConvergeOptions
}

// Converge measures how long netd takes to converge a host with many ports.
func Converge(ctx context.Context, o ConvergeOptions) (_ ConvergeResult, err error) {
	if o.Ports <= 0 {
		o.Ports = 1000
	}
	if o.Networks <= 0 {
		o.Networks = 10
	}
	if o.Remote < 0 {
		o.Remote = 0
	}
	if o.Changed <= 0 {
		o.Changed = 10
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.AgentLogger == nil {
		o.AgentLogger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	res := ConvergeResult{Options: o}
	dir, err := os.MkdirTemp(o.TmpDir, "basalt-netbench-etcd")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(dir)
	ports := make([]string, 2)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return res, err
		}
		ports[i] = l.Addr().String()
		l.Close()
	}
	etcd, err := etcdserver.Start(ctx, etcdserver.Config{Dir: dir, Name: "netbench", ClientURL: "http://" + ports[0], PeerURL: "http://" + ports[1], LogLevel: "error"})
	if err != nil {
		return res, err
	}
	defer etcd.Close()
	cli, err := node.Dial(ctx, []string{"http://" + ports[0]}, 10*time.Second)
	if err != nil {
		return res, err
	}
	defer cli.Close()
	s := store.New(cli)
	if _, err := registry.InitCluster(ctx, s); err != nil {
		return res, err
	}
	lab, err := netlab.New(o.LabID, 1)
	if err != nil {
		return res, err
	}
	defer func() { err = errors.Join(err, lab.Close()) }()
	h := lab.Hosts[0]

	// The other host exists only as its record: its ports are remote entries here.
	if _, err := s.Put(ctx, schema.NetdHostKey("other"), &basaltv1.NetdHost{Node: "other", UnderlayAddress: "192.0.2.200", UpdatedAt: timestamppb.Now()}); err != nil {
		return res, err
	}
	nsrv := &api.NetworkServer{Store: s}
	for i := range o.Networks {
		if _, err := nsrv.CreateNetwork(ctx, &basaltv1.CreateNetworkRequest{Network: &basaltv1.Network{
			Name: fmt.Sprintf("n%d", i), Tenant: "bench", Vni: uint32(1000 + i), Subnets: []string{fmt.Sprintf("10.%d.0.0/16", i)},
		}}); err != nil {
			return res, err
		}
	}
	acl := func(port int) []*basaltv1.AclRule {
		return []*basaltv1.AclRule{
			{Id: "ssh", Direction: basaltv1.AclDirection_ACL_DIRECTION_IN, Action: basaltv1.AclAction_ACL_ACTION_ALLOW, Protocol: basaltv1.AclProtocol_ACL_PROTOCOL_TCP, PortMin: 22, PortMax: 22},
			{Id: "web", Direction: basaltv1.AclDirection_ACL_DIRECTION_IN, Action: basaltv1.AclAction_ACL_ACTION_ALLOW, Protocol: basaltv1.AclProtocol_ACL_PROTOCOL_TCP, PortMin: uint32(8000 + port%1000), PortMax: uint32(8000 + port%1000)},
			{Id: "rest", Direction: basaltv1.AclDirection_ACL_DIRECTION_IN, Action: basaltv1.AclAction_ACL_ACTION_DENY, Protocol: basaltv1.AclProtocol_ACL_PROTOCOL_TCP},
		}
	}
	create := func(i int, host string) error {
		_, err := nsrv.CreatePort(ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{
			Network: fmt.Sprintf("n%d", i%o.Networks), Name: fmt.Sprintf("p%d", i), Host: host,
			Ips:    []string{fmt.Sprintf("10.%d.%d.%d", i%o.Networks, 1+i/250, 1+i%250)},
			Policy: &basaltv1.PortPolicy{Acl: acl(i)},
		}})
		return err
	}
	for i := range o.Ports {
		if err := create(i, "h1"); err != nil {
			return res, err
		}
	}
	for i := o.Ports; i < o.Ports+o.Remote; i++ {
		if err := create(i, "other"); err != nil {
			return res, err
		}
	}
	o.Logger.Info("declared", "ports", o.Ports, "remote", o.Remote, "networks", o.Networks)

	var current *agent.Agent
	run := func() (time.Duration, func(), error) {
		plane, err := dataplane.New(dataplane.Options{NetNS: h.Handle, GatewayNetNS: h.Name + "-gw", Logger: o.AgentLogger, NFTTrust: daemon.NFTTrust})
		if err != nil {
			return 0, nil, err
		}
		a, err := agent.New(agent.Config{NodeID: "h1", Store: s, Plane: plane, NetNS: h.Handle, UnderlayDev: "eth0", Logger: o.AgentLogger})
		if err != nil {
			plane.Close()
			return 0, nil, err
		}
		actx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		start := time.Now()
		go func() { a.Run(actx); close(done) }()
		stop := func() { cancel(); <-done; a.Close(); plane.Close() }
		current = a
		select {
		case <-a.Ready():
			return time.Since(start), stop, nil
		case <-time.After(10 * time.Minute):
			stop()
			return 0, nil, errors.New("the host did not converge within 10 minutes")
		case <-ctx.Done():
			stop()
			return 0, nil, ctx.Err()
		}
	}
	var stop func()
	if res.Fresh, stop, err = run(); err != nil {
		return res, err
	}
	stop()
	before, err := tapIndexes(h)
	if err != nil {
		return res, err
	}
	if res.Restart, stop, err = run(); err != nil {
		return res, err
	}
	stop()
	after, err := tapIndexes(h)
	if err != nil {
		return res, err
	}
	res.Unchanged = len(before) == o.Ports && fmt.Sprint(before) == fmt.Sprint(after)

	for i := range o.Changed {
		if _, err := nsrv.DeletePort(ctx, &basaltv1.DeletePortRequest{Network: fmt.Sprintf("n%d", i%o.Networks), Name: fmt.Sprintf("p%d", i)}); err != nil {
			return res, err
		}
		if err := create(o.Ports+o.Remote+i, "h1"); err != nil {
			return res, err
		}
		p, err := nsrv.GetPort(ctx, &basaltv1.GetPortRequest{Network: fmt.Sprintf("n%d", (o.Changed+i)%o.Networks), Name: fmt.Sprintf("p%d", o.Changed+i)})
		if err != nil {
			return res, err
		}
		p.Policy.Acl = p.Policy.Acl[:2]
		if _, err := nsrv.UpdatePort(ctx, &basaltv1.UpdatePortRequest{Port: p}); err != nil {
			return res, err
		}
	}
	if res.RestartChanged, stop, err = run(); err != nil {
		return res, err
	}
	defer stop()
	if o.Remote > 0 {
		if res.Move, err = measureMove(ctx, s, nsrv, current, o); err != nil {
			return res, err
		}
	}
	return res, nil
}

// measureMove moves a remote port to another host and waits until the agent applied the new location.
func measureMove(ctx context.Context, s *store.Store, nsrv *api.NetworkServer, a *agent.Agent, o ConvergeOptions) (time.Duration, error) {
	if _, err := s.Put(ctx, schema.NetdHostKey("third"), &basaltv1.NetdHost{Node: "third", UnderlayAddress: "192.0.2.201", UpdatedAt: timestamppb.Now()}); err != nil {
		return 0, err
	}
	i := o.Ports // the first remote port
	nw, name := fmt.Sprintf("n%d", i%o.Networks), fmt.Sprintf("p%d", i)
	p, err := nsrv.GetPort(ctx, &basaltv1.GetPortRequest{Network: nw, Name: name})
	if err != nil {
		return 0, err
	}
	// Let the host record's own apply pass first: only the move is measured.
	time.Sleep(2 * time.Second)
	p.Host = "third"
	start := time.Now()
	if _, err := nsrv.UpdatePort(ctx, &basaltv1.UpdatePortRequest{Port: p}); err != nil {
		return 0, err
	}
	for {
		st, _, next := a.Applied()
		for _, r := range st.Remote {
			if r.Network == nw && r.MAC.String() == p.GetMac() && r.HostVTEP.String() == "192.0.2.201" {
				return time.Since(start), nil
			}
		}
		select {
		case <-next:
		case <-time.After(30 * time.Second):
			return 0, errors.New("the move was not applied within 30s")
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// tapIndexes maps the netd-created taps (names "bt...") to their interface indexes.
func tapIndexes(h *netlab.Host) (map[string]int, error) {
	ls, err := h.NL.LinkList()
	if err != nil {
		return nil, err
	}
	out := map[string]int{}
	for _, l := range ls {
		if l.Type() == "tuntap" || l.Attrs().Alias == "basalt:bs:tap" {
			out[l.Attrs().Name] = l.Attrs().Index
		}
	}
	return out, nil
}
