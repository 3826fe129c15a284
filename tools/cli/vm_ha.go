package cli

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/api"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
)

// haFlags are a VM's high-availability settings (docs/ha.md), shared by 'vm create' and 'vm set'.
type haFlags struct {
	priority      string
	antiAffinity  string
	heartbeat     bool
	timeout       time.Duration
	maxResets     uint32
	preferred     []string
	possible      []string
	cmd           *cobra.Command
	withPlacement bool // 'vm set' also sets the hosts; 'vm create' has its own flags for them
}

func (f *haFlags) register(cmd *cobra.Command, withPlacement bool) {
	f.cmd, f.withPlacement = cmd, withPlacement
	fl := cmd.Flags()
	fl.StringVar(&f.priority, "priority", "medium", "restart order after a host failure: high, medium, low, or no-auto-start (left stopped)")
	fl.StringVar(&f.antiAffinity, "anti-affinity", "", "anti-affinity group: its VMs are kept on different hosts when there is room (\"\" for none)")
	fl.BoolVar(&f.heartbeat, "monitor-heartbeat", false, "watch the guest agent's heartbeat: reset a guest that stops beating, move it after --max-resets")
	fl.DurationVar(&f.timeout, "heartbeat-timeout", time.Duration(api.DefaultHeartbeatTimeout)*time.Second, "silence after which a monitored guest is reset (boot included)")
	fl.Uint32Var(&f.maxResets, "max-resets", api.DefaultMaxResets, "resets within an hour after which the VM is moved to another host")
	if withPlacement {
		fl.StringSliceVar(&f.preferred, "preferred-hosts", nil, "hosts tried first, in order (comma-separated; \"\" clears)")
		fl.StringSliceVar(&f.possible, "possible-hosts", nil, "the only hosts the VM may run on (comma-separated; \"\" clears: any)")
	}
}

// apply sets the flags given on spec and returns the update-mask paths they touch.
func (f *haFlags) apply(spec *basaltv1.VMSpec) ([]string, error) {
	fl := f.cmd.Flags()
	var paths []string
	if spec.Placement == nil {
		spec.Placement = &basaltv1.VMPlacement{}
	}
	if fl.Changed("priority") || !f.withPlacement {
		p, err := api.ParsePriority(f.priority)
		if err != nil {
			return nil, usageError{fmt.Errorf("--priority: %w", err)}
		}
		spec.Priority = p
		paths = append(paths, "priority")
	}
	if fl.Changed("anti-affinity") {
		spec.Placement.AntiAffinityGroup = f.antiAffinity
		paths = append(paths, "placement.anti_affinity_group")
	}
	if fl.Changed("monitor-heartbeat") || fl.Changed("heartbeat-timeout") || fl.Changed("max-resets") {
		if f.timeout%time.Second != 0 {
			return nil, usageError{fmt.Errorf("--heartbeat-timeout %s: whole seconds", f.timeout)}
		}
		spec.Monitoring = &basaltv1.VMMonitoring{Heartbeat: f.heartbeat || !fl.Changed("monitor-heartbeat"),
			TimeoutSeconds: uint32(f.timeout / time.Second), MaxResets: f.maxResets}
		paths = append(paths, "monitoring")
	}
	if f.withPlacement {
		if fl.Changed("preferred-hosts") {
			spec.Placement.PreferredHosts = nonEmpty(f.preferred)
			paths = append(paths, "placement.preferred_hosts")
		}
		if fl.Changed("possible-hosts") {
			spec.Placement.PossibleHosts = nonEmpty(f.possible)
			paths = append(paths, "placement.possible_hosts")
		}
	}
	return paths, nil
}

func nonEmpty(ss []string) []string {
	var out []string
	for _, s := range ss {
		if s != "" {
			out = append(out, s)
		}
	}
	return out
}

