package cli

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"
)

const aclSyntax = `[ID=]DIRECTION,ACTION,PROTOCOL[,CIDR[,PORTS]]
  DIRECTION  in (to the VM; CIDR is the source) or out (from the VM; CIDR is the destination)
  ACTION     allow or deny
  PROTOCOL   any, tcp, udp or icmp (ICMPv6 for IPv6)
  CIDR       a prefix or an address (10.0.0.0/24, fd00::5), or any (the default)
  PORTS      destination port or range for tcp/udp: 22, 1024-65535 (default: all)
  ID         names the rule's counter (default: its position, 0, 1, ...)
Rules are stateless and evaluated in order, the first match wins; a packet that matches no rule is allowed
(end with 'in,deny,any' for default-deny, and allow the return traffic of your own connections explicitly).`

func (a *app) portCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "port",
		Short: "Create, inspect, change and delete ports (VM NICs) of virtual networks",
		Long: `A port is a VM NIC on a virtual network: a MAC, addresses, the host it lives on, and a policy that netd
enforces on that host (spoofing and DHCP guards, ACLs with counters, isolation, mirroring, bandwidth). Moving
a VM to another host is 'basalt port set NETWORK PORT --host NODE': the port keeps its MAC and addresses.

ACL rules are written
  ` + strings.ReplaceAll(aclSyntax, "\n", "\n  "),
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(a.portCreateCmd(), a.portListCmd(), a.portGetCmd(), a.portSetCmd(), a.portDeleteCmd(), a.portCountersCmd())
	return cmd
}

// policyFlags are the flags shared by create and set.
type policyFlags struct {
	ips                     []string
	host, mirrorTo, ext     string
	acl                     []string
	noSpoof, noDHCP         bool
	spoof, dhcp             bool
	isolated, promiscuous   bool
	maxRate, minRate        string
	clearACL, clearMirror   bool
	clearHost, clearBWLimit bool
}

func (pf *policyFlags) register(cmd *cobra.Command, create bool) {
	f := cmd.Flags()
	f.StringArrayVar(&pf.ips, "ip", nil, "address of the port, IPv4 or IPv6 (repeat for several)")
	f.StringVar(&pf.host, "host", "", "node ID of the netd on the host the port lives on")
	f.StringArrayVar(&pf.acl, "acl", nil, "ACL rule "+strings.SplitN(aclSyntax, "\n", 2)[0]+" (repeat, in order; see 'basalt port --help')")
	f.BoolVar(&pf.isolated, "isolated", false, "isolated port: talks only to promiscuous ports and the gateway")
	f.BoolVar(&pf.promiscuous, "promiscuous", false, "promiscuous port: talks to every port, isolated or not")
	f.StringVar(&pf.mirrorTo, "mirror-to", "", "copy the port's traffic to this port of the same network")
	f.StringVar(&pf.maxRate, "max-bandwidth", "", "cap on what the VM sends and on what it receives, in bit/s: 100M, 1.5G")
	f.StringVar(&pf.minRate, "min-bandwidth", "", "share of the host's uplink guaranteed to what the VM sends, in bit/s")
	f.StringVar(&pf.ext, "extension", "", "name of a netd extension to place in the port's path")
	if create {
		f.BoolVar(&pf.noSpoof, "no-spoof-guard", false, "let the VM send from any MAC and address")
		f.BoolVar(&pf.noDHCP, "no-dhcp-guard", false, "let the VM answer DHCP and send router advertisements")
		return
	}
	f.BoolVar(&pf.spoof, "spoof-guard", true, "drop frames from foreign MACs and addresses")
	f.BoolVar(&pf.dhcp, "dhcp-guard", true, "drop DHCP server replies and router advertisements from the VM")
	f.BoolVar(&pf.clearACL, "clear-acl", false, "remove every ACL rule")
	f.BoolVar(&pf.clearMirror, "no-mirror", false, "stop mirroring")
	f.BoolVar(&pf.clearHost, "unbind", false, "bind the port to no host")
	f.BoolVar(&pf.clearBWLimit, "no-bandwidth", false, "remove both bandwidth settings")
}

