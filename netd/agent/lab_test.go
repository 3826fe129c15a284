package agent

// Test harness: a real embedded etcd, the real NetworkServer writing to it, a netlab (hosts as namespaces on
// an underlay bridge, VMs as namespaces on veths) and one Agent + Plane per host, in-process, each programming
// its host's namespace. Cleanups run in reverse: agents stop before the namespaces are deleted.

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/api"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/store"
	"github.com/basalt-hv/basalt/netd/dataplane"
	"github.com/basalt-hv/basalt/netd/netlab"
	"github.com/vishvananda/netns"
	"google.golang.org/grpc"
)

var (
	labSeq   atomic.Int32
	skipOnce sync.Once
	skipWhy  error
)

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

func testLogger(t *testing.T, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: level}))
}

type env struct {
	t     *testing.T
	ctx   context.Context
	lab   *netlab.Lab
	store *store.Store
	api   *api.NetworkServer
	nodes map[*netlab.Host]*node
}

// node is one host's running netd: agent, plane, and its gRPC server (NetdService) registered in the cluster.
type node struct {
	id    string
	host  *netlab.Host
	agent *Agent
	plane *dataplane.Plane
	stop  func()
}

func newEnv(t *testing.T, hosts int) *env {
	t.Helper()
	skipOnce.Do(func() { skipWhy = netlab.Check() })
	if skipWhy != nil {
		t.Skip(skipWhy)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	e := etcdtest.Start(t, "")
	s := store.New(e.Client(t))
	if _, err := registry.InitCluster(ctx, s); err != nil {
		t.Fatal(err)
	}
	lab, err := netlab.New(fmt.Sprintf("bsag%d-%d", os.Getpid()%100000, labSeq.Add(1)), hosts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := lab.Close(); err != nil {
			t.Error(err)
		}
	})
	return &env{t: t, ctx: ctx, lab: lab, store: s, api: &api.NetworkServer{Store: s}, nodes: map[*netlab.Host]*node{}}
}

// start runs netd for host h (node ID "h<i>"): a Plane on its namespace, an Agent, and a gRPC server serving
// NetdService, registered in the cluster so that metad's GetPortCounters finds it.
func (e *env) start(h *netlab.Host) *node {
	t := e.t
	t.Helper()
	id := strings.TrimPrefix(h.Name, e.lab.ID+"-")
	gwNS := h.Name + "-gw"
	plane, err := dataplane.New(dataplane.Options{NetNS: h.Handle, GatewayNetNS: gwNS, Logger: testLogger(t, slog.LevelWarn), NFTTrust: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { deleteNamedNS(t, gwNS+"-") })
	a, err := New(Config{NodeID: id, Store: e.store, Plane: plane, NetNS: h.Handle, UnderlayDev: "eth0", Logger: testLogger(t, slog.LevelWarn)})
	if err != nil {
		plane.Close()
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	basaltv1.RegisterNetdServiceServer(srv, a)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	reg, err := registry.Register(e.ctx, e.store, &basaltv1.Node{Id: id, Kind: basaltv1.NodeKind_NODE_KIND_NETD, GrpcAddress: l.Addr().String()}, "test", 5*time.Second, testLogger(t, slog.LevelWarn))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	n := &node{id: id, host: h, agent: a, plane: plane}
	var once sync.Once
	n.stop = func() {
		once.Do(func() {
			reg.Close(context.Background())
			srv.Stop()
			cancel()
			<-done
			a.Close()
			plane.Close()
		})
	}
	t.Cleanup(n.stop)
	e.nodes[h] = n
	return n
}

// deleteNamedNS deletes the named namespaces whose names start with prefix (gateways a plane created).
func deleteNamedNS(t *testing.T, prefix string) {
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix) {
			if err := netns.DeleteNamed(e.Name()); err != nil {
				t.Errorf("delete namespace %s: %v", e.Name(), err)
			}
		}
	}
}