func (a *app) vmSetCmd() *cobra.Command {
	var f haFlags
	cmd := &cobra.Command{
		Use:   "set NAME [--priority P] [--preferred-hosts H,...] [--possible-hosts H,...] [--anti-affinity GROUP] [--monitor-heartbeat ...]",
		Short: "Change a VM's failover priority, placement and monitoring",
		Long: `Changes what high availability does with a VM (docs/ha.md); it takes effect at once, without a restart.

After a host failure the HA controller fences the host and restarts its VMs on other hosts: high-priority VMs
first, then medium, then low; no-auto-start VMs are left stopped. Restarts honour the possible hosts (the only
hosts a VM may run on), the preferred hosts (tried first, in order) and anti-affinity groups (members are kept on
different hosts when there is room, spread evenly when there is not).

With --monitor-heartbeat the VM's host watches the guest agent's heartbeat: a guest silent for
--heartbeat-timeout is reset, and after --max-resets resets within an hour the VM is moved to another host.

Only the flags given change. A VM running on a host that new --possible-hosts leave out is refused: migrate it
first.`,
		Example: `  basalt vm set db1 --priority high --anti-affinity db --preferred-hosts computed-1,computed-2
  basalt vm set web3 --possible-hosts ""            # any host again
  basalt vm set app1 --monitor-heartbeat --heartbeat-timeout 30s --max-resets 2`,
		Args:              exactArgs(1, "one VM name"),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			spec := &basaltv1.VMSpec{}
			paths, err := f.apply(spec)
			if err != nil {
				return err
			}
			if len(paths) == 0 {
				return usageError{fmt.Errorf("nothing to change: give --priority, --preferred-hosts, --possible-hosts, --anti-affinity or the monitoring flags")}
			}
			var vm *basaltv1.VM
			err = a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) (err error) {
				vm, err = c.UpdateVM(ctx, &basaltv1.UpdateVMRequest{Name: args[0], Spec: spec, UpdateMask: &fieldmaskpb.FieldMask{Paths: paths}})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(vm, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "VM %s updated:\n", vm.GetName())
				printHA(w, vm)
			})
		},
	}
	f.register(cmd, true)
	return cmd
}

// printHA writes a VM's HA settings and its last failover, for 'vm inspect' and 'vm set'.
func printHA(w *tabwriter.Writer, vm *basaltv1.VM) {
	spec := vm.GetSpec()
	fmt.Fprintf(w, "priority:\t%s\n", api.PriorityName(spec.GetPriority()))
	if g := spec.GetPlacement().GetAntiAffinityGroup(); g != "" {
		fmt.Fprintf(w, "anti-affinity:\t%s\n", g)
	}
	if pl := spec.GetPlacement(); len(pl.GetPreferredHosts())+len(pl.GetPossibleHosts()) > 0 {
		fmt.Fprintf(w, "placement:\tpreferred %s, possible %s\n", listOr(pl.GetPreferredHosts(), "-"), listOr(pl.GetPossibleHosts(), "any"))
	}
	if m := spec.GetMonitoring(); m.GetHeartbeat() {
		timeout, resets := m.GetTimeoutSeconds(), m.GetMaxResets()
		if timeout == 0 {
			timeout = api.DefaultHeartbeatTimeout
		}
		if resets == 0 {
			resets = api.DefaultMaxResets
		}
		fmt.Fprintf(w, "monitoring:\theartbeat, reset after %ds of silence, moved after %d resets in an hour\n", timeout, resets)
		if st := vm.GetStatus(); st.GetLastHeartbeat() != nil {
			fmt.Fprintf(w, "last heartbeat:\t#%d, %s ago; %d resets in the last hour%s\n", st.GetHeartbeatSeq(),
				age(time.Since(st.GetLastHeartbeat().AsTime())), len(st.GetMonitorResets()), map[bool]string{true: "; gave up on this host"}[st.GetMonitorGaveUp()])
		}
	}
	if fo := vm.GetFailover(); fo != nil {
		at := fo.GetDetectedAt().AsTime()
		line := fmt.Sprintf("%s ago from %s (%s): detected, fenced +%s", age(time.Since(at)), fo.GetFromHost(), fo.GetReason(),
			fo.GetFencedAt().AsTime().Sub(at).Round(time.Millisecond))
		if fo.GetPlacedAt() != nil {
			line += fmt.Sprintf(", placed on %s +%s", fo.GetToHost(), fo.GetPlacedAt().AsTime().Sub(at).Round(time.Millisecond))
		}
		if fo.GetError() != "" {
			line += "; " + fo.GetError()
		}
		fmt.Fprintf(w, "last failover:\t%s\n", line)
	}
}