// apply sets on p what the flags say; with changedOnly (port set) only the flags given on the command line.
func (pf *policyFlags) apply(p *basaltv1.Port, cmd *cobra.Command, changedOnly bool) error {
	f := cmd.Flags()
	set := func(name string) bool { return !changedOnly || f.Changed(name) }
	if p.Policy == nil {
		p.Policy = &basaltv1.PortPolicy{}
	}
	pol := p.Policy
	if set("ip") {
		p.Ips = pf.ips
	}
	if set("host") {
		p.Host = pf.host
	}
	if pf.clearHost {
		p.Host = ""
	}
	if pf.clearACL {
		pol.Acl = nil
	}
	if set("acl") && len(pf.acl) > 0 || !changedOnly {
		rules := make([]*basaltv1.AclRule, 0, len(pf.acl))
		for _, s := range pf.acl {
			r, err := parseACL(s)
			if err != nil {
				return usageError{fmt.Errorf("--acl: %w", err)}
			}
			rules = append(rules, r)
		}
		pol.Acl = rules
	}
	if set("isolated") {
		pol.Isolated = pf.isolated
	}
	if set("promiscuous") {
		pol.Promiscuous = pf.promiscuous
	}
	if set("mirror-to") {
		pol.MirrorTo = pf.mirrorTo
	}
	if pf.clearMirror {
		pol.MirrorTo = ""
	}
	for _, r := range []struct {
		flag, val string
		dst       *uint64
	}{{"max-bandwidth", pf.maxRate, &pol.BandwidthMaxBps}, {"min-bandwidth", pf.minRate, &pol.BandwidthMinBps}} {
		if !set(r.flag) || r.val == "" {
			continue
		}
		v, err := parseRate(r.val)
		if err != nil {
			return usageError{fmt.Errorf("--%s: %w", r.flag, err)}
		}
		*r.dst = v
	}
	if pf.clearBWLimit {
		pol.BandwidthMaxBps, pol.BandwidthMinBps = 0, 0
	}
	if set("extension") {
		pol.Extension = pf.ext
	}
	if changedOnly {
		if f.Changed("spoof-guard") {
			pol.SpoofGuard = proto.Bool(pf.spoof)
		}
		if f.Changed("dhcp-guard") {
			pol.DhcpGuard = proto.Bool(pf.dhcp)
		}
	} else {
		// Unset means "on" for the API; only say something when the user turned a guard off.
		if pf.noSpoof {
			pol.SpoofGuard = proto.Bool(false)
		}
		if pf.noDHCP {
			pol.DhcpGuard = proto.Bool(false)
		}
	}
	return nil
}

