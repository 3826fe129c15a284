package cli

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"text/tabwriter"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/spf13/cobra"
)

func (a *app) hostCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "host",
		Short: "List compute hosts; drain one for maintenance",
		Long: `A compute host is a computed node: it offers memory and CPUs to VMs. Draining a host (maintenance mode) stops
placing VMs there and live-migrates every VM on it to other hosts.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(a.hostListCmd(), a.hostDrainCmd(), a.hostUndrainCmd())
	return cmd
}

func hostState(h *basaltv1.ComputeHostStatus) string {
	s := "up"
	if !h.GetUp() {
		s = "down"
	}
	if h.GetMaintenance().GetDraining() {
		s += ", draining"
	}
	return s
}

func (a *app) hostListCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List compute hosts with their memory and VMs",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var resp *basaltv1.ListHostsResponse
			err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) (err error) {
				resp, err = c.ListHosts(ctx, &basaltv1.ListHostsRequest{})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(resp, func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "HOST\tSTATE\tHYPERVISOR\tMEMORY (COMMITTED/OFFERED)\tCPUS\tVMS")
				for _, h := range resp.GetHosts() {
					hv := h.GetHost().GetHypervisor()
					if acc := h.GetHost().GetAccel(); acc != "" {
						hv += " (" + acc + ")"
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%s / %s\t%d\t%s\n", h.GetHost().GetNode(), hostState(h), hv,
						sizeString(h.GetMemoryCommittedBytes()), sizeString(h.GetHost().GetMemoryBytes()), h.GetHost().GetVcpus(),
						listOr(h.GetVms(), "-"))
				}
			})
		},
	}
}

func (a *app) hostDrainCmd() *cobra.Command {
	var parallel uint32
	var compress, noWait bool
	var bandwidth string
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "drain HOST",
		Short: "Put a host in maintenance and live-migrate every VM on it away",
		Long: `Stops placing VMs on HOST and requests a live migration of each of its VMs to another host with room,
--parallel at a time. Waits until the host holds no VM (--no-wait returns at once). VMs that cannot move (no
other host has room) are named and stay. 'basalt host undrain HOST' ends the maintenance.`,
		Args:              exactArgs(1, "one host"),
		ValidArgsFunction: a.completeNodeIDs,
		RunE: func(cmd *cobra.Command, args []string) error {
			host := args[0]
			req := &basaltv1.DrainHostRequest{Host: host, Parallel: parallel, Compress: compress}
			if bandwidth != "" {
				n, err := parseSize(bandwidth)
				if err != nil {
					return usageError{fmt.Errorf("--bandwidth: %w", err)}
				}
				req.BandwidthBytesPerSecond = n
			}
			var resp *basaltv1.DrainHostResponse
			err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) (err error) {
				resp, err = c.DrainHost(ctx, req)
				return err
			})
			if err != nil {
				return err
			}
			for _, vm := range resp.GetMoving() {
				fmt.Fprintf(a.errOut, "migrating %s to %s\n", vm.GetName(), vm.GetMigration().GetTarget())
			}
			for _, p := range resp.GetProblems() {
				fmt.Fprintf(a.errOut, "cannot move %s\n", p)
			}
			if noWait {
				fmt.Fprintf(a.out, "host %s draining: %d migrations requested\n", host, len(resp.GetMoving()))
				return nil
			}
			start := time.Now()
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt)
			defer stop()
			deadline := time.Now().Add(wait)
			last := ""
			for {
				var hosts *basaltv1.ListHostsResponse
				err := a.vms(ctx, func(ctx context.Context, c basaltv1.VMServiceClient) (err error) {
					hosts, err = c.ListHosts(ctx, &basaltv1.ListHostsRequest{})
					return err
				})
				if err != nil {
					return err
				}
				var h *basaltv1.ComputeHostStatus
				for _, x := range hosts.GetHosts() {
					if x.GetHost().GetNode() == host {
						h = x
					}
				}
				left := h.GetVms()
				if line := strings.Join(left, ", "); line != last {
					if len(left) > 0 {
						fmt.Fprintf(a.errOut, "%s: %d VMs left (%s)\n", host, len(left), line)
					}
					last = line
				}
				if len(left) == 0 {
					fmt.Fprintf(a.out, "host %s drained in %s\n", host, time.Since(start).Round(time.Millisecond))
					return nil
				}
				if len(h.GetMigrating()) == 0 && time.Since(start) > 10*time.Second {
					return fmt.Errorf("host %s still holds %s, and nothing is migrating (see 'basalt vm inspect' for why)", host, strings.Join(left, ", "))
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("host %s still holds %s after %s", host, strings.Join(left, ", "), wait)
				}
				select {
				case <-ctx.Done():
					return fmt.Errorf("stopped waiting; host %s keeps draining", host)
				case <-time.After(500 * time.Millisecond):
				}
			}
		},
	}
	f := cmd.Flags()
	f.Uint32Var(&parallel, "parallel", 2, "migrations at once")
	f.BoolVar(&compress, "compress", false, "compress the memory streams")
	f.StringVar(&bandwidth, "bandwidth", "", "limit each stream, bytes per second with a unit, e.g. 100M")
	f.BoolVar(&noWait, "no-wait", false, "return once the migrations are requested")
	f.DurationVar(&wait, "wait", time.Hour, "how long to wait for the host to be empty")
	return cmd
}

func (a *app) hostUndrainCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "undrain HOST",
		Short:             "End a host's maintenance: VMs may be placed there again",
		Args:              exactArgs(1, "one host"),
		ValidArgsFunction: a.completeNodeIDs,
		RunE: func(cmd *cobra.Command, args []string) error {
			err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) error {
				_, err := c.UndrainHost(ctx, &basaltv1.UndrainHostRequest{Host: args[0]})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "host %s is out of maintenance\n", args[0])
			return nil
		},
	}
}