// waitPorts waits until the node applied a state with exactly these local ports, and they forward.
func (e *env) waitPorts(n *node, ports ...string) {
	e.t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		st, _, next := n.agent.Applied()
		if st != nil && samePorts(st, ports) {
			for _, p := range st.Ports {
				ctx, cancel := context.WithTimeout(e.ctx, 5*time.Second)
				err := n.host.WaitForwarding(ctx, p.Tap)
				cancel()
				if err != nil {
					e.t.Fatal(err)
				}
			}
			return
		}
		select {
		case <-next:
		case <-deadline:
			e.t.Fatalf("%s did not apply ports %v; applied %v", n.id, ports, describe(st))
		}
	}
}

func samePorts(st *dataplane.HostState, want []string) bool {
	if len(st.Ports) != len(want) {
		return false
	}
	have := map[string]bool{}
	for _, p := range st.Ports {
		have[p.Name] = true
	}
	for _, w := range want {
		if !have[w] {
			return false
		}
	}
	return true
}

func describe(st *dataplane.HostState) string {
	if st == nil {
		return "nothing"
	}
	var names []string
	for _, p := range st.Ports {
		names = append(names, p.Name)
	}
	return fmt.Sprintf("ports %v, %d remote", names, len(st.Remote))
}

func (e *env) network(name, tenant string, vni uint32, subnets ...string) *basaltv1.Network {
	e.t.Helper()
	n, err := e.api.CreateNetwork(e.ctx, &basaltv1.CreateNetworkRequest{Network: &basaltv1.Network{Name: name, Tenant: tenant, Vni: vni, Subnets: subnets}})
	if err != nil {
		e.t.Fatal(err)
	}
	return n
}

// vm creates a VM namespace plugged into h and its port in etcd, bound to h's node.
func (e *env) vm(h *netlab.Host, network, name, mac, ip string, pol *basaltv1.PortPolicy) *netlab.VM {
	e.t.Helper()
	tap := "t" + name
	hw, err := net.ParseMAC(mac)
	if err != nil {
		e.t.Fatal(err)
	}
	v, err := e.lab.AddVM(h, network+"-"+name, tap, hw, netip.MustParsePrefix(ip+"/24"))
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := e.api.CreatePort(e.ctx, &basaltv1.CreatePortRequest{Port: &basaltv1.Port{
		Network: network, Name: name, Mac: mac, Ips: []string{ip}, Host: e.nodeID(h), Tap: tap, Policy: pol,
	}}); err != nil {
		e.t.Fatal(err)
	}
	return v
}

func (e *env) nodeID(h *netlab.Host) string { return strings.TrimPrefix(h.Name, e.lab.ID+"-") }

func (e *env) mustPing(from *netlab.VM, dst string) {
	e.t.Helper()
	if out, err := from.Run(e.ctx, "busybox", "ping", "-q", "-c", "3", "-i", "0.2", "-W", "1", dst); err != nil {
		neigh, _ := from.Run(e.ctx, "ip", "neigh")
		e.t.Fatalf("%s cannot reach %s: %v\n%s\nneighbours: %s", from.Name, dst, err, out, neigh)
	}
}

func (e *env) mustNotPing(from *netlab.VM, dst string) {
	e.t.Helper()
	if from.Ping(e.ctx, 2, dst) {
		e.t.Fatalf("%s reaches %s but must not", from.Name, dst)
	}
}

func (e *env) updatePort(network, name string, mut func(*basaltv1.Port)) *basaltv1.Port {
	e.t.Helper()
	p, err := e.api.GetPort(e.ctx, &basaltv1.GetPortRequest{Network: network, Name: name})
	if err != nil {
		e.t.Fatal(err)
	}
	mut(p)
	p, err = e.api.UpdatePort(e.ctx, &basaltv1.UpdatePortRequest{Port: p, Revision: p.GetRevision()})
	if err != nil {
		e.t.Fatal(err)
	}
	return p
}