func (a *app) portCreateCmd() *cobra.Command {
	var pf policyFlags
	var mac, tap string
	cmd := &cobra.Command{
		Use:   "create NETWORK NAME",
		Short: "Create a port on a network",
		Example: `  basalt port create red web1 --ip 10.0.0.5 --host netd-h1
  basalt port create red db1 --ip 10.0.0.6 --host netd-h2 --acl 'ssh=in,allow,tcp,10.0.0.0/24,22' --acl 'in,deny,tcp'
  basalt port create red probe --ip 10.0.0.250 --host netd-h1 --promiscuous --no-spoof-guard`,
		Args: exactArgs(2, "a network name and a port name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			p := &basaltv1.Port{Network: args[0], Name: args[1], Mac: mac, Tap: tap}
			if err := pf.apply(p, cmd, false); err != nil {
				return err
			}
			var out *basaltv1.Port
			err := a.networks(cmd.Context(), func(ctx context.Context, c basaltv1.NetworkServiceClient) (err error) {
				out, err = c.CreatePort(ctx, &basaltv1.CreatePortRequest{Port: p})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "port %s/%s created: MAC %s, addresses %s, tap %s, host %s\n", out.GetNetwork(), out.GetName(), out.GetMac(),
				listOr(out.GetIps(), "none"), out.GetTap(), orNone(out.GetHost()))
			return nil
		},
	}
	pf.register(cmd, true)
	cmd.Flags().StringVar(&mac, "mac", "", "MAC address (default: a random 52:54:00:xx:xx:xx)")
	cmd.Flags().StringVar(&tap, "tap", "", "host interface name the hypervisor attaches to (default: bt + 8 hex digits)")
	return cmd
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

func (a *app) portListCmd() *cobra.Command {
	var network, host string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List ports",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var resp *basaltv1.ListPortsResponse
			err := a.networks(cmd.Context(), func(ctx context.Context, c basaltv1.NetworkServiceClient) (err error) {
				resp, err = c.ListPorts(ctx, &basaltv1.ListPortsRequest{Network: network, Host: host})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(resp, func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "NETWORK\tNAME\tMAC\tADDRESSES\tHOST\tTAP\tPOLICY")
				for _, p := range resp.GetPorts() {
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.GetNetwork(), p.GetName(), p.GetMac(), listOr(p.GetIps(), "-"),
						orNone(p.GetHost()), p.GetTap(), policySummary(p.GetPolicy()))
				}
			})
		},
	}
	cmd.Flags().StringVar(&network, "network", "", "only the ports of this network")
	cmd.Flags().StringVar(&host, "host", "", "only the ports bound to this node")
	return cmd
}

// policySummary is a one-word-per-feature summary for tables.
func policySummary(p *basaltv1.PortPolicy) string {
	var parts []string
	if p.GetSpoofGuard() {
		parts = append(parts, "spoof-guard")
	}
	if p.GetDhcpGuard() {
		parts = append(parts, "dhcp-guard")
	}
	if p.GetIsolated() {
		parts = append(parts, "isolated")
	}
	if p.GetPromiscuous() {
		parts = append(parts, "promiscuous")
	}
	if n := len(p.GetAcl()); n > 0 {
		parts = append(parts, fmt.Sprintf("acl:%d", n))
	}
	if m := p.GetMirrorTo(); m != "" {
		parts = append(parts, "mirror:"+m)
	}
	if v := p.GetBandwidthMaxBps(); v != 0 {
		parts = append(parts, "max:"+rateString(v))
	}
	if v := p.GetBandwidthMinBps(); v != 0 {
		parts = append(parts, "min:"+rateString(v))
	}
	if e := p.GetExtension(); e != "" {
		parts = append(parts, "ext:"+e)
	}
	return listOr(parts, "-")
}

func (a *app) getPort(ctx context.Context, network, name string) (*basaltv1.Port, error) {
	var p *basaltv1.Port
	err := a.networks(ctx, func(ctx context.Context, c basaltv1.NetworkServiceClient) (err error) {
		p, err = c.GetPort(ctx, &basaltv1.GetPortRequest{Network: network, Name: name})
		return err
	})
	return p, err
}

