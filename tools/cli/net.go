package cli

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
)

func (a *app) netCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "net",
		Aliases: []string{"network"},
		Short:   "Create, inspect and delete virtual networks",
		Long: `A virtual network is a tenant's layer-2 segment, carried between hosts over VXLAN (one VNI per network).
Networks of different tenants may use the same addresses: they never see each other. A network may have a
gateway: a router on every host with ports of the network, between its subnets and, with --nat, to the
outside through the host's uplink. VM NICs are 'basalt port's of a network.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(a.netCreateCmd(), a.netListCmd(), a.netGetCmd(), a.netDeleteCmd())
	return cmd
}

func (a *app) networks(ctx context.Context, fn func(context.Context, basaltv1.NetworkServiceClient) error) error {
	return a.call(ctx, func(ctx context.Context, c *grpc.ClientConn) error {
		return fn(ctx, basaltv1.NewNetworkServiceClient(c))
	})
}

func (a *app) netCreateCmd() *cobra.Command {
	var nw basaltv1.Network
	var gateway, nat bool
	var gwAddrs []string
	cmd := &cobra.Command{
		Use:   "create NAME --tenant TENANT",
		Short: "Create a virtual network",
		Example: `  basalt net create red --tenant acme --subnet 10.0.0.0/24
  basalt net create blue --tenant umbrella --subnet 10.0.0.0/24 --subnet fd00:1::/64 --gateway --nat
  basalt net create green --tenant acme --vni 5000 --subnet 192.168.0.0/24 --gateway-address 192.168.0.254`,
		Args: exactArgs(1, "one network name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			nw.Name = args[0]
			if gateway || nat || len(gwAddrs) > 0 {
				nw.Gateway = &basaltv1.Gateway{Addresses: gwAddrs, Nat: nat}
			}
			var out *basaltv1.Network
			err := a.networks(cmd.Context(), func(ctx context.Context, c basaltv1.NetworkServiceClient) (err error) {
				out, err = c.CreateNetwork(ctx, &basaltv1.CreateNetworkRequest{Network: &nw})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "network %s created: tenant %s, VNI %d, subnets %s, gateway %s\n", out.GetName(), out.GetTenant(),
				out.GetVni(), listOr(out.GetSubnets(), "none"), gatewayString(out.GetGateway()))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&nw.Tenant, "tenant", "", "tenant the network belongs to (required)")
	f.Uint32Var(&nw.Vni, "vni", 0, "VXLAN network identifier, 1 to 16777215 (default: the lowest free one)")
	f.StringArrayVar(&nw.Subnets, "subnet", nil, "subnet in CIDR form, IPv4 or IPv6 (repeat for several; they may not overlap)")
	f.BoolVar(&gateway, "gateway", false, "give the network a gateway routing between its subnets (at the first address of each)")
	f.StringArrayVar(&gwAddrs, "gateway-address", nil, "the gateway's address in a subnet (repeat, one per subnet; implies --gateway)")
	f.BoolVar(&nat, "nat", false, "masquerade IPv4 traffic leaving the network through each host's uplink (implies --gateway)")
	f.Uint32Var(&nw.Mtu, "mtu", 0, "MTU of the network (default: the underlay's MTU minus the VXLAN overhead)")
	cmd.MarkFlagRequired("tenant")
	return cmd
}

func listOr(l []string, none string) string {
	if len(l) == 0 {
		return none
	}
	return strings.Join(l, ",")
}

func gatewayString(g *basaltv1.Gateway) string {
	if g == nil {
		return "none"
	}
	s := strings.Join(g.GetAddresses(), ",")
	if g.GetNat() {
		s += " (nat)"
	}
	return s
}

func (a *app) netListCmd() *cobra.Command {
	var tenant string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List virtual networks",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var resp *basaltv1.ListNetworksResponse
			err := a.networks(cmd.Context(), func(ctx context.Context, c basaltv1.NetworkServiceClient) (err error) {
				resp, err = c.ListNetworks(ctx, &basaltv1.ListNetworksRequest{Tenant: tenant})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(resp, func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "NAME\tTENANT\tVNI\tSUBNETS\tGATEWAY\tAGE")
				for _, n := range resp.GetNetworks() {
					fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\t%s\n", n.GetName(), n.GetTenant(), n.GetVni(), listOr(n.GetSubnets(), "-"),
						gatewayString(n.GetGateway()), age(time.Since(n.GetCreatedAt().AsTime())))
				}
			})
		},
	}
	cmd.Flags().StringVar(&tenant, "tenant", "", "only the networks of this tenant")
	return cmd
}

func (a *app) netGetCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "get NAME",
		Aliases:           []string{"inspect"},
		Short:             "Show a virtual network",
		Args:              exactArgs(1, "one network name"),
		ValidArgsFunction: a.completeNetworks,
		RunE: func(cmd *cobra.Command, args []string) error {
			var n *basaltv1.Network
			err := a.networks(cmd.Context(), func(ctx context.Context, c basaltv1.NetworkServiceClient) (err error) {
				n, err = c.GetNetwork(ctx, &basaltv1.GetNetworkRequest{Name: args[0]})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(n, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "Name:\t%s\n", n.GetName())
				fmt.Fprintf(w, "Tenant:\t%s\n", n.GetTenant())
				fmt.Fprintf(w, "VNI:\t%d\n", n.GetVni())
				fmt.Fprintf(w, "Subnets:\t%s\n", listOr(n.GetSubnets(), "none"))
				fmt.Fprintf(w, "Gateway:\t%s\n", gatewayString(n.GetGateway()))
				if g := n.GetGateway(); g != nil {
					fmt.Fprintf(w, "Gateway MAC:\t%s\n", g.GetMac())
				}
				mtu := "underlay MTU minus VXLAN overhead"
				if n.GetMtu() != 0 {
					mtu = fmt.Sprint(n.GetMtu())
				}
				fmt.Fprintf(w, "MTU:\t%s\n", mtu)
				fmt.Fprintf(w, "Created:\t%s\n", n.GetCreatedAt().AsTime().Local().Format(time.RFC3339))
			})
		},
	}
}

func (a *app) netDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "delete NAME",
		Short:             "Delete a virtual network that has no ports",
		Args:              exactArgs(1, "one network name"),
		ValidArgsFunction: a.completeNetworks,
		RunE: func(cmd *cobra.Command, args []string) error {
			err := a.networks(cmd.Context(), func(ctx context.Context, c basaltv1.NetworkServiceClient) error {
				_, err := c.DeleteNetwork(ctx, &basaltv1.DeleteNetworkRequest{Name: args[0]})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "network %s deleted\n", args[0])
			return nil
		},
	}
}

func (a *app) completeNetworks(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var names []string
	a.networks(cmd.Context(), func(ctx context.Context, c basaltv1.NetworkServiceClient) error {
		resp, err := c.ListNetworks(ctx, &basaltv1.ListNetworksRequest{})
		for _, n := range resp.GetNetworks() {
			names = append(names, n.GetName())
		}
		return err
	})
	return names, cobra.ShellCompDirectiveNoFileComp
}
