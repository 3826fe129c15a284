// Package netbench measures netd in network namespaces (docs/benchmarks.md, "netd"):
//
//   - Throughput: iperf3 TCP goodput between two VMs on two hosts over VXLAN with every policy on (spoofing
//     and DHCP guards, isolation sets, an ACL that each packet walks to its end), against two namespaces
//     joined by a plain veth pair; the ratio is the cost of the virtual network. The two hosts are joined by
//     one veth (a cable), not through a bridge in a third namespace: the tests' stand-in for a switch would
//     charge the hosts' CPUs for forwarding a real switch does.
//   - Convergence: how long netd takes to bring a host to the declared state with many ports (1,000 by
//     default): on a fresh host, after a restart with nothing changed, and after a restart with some changes.
//
// Everything runs in namespaces built by netd/netlab (deleted at the end, also on error) against an embedded
// etcd in a temporary directory. It depends on the netd packages, metad's etcd server, store, registry and
// API, and runs iperf3.
package netbench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os/exec"
	"sort"
	"strings"
	"time"

	"github.com/basalt-hv/basalt/netd/dataplane"
	"github.com/basalt-hv/basalt/netd/netlab"
	"github.com/vishvananda/netlink"
)

// ThroughputOptions configure Throughput.
type ThroughputOptions struct {
	// LabID starts every namespace name; unique on the machine.
	LabID string
	// Seconds per iperf3 run, Streams parallel TCP streams, Runs runs per path (the median is kept).
	Seconds, Streams, Runs int
	// ACLRules is the length of the ACL every packet walks (the last rule matches).
	ACLRules int
	Logger   *slog.Logger
}

// ThroughputResult is the median goodput of both paths, in bit/s.
type ThroughputResult struct {
	Veth, VXLAN float64
	// Bare is the VXLAN path without any policy (no guard, no ACL, promiscuous ports): the overlay's own cost.
	Bare float64
	// All runs, for the report: run i of each path ran back to back.
	VethRuns, VXLANRuns, BareRuns []float64
	Options                       ThroughputOptions
}

// Ratio is the median of the runs' VXLAN/veth ratios: each pair ran back to back, so a change in the
// machine's load between runs does not skew it the way a ratio of medians would be.
func (r ThroughputResult) Ratio() float64 {
	return ratio(r.VXLANRuns, r.VethRuns)
}

// BareRatio is Ratio for the VXLAN path without policy.
func (r ThroughputResult) BareRatio() float64 { return ratio(r.BareRuns, r.VethRuns) }

func ratio(a, b []float64) float64 {
	ratios := make([]float64, len(b))
	for i := range b {
		ratios[i] = a[i] / b[i]
	}
	return median(ratios)
}