func (a *app) portGetCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "get NETWORK NAME",
		Aliases: []string{"inspect"},
		Short:   "Show a port",
		Args:    exactArgs(2, "a network name and a port name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := a.getPort(cmd.Context(), args[0], args[1])
			if err != nil {
				return err
			}
			return a.print(p, func(w *tabwriter.Writer) {
				pol := p.GetPolicy()
				fmt.Fprintf(w, "Port:\t%s/%s\n", p.GetNetwork(), p.GetName())
				fmt.Fprintf(w, "MAC:\t%s\n", p.GetMac())
				fmt.Fprintf(w, "Addresses:\t%s\n", listOr(p.GetIps(), "none"))
				fmt.Fprintf(w, "Host:\t%s\n", orNone(p.GetHost()))
				fmt.Fprintf(w, "Tap:\t%s\n", p.GetTap())
				fmt.Fprintf(w, "Spoofing guard:\t%s\n", onOff(pol.GetSpoofGuard()))
				fmt.Fprintf(w, "DHCP guard:\t%s\n", onOff(pol.GetDhcpGuard()))
				class := "normal"
				if pol.GetIsolated() {
					class = "isolated"
				} else if pol.GetPromiscuous() {
					class = "promiscuous"
				}
				fmt.Fprintf(w, "Isolation:\t%s\n", class)
				fmt.Fprintf(w, "Mirror to:\t%s\n", orNone(pol.GetMirrorTo()))
				fmt.Fprintf(w, "Bandwidth:\tmax %s, min %s\n", rateOrNone(pol.GetBandwidthMaxBps()), rateOrNone(pol.GetBandwidthMinBps()))
				fmt.Fprintf(w, "Extension:\t%s\n", orNone(pol.GetExtension()))
				fmt.Fprintf(w, "ACL:\t%d rules\n", len(pol.GetAcl()))
				for i, r := range pol.GetAcl() {
					fmt.Fprintf(w, "  %d\t%s\n", i, formatACL(r))
				}
				fmt.Fprintf(w, "Created:\t%s\n", p.GetCreatedAt().AsTime().Local().Format(time.RFC3339))
			})
		},
	}
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func rateOrNone(v uint64) string {
	if v == 0 {
		return "none"
	}
	return rateString(v)
}

func (a *app) portSetCmd() *cobra.Command {
	var pf policyFlags
	cmd := &cobra.Command{
		Use:   "set NETWORK NAME [flags]",
		Short: "Change a port's host, addresses or policy",
		Long: `set changes only what its flags name; --acl replaces every ACL rule. The change applies only if nobody
changed the port since it was read (otherwise run it again).`,
		Example: `  basalt port set red web1 --host netd-h2                # move the port (live migration)
  basalt port set red web1 --acl 'in,allow,icmp' --acl 'in,deny,any'
  basalt port set red web1 --max-bandwidth 100M --mirror-to probe`,
		Args: exactArgs(2, "a network name and a port name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !anyChanged(cmd, "ip", "host", "acl", "isolated", "promiscuous", "mirror-to", "max-bandwidth", "min-bandwidth",
				"extension", "spoof-guard", "dhcp-guard", "clear-acl", "no-mirror", "unbind", "no-bandwidth") {
				return usageError{fmt.Errorf("%s: nothing to change (see '%s --help')", cmd.CommandPath(), cmd.CommandPath())}
			}
			p, err := a.getPort(cmd.Context(), args[0], args[1])
			if err != nil {
				return err
			}
			if err := pf.apply(p, cmd, true); err != nil {
				return err
			}
			var out *basaltv1.Port
			err = a.networks(cmd.Context(), func(ctx context.Context, c basaltv1.NetworkServiceClient) (err error) {
				out, err = c.UpdatePort(ctx, &basaltv1.UpdatePortRequest{Port: p, Revision: p.GetRevision()})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "port %s/%s updated: addresses %s, host %s, policy %s\n", out.GetNetwork(), out.GetName(),
				listOr(out.GetIps(), "none"), orNone(out.GetHost()), policySummary(out.GetPolicy()))
			return nil
		},
	}
	pf.register(cmd, false)
	return cmd
}

func anyChanged(cmd *cobra.Command, names ...string) bool {
	for _, n := range names {
		if cmd.Flags().Changed(n) {
			return true
		}
	}
	return false
}

func (a *app) portDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "delete NETWORK NAME",
		Short: "Delete a port",
		Args:  exactArgs(2, "a network name and a port name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			err := a.networks(cmd.Context(), func(ctx context.Context, c basaltv1.NetworkServiceClient) error {
				_, err := c.DeletePort(ctx, &basaltv1.DeletePortRequest{Network: args[0], Name: args[1]})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "port %s/%s deleted\n", args[0], args[1])
			return nil
		},
	}
}

func (a *app) portCountersCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "counters NETWORK NAME",
		Short: "Show a port's policy and traffic counters, read live on its host",
		Args:  exactArgs(2, "a network name and a port name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var c *basaltv1.PortCounters
			err := a.networks(cmd.Context(), func(ctx context.Context, nc basaltv1.NetworkServiceClient) (err error) {
				c, err = nc.GetPortCounters(ctx, &basaltv1.GetPortCountersRequest{Network: args[0], Name: args[1]})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(c, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "Port %s/%s on %s\n", c.GetNetwork(), c.GetName(), c.GetHost())
				fmt.Fprintln(w, "COUNTER\tPACKETS\tBYTES")
				row := func(name string, ctr *basaltv1.Counter) {
					fmt.Fprintf(w, "%s\t%d\t%d\n", name, ctr.GetPackets(), ctr.GetBytes())
				}
				row("from VM", c.GetFromVm())
				row("to VM", c.GetToVm())
				row("spoofing dropped", c.GetSpoofDrops())
				row("DHCP dropped", c.GetDhcpDrops())
				row("isolation dropped", c.GetIsolationDrops())
				for _, r := range c.GetAcl() {
					fmt.Fprintf(w, "acl %s\t%d\t%d\n", r.GetId(), r.GetPackets(), r.GetBytes())
				}
			})
		},
	}
}

var aclIDRE = regexp.MustCompile(`^[A-Za-z0-9_.:\-]{1,64}$`)