// Throughput measures both paths.
func Throughput(ctx context.Context, o ThroughputOptions) (_ ThroughputResult, err error) {
	if o.Seconds <= 0 {
		o.Seconds = 5
	}
	if o.Streams <= 0 {
		o.Streams = 1
	}
	if o.Runs <= 0 {
		o.Runs = 3
	}
	if o.ACLRules <= 0 {
		o.ACLRules = 10
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	res := ThroughputResult{Options: o}
	if _, err := exec.LookPath("iperf3"); err != nil {
		return res, errors.New("iperf3 is not installed (Debian package iperf3)")
	}
	lab, err := netlab.NewPair(o.LabID)
	if err != nil {
		return res, err
	}
	defer func() { err = errors.Join(err, lab.Close()) }()

	// The baseline: two namespaces joined by one veth pair, same MTU as the VMs.
	p1, err := lab.NewNS("v1")
	if err != nil {
		return res, err
	}
	p2, err := lab.NewNS("v2")
	if err != nil {
		return res, err
	}
	la := netlink.NewLinkAttrs()
	la.Name, la.MTU = "eth0", 1450
	if err := p1.NL.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(p2.Handle))}); err != nil {
		return res, fmt.Errorf("veth pair: %w", err)
	}
	for i, ns := range []*netlab.NS{p1, p2} {
		l, err := ns.NL.LinkByName("eth0")
		if err != nil {
			return res, err
		}
		if err := ns.NL.LinkSetMTU(l, 1450); err != nil {
			return res, err
		}
		if err := ns.NL.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 9, 0, byte(i+1)), Mask: net.CIDRMask(24, 32)}}); err != nil {
			return res, err
		}
		if err := ns.NL.LinkSetUp(l); err != nil {
			return res, err
		}
	}

	// The virtual network: two hosts; VMs a and b with every policy on, c and d (the same path) with none.
	h1, h2 := lab.Hosts[0], lab.Hosts[1]
	mac := func(i byte) net.HardwareAddr { return net.HardwareAddr{0x52, 0x54, 0, 0, 0, i} }
	vm := func(h *netlab.Host, name string, i byte) (*netlab.VM, error) {
		return lab.AddVM(h, name, "tp"+name, mac(i), netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, 0, i}), 24))
	}
	a, err := vm(h1, "a", 1)
	if err != nil {
		return res, err
	}
	b, err := vm(h2, "b", 2)
	if err != nil {
		return res, err
	}
	c, err := vm(h1, "c", 3)
	if err != nil {
		return res, err
	}
	d, err := vm(h2, "d", 4)
	if err != nil {
		return res, err
	}
	nw := []dataplane.Network{{Name: "bench", VNI: 100}}
	full := dataplane.PortPolicy{SpoofGuard: true, DHCPGuard: true}
	for i := range o.ACLRules - 1 {
		full.ACL = append(full.ACL, dataplane.ACLRule{ID: fmt.Sprintf("r%d", i), Direction: dataplane.In, Protocol: dataplane.UDP,
			CIDR: netip.MustParsePrefix(fmt.Sprintf("172.16.%d.0/24", i)), PortMin: 1000, PortMax: 2000, Action: dataplane.Deny})
	}
	full.ACL = append(full.ACL, dataplane.ACLRule{ID: "tcp", Direction: dataplane.In, Protocol: dataplane.TCP, CIDR: netip.MustParsePrefix("10.0.0.0/24"), Action: dataplane.Allow})
	none := dataplane.PortPolicy{Promiscuous: true}
	port := func(v *netlab.VM, pol dataplane.PortPolicy) dataplane.Port {
		return dataplane.Port{Network: "bench", Name: v.Name, MAC: v.MAC, IPs: []netip.Addr{v.IP()}, Tap: v.Tap, Policy: pol}
	}
	remote := func(v *netlab.VM, pol dataplane.PortPolicy) dataplane.RemotePort {
		return dataplane.RemotePort{Network: "bench", MAC: v.MAC, IPs: []netip.Addr{v.IP()}, HostVTEP: v.Host.IP, Promiscuous: pol.Promiscuous}
	}
	for i, h := range []*netlab.Host{h1, h2} {
		local, other := []*netlab.VM{a, c}, []*netlab.VM{b, d}
		if i == 1 {
			local, other = other, local
		}
		p, err := dataplane.New(dataplane.Options{NetNS: h.Handle, GatewayNetNS: h.Name + "-gw", Logger: o.Logger})
		if err != nil {
			return res, err
		}
		defer p.Close()
		st := dataplane.HostState{UnderlayIP: h.IP, UnderlayDev: "eth0", Networks: nw,
			Ports:  []dataplane.Port{port(local[0], full), port(local[1], none)},
			Remote: []dataplane.RemotePort{remote(other[0], full), remote(other[1], none)}}
		if err := p.Apply(ctx, st); err != nil {
			return res, err
		}
		for _, v := range local {
			if err := h.WaitForwarding(ctx, v.Tap); err != nil {
				return res, err
			}
		}
	}
	if !a.Ping(ctx, 3, "10.0.0.2") || !c.Ping(ctx, 3, "10.0.0.4") {
		return res, errors.New("the VMs cannot reach each other over VXLAN")
	}
	for range o.Runs {
		v, err := iperf(ctx, p1, p2, "10.9.0.2", o.Seconds, o.Streams)
		if err != nil {
			return res, fmt.Errorf("veth: %w", err)
		}
		x, err := iperf(ctx, a.NS, b.NS, "10.0.0.2", o.Seconds, o.Streams)
		if err != nil {
			return res, fmt.Errorf("vxlan: %w", err)
		}
		n, err := iperf(ctx, c.NS, d.NS, "10.0.0.4", o.Seconds, o.Streams)
		if err != nil {
			return res, fmt.Errorf("vxlan without policy: %w", err)
		}
		o.Logger.Info("throughput run", "veth_gbps", v/1e9, "vxlan_gbps", x/1e9, "bare_vxlan_gbps", n/1e9)
		res.VethRuns, res.VXLANRuns, res.BareRuns = append(res.VethRuns, v), append(res.VXLANRuns, x), append(res.BareRuns, n)
	}
	res.Veth, res.VXLAN, res.Bare = median(res.VethRuns), median(res.VXLANRuns), median(res.BareRuns)
	return res, nil
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// iperf runs one iperf3 test from src to dst (listening on ip) and returns the receiver's goodput in bit/s.
func iperf(ctx context.Context, src, dst *netlab.NS, ip string, secs, streams int) (float64, error) {
	sctx, cancel := context.WithTimeout(ctx, time.Duration(secs+30)*time.Second)
	defer cancel()
	srv := dst.Command(sctx, "iperf3", "-s", "-1", "-B", ip)
	if err := srv.Start(); err != nil {
		return 0, fmt.Errorf("start iperf3 server: %w", err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	var res struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	for try := 0; ; try++ {
		res.Error = ""
		out, err := src.Command(sctx, "iperf3", "-c", ip, "-t", fmt.Sprint(secs), "-P", fmt.Sprint(streams), "-J").Output()
		if jerr := json.Unmarshal(out, &res); jerr != nil {
			return 0, fmt.Errorf("iperf3: %v, %v", err, jerr)
		}
		if !strings.Contains(res.Error, "unable to connect") || try == 50 {
			break
		}
		time.Sleep(50 * time.Millisecond) // the server is not listening yet
	}
	if res.Error != "" {
		return 0, fmt.Errorf("iperf3: %s", res.Error)
	}
	return res.End.SumReceived.BitsPerSecond, nil
}