// parseACL reads one rule in the syntax of aclSyntax. Errors name the field at fault and what it may be.
func parseACL(s string) (*basaltv1.AclRule, error) {
	r := &basaltv1.AclRule{}
	body := strings.TrimSpace(s)
	if i := strings.IndexByte(body, '='); i >= 0 && !strings.Contains(body[:i], ",") {
		r.Id, body = body[:i], body[i+1:]
		if !aclIDRE.MatchString(r.Id) {
			return nil, fmt.Errorf("rule %q: ID %q must be 1 to 64 of A-Z a-z 0-9 _ . : -", s, r.Id)
		}
	}
	f := strings.Split(body, ",")
	if len(f) < 3 || len(f) > 5 {
		return nil, fmt.Errorf("rule %q has %d fields; want %s", s, len(f), strings.SplitN(aclSyntax, "\n", 2)[0])
	}
	for i := range f {
		f[i] = strings.ToLower(strings.TrimSpace(f[i]))
	}
	bad := func(n int, want string) error {
		return fmt.Errorf("rule %q, field %d %q: %s", s, n+1, f[n], want)
	}
	switch f[0] {
	case "in":
		r.Direction = basaltv1.AclDirection_ACL_DIRECTION_IN
	case "out":
		r.Direction = basaltv1.AclDirection_ACL_DIRECTION_OUT
	default:
		return nil, bad(0, "the direction must be in or out")
	}
	switch f[1] {
	case "allow":
		r.Action = basaltv1.AclAction_ACL_ACTION_ALLOW
	case "deny":
		r.Action = basaltv1.AclAction_ACL_ACTION_DENY
	default:
		return nil, bad(1, "the action must be allow or deny")
	}
	switch f[2] {
	case "any":
		r.Protocol = basaltv1.AclProtocol_ACL_PROTOCOL_ANY
	case "tcp":
		r.Protocol = basaltv1.AclProtocol_ACL_PROTOCOL_TCP
	case "udp":
		r.Protocol = basaltv1.AclProtocol_ACL_PROTOCOL_UDP
	case "icmp", "icmpv6":
		r.Protocol = basaltv1.AclProtocol_ACL_PROTOCOL_ICMP
	default:
		return nil, bad(2, "the protocol must be any, tcp, udp or icmp")
	}
	if len(f) > 3 && f[3] != "any" && f[3] != "" {
		p, err := netip.ParsePrefix(f[3])
		if err != nil {
			a, aerr := netip.ParseAddr(f[3])
			if aerr != nil {
				return nil, bad(3, "not a CIDR prefix (10.0.0.0/24), an address or any")
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if p != p.Masked() {
			return nil, bad(3, fmt.Sprintf("host bits are set: did you mean %s?", p.Masked()))
		}
		r.Cidr = p.String()
	}
	if len(f) > 4 && f[4] != "" && f[4] != "any" {
		if r.Protocol != basaltv1.AclProtocol_ACL_PROTOCOL_TCP && r.Protocol != basaltv1.AclProtocol_ACL_PROTOCOL_UDP {
			return nil, bad(4, "ports need protocol tcp or udp")
		}
		lo, hi, isRange := strings.Cut(f[4], "-")
		min, err := strconv.ParseUint(lo, 10, 16)
		max := min
		if err == nil && isRange {
			max, err = strconv.ParseUint(hi, 10, 16)
		}
		if err != nil || min == 0 || min > max {
			return nil, bad(4, "want a port (22) or a range (1024-65535) between 1 and 65535")
		}
		r.PortMin, r.PortMax = uint32(min), uint32(max)
	}
	return r, nil
}

// formatACL writes a rule back in the syntax parseACL reads.
func formatACL(r *basaltv1.AclRule) string {
	var b strings.Builder
	if r.GetId() != "" {
		b.WriteString(r.GetId() + "=")
	}
	dir := strings.ToLower(strings.TrimPrefix(r.GetDirection().String(), "ACL_DIRECTION_"))
	act := strings.ToLower(strings.TrimPrefix(r.GetAction().String(), "ACL_ACTION_"))
	prot := strings.ToLower(strings.TrimPrefix(r.GetProtocol().String(), "ACL_PROTOCOL_"))
	fmt.Fprintf(&b, "%s,%s,%s", dir, act, prot)
	cidr := r.GetCidr()
	if cidr == "" {
		cidr = "any"
	}
	switch {
	case r.GetPortMin() != 0 && r.GetPortMin() == r.GetPortMax():
		fmt.Fprintf(&b, ",%s,%d", cidr, r.GetPortMin())
	case r.GetPortMin() != 0:
		fmt.Fprintf(&b, ",%s,%d-%d", cidr, r.GetPortMin(), r.GetPortMax())
	case r.GetCidr() != "":
		fmt.Fprintf(&b, ",%s", cidr)
	}
	return b.String()
}

// parseRate reads a bit rate with an optional decimal unit: 500000, 800k, 100M, 1.5G, 10Gbit, 10Gbps.
func parseRate(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	for _, suffix := range []string{"bit/s", "bps", "bit", "b/s"} {
		if len(t) > len(suffix) && strings.EqualFold(t[len(t)-len(suffix):], suffix) {
			t = t[:len(t)-len(suffix)]
			break
		}
	}
	mult := 1.0
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'k', 'K':
			mult, t = 1e3, t[:n-1]
		case 'm', 'M':
			mult, t = 1e6, t[:n-1]
		case 'g', 'G':
			mult, t = 1e9, t[:n-1]
		case 't', 'T':
			mult, t = 1e12, t[:n-1]
		}
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || f <= 0 {
		return 0, fmt.Errorf("%q is not a positive bit rate (examples: 800k, 100M, 1.5G)", s)
	}
	v := f * mult
	if v >= 1<<63 || v != float64(uint64(v)) {
		return 0, fmt.Errorf("%q is not a whole number of bits per second", s)
	}
	return uint64(v), nil
}

// rateString formats a bit rate with the largest decimal unit that divides it.
func rateString(v uint64) string {
	for _, u := range []struct {
		div  uint64
		unit string
	}{{1e12, "T"}, {1e9, "G"}, {1e6, "M"}, {1e3, "k"}} {
		if v >= u.div && v%u.div == 0 {
			return fmt.Sprintf("%d%sbit/s", v/u.div, u.unit)
		}
	}
	return fmt.Sprintf("%dbit/s", v)
}
