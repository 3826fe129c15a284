package cli

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

func (a *app) vmCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "vm",
		Short: "Create, run, migrate and inspect virtual machines",
		Long: `A VM is declared in the cluster (vCPUs, memory, disks on Basalt volumes, NICs on virtual networks, firmware)
and run by the computed host it is placed on. Commands that change a VM return once the change is recorded;
start, stop and migrate then wait until the host has carried it out (--no-wait returns at once).

The serial console is reached through the API ('basalt vm console'), so a VM needs no network to be
administered; its host keeps a console log for post-mortems ('basalt vm console NAME --log').`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(a.vmCreateCmd(), a.vmListCmd(), a.vmInspectCmd(), a.vmStartCmd(), a.vmStopCmd(), a.vmKillCmd(),
		a.vmPauseCmd(), a.vmResumeCmd(), a.vmDeleteCmd(), a.vmConsoleCmd(), a.vmMigrateCmd(), a.vmMemoryCmd(),
		a.vmStatsCmd(), a.vmCloneCmd(), a.vmSetCmd())
	return cmd
}

func (a *app) vms(ctx context.Context, fn func(context.Context, basaltv1.VMServiceClient) error) error {
	return a.call(ctx, func(ctx context.Context, c *grpc.ClientConn) error {
		return fn(ctx, basaltv1.NewVMServiceClient(c))
	})
}

func (a *app) getVM(ctx context.Context, name string) (*basaltv1.VM, error) {
	var vm *basaltv1.VM
	err := a.vms(ctx, func(ctx context.Context, c basaltv1.VMServiceClient) (err error) {
		vm, err = c.GetVM(ctx, &basaltv1.GetVMRequest{Name: name})
		return err
	})
	return vm, err
}

func vmStateWord(s basaltv1.VMState) string {
	if s == basaltv1.VMState_VM_STATE_UNSPECIFIED {
		return "-"
	}
	return strings.ToLower(strings.TrimPrefix(s.String(), "VM_STATE_"))
}

func firmwareWord(f basaltv1.Firmware) string {
	switch f {
	case basaltv1.Firmware_FIRMWARE_BIOS:
		return "bios"
	case basaltv1.Firmware_FIRMWARE_UEFI:
		return "uefi"
	case basaltv1.Firmware_FIRMWARE_UEFI_SECURE_BOOT:
		return "uefi-secure-boot"
	case basaltv1.Firmware_FIRMWARE_DIRECT_KERNEL:
		return "kernel"
	}
	return "-"
}

func (a *app) vmCreateCmd() *cobra.Command {
	var vcpus uint32
	var memory, memMin, memMax, firmware, kernel, initrd, cmdline string
	var disks, nics, preferred, possible []string
	var start bool
	var ha haFlags
	cmd := &cobra.Command{
		Use:   "create NAME --memory SIZE --disk VOLUME[:BOOT] ... | --kernel PATH",
		Short: "Declare a VM",
		Long: `Declares a VM; with --start it is placed on a host and started.

Disks are Basalt volumes, attached in the order given; VOLUME:N gives a disk boot order N (1 boots first). With
no boot order and no kernel, the first disk boots. --memory is what the guest gets at boot; --memory-min and
--memory-max bound what 'basalt vm memory' may set later (the balloon). Firmware: bios (SeaBIOS), uefi, uefi-
secure-boot (OVMF with Secure Boot), or kernel (direct boot of --kernel, --initrd and --cmdline, files on the
hosts). NICs are ports of virtual networks: --nic NETWORK/PORT.`,
		Example: `  basalt vm create web1 --vcpus 2 --memory 2G --memory-max 4G --disk web1-boot --firmware uefi --start
  basalt vm create t1 --memory 256M --disk t1-disk:1 --kernel /boot/vmlinuz --initrd /srv/initrd --cmdline console=ttyS0`,
		Args: exactArgs(1, "one VM name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec := &basaltv1.VMSpec{Vcpus: vcpus, Kernel: kernel, Initrd: initrd, Cmdline: cmdline, Memory: &basaltv1.VMMemory{},
				Placement: &basaltv1.VMPlacement{PreferredHosts: preferred, PossibleHosts: possible}}
			if memory == "" {
				return usageError{errors.New("give the VM --memory")}
			}
			if _, err := ha.apply(spec); err != nil {
				return err
			}
			for _, f := range []struct {
				name, val string
				dst       *uint64
			}{{"memory", memory, &spec.Memory.StartupBytes}, {"memory-min", memMin, &spec.Memory.MinimumBytes}, {"memory-max", memMax, &spec.Memory.MaximumBytes}} {
				if f.val == "" {
					continue
				}
				n, err := parseSize(f.val)
				if err != nil {
					return usageError{fmt.Errorf("--%s: %w", f.name, err)}
				}
				*f.dst = n
			}
			booting := false
			for _, d := range disks {
				vol, order, hasOrder := strings.Cut(d, ":")
				disk := &basaltv1.VMDisk{Volume: vol}
				if hasOrder {
					n, err := strconv.ParseUint(order, 10, 32)
					if err != nil {
						return usageError{fmt.Errorf("--disk %q: the boot order after ':' must be a number", d)}
					}
					disk.BootOrder = uint32(n)
					booting = booting || n > 0
				}
				spec.Disks = append(spec.Disks, disk)
			}
			if !booting && kernel == "" && len(spec.Disks) > 0 {
				spec.Disks[0].BootOrder = 1
			}
			for _, n := range nics {
				network, port, ok := strings.Cut(n, "/")
				if !ok {
					return usageError{fmt.Errorf("--nic %q: want NETWORK/PORT", n)}
				}
				spec.Nics = append(spec.Nics, &basaltv1.VMNic{Network: network, Port: port})
			}
			switch firmware {
			case "":
			case "bios":
				spec.Firmware = basaltv1.Firmware_FIRMWARE_BIOS
			case "uefi":
				spec.Firmware = basaltv1.Firmware_FIRMWARE_UEFI
			case "uefi-secure-boot":
				spec.Firmware = basaltv1.Firmware_FIRMWARE_UEFI_SECURE_BOOT
			case "kernel":
				spec.Firmware = basaltv1.Firmware_FIRMWARE_DIRECT_KERNEL
			default:
				return usageError{fmt.Errorf("--firmware %q: want bios, uefi, uefi-secure-boot or kernel", firmware)}
			}
			var vm *basaltv1.VM
			err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) (err error) {
				vm, err = c.CreateVM(ctx, &basaltv1.CreateVMRequest{Name: args[0], Spec: spec, Start: start})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "VM %s created: %d vCPUs, %s memory, %d disks, %s firmware", vm.GetName(), vm.GetSpec().GetVcpus(),
				sizeString(vm.GetSpec().GetMemory().GetStartupBytes()), len(vm.GetSpec().GetDisks()), firmwareWord(vm.GetSpec().GetFirmware()))
			if start {
				fmt.Fprintf(a.out, ", starting on %s", vm.GetHost())
			}
			fmt.Fprintln(a.out)
			return nil
		},
	}
	f := cmd.Flags()
	f.Uint32Var(&vcpus, "vcpus", 1, "virtual CPUs")
	f.StringVar(&memory, "memory", "", "memory at boot, e.g. 2G")
	f.StringVar(&memMin, "memory-min", "", "smallest balloon target (default: --memory)")
	f.StringVar(&memMax, "memory-max", "", "largest balloon target (default: --memory)")
	f.StringArrayVar(&disks, "disk", nil, "a volume as a disk, VOLUME or VOLUME:BOOTORDER (repeat for more)")
	f.StringArrayVar(&nics, "nic", nil, "a NIC on a port, NETWORK/PORT (repeat for more)")
	f.StringVar(&firmware, "firmware", "", "bios, uefi, uefi-secure-boot or kernel (default: kernel with --kernel, else bios)")
	f.StringVar(&kernel, "kernel", "", "kernel for direct boot (a path on the hosts)")
	f.StringVar(&initrd, "initrd", "", "initrd for direct boot (a path on the hosts)")
	f.StringVar(&cmdline, "cmdline", "", "kernel command line for direct boot")
	f.StringArrayVar(&preferred, "host", nil, "a preferred host, tried first in the order given (repeat for more)")
	f.StringArrayVar(&possible, "possible-host", nil, "a host the VM may run on; if any is given, only those (repeat for more)")
	f.BoolVar(&start, "start", false, "start the VM once it is declared")
	ha.register(cmd, false)
	return cmd
}

func memoryText(vm *basaltv1.VM) string {
	m := vm.GetSpec().GetMemory()
	t := vm.GetMemoryTargetBytes()
	if t == 0 {
		t = m.GetStartupBytes()
	}
	if m.GetMaximumBytes() > m.GetStartupBytes() || m.GetMinimumBytes() < m.GetStartupBytes() {
		return fmt.Sprintf("%s (%s..%s)", sizeString(t), sizeString(m.GetMinimumBytes()), sizeString(m.GetMaximumBytes()))
	}
	return sizeString(t)
}

func (a *app) vmListCmd() *cobra.Command {
	var host string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List VMs",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var resp *basaltv1.ListVMsResponse
			err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) (err error) {
				resp, err = c.ListVMs(ctx, &basaltv1.ListVMsRequest{Host: host})
				return err
			})
			if err != nil {
				return err
			}
			return a.print(resp, func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "NAME\tSTATE\tHOST\tVCPUS\tMEMORY\tDISKS\tAGE")
				for _, vm := range resp.GetVms() {
					state := vmStateWord(vm.GetState())
					if m := vm.GetMigration(); m != nil {
						state += " -> " + m.GetTarget()
					}
					var disks []string
					for _, d := range vm.GetSpec().GetDisks() {
						disks = append(disks, d.GetVolume())
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", vm.GetName(), state, orDash(vm.GetHost()), vm.GetSpec().GetVcpus(),
						memoryText(vm), orDash(strings.Join(disks, ",")), age(time.Since(vm.GetCreatedAt().AsTime())))
				}
			})
		},
	}
	cmd.Flags().StringVar(&host, "host", "", "only the VMs of this host")
	return cmd
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func (a *app) vmInspectCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "inspect NAME",
		Short:             "Show a VM: its spec, state, host and last migration",
		Args:              exactArgs(1, "one VM name"),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := a.getVM(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return a.print(vm, func(w *tabwriter.Writer) {
				spec, st := vm.GetSpec(), vm.GetStatus()
				fmt.Fprintf(w, "name:\t%s\n", vm.GetName())
				fmt.Fprintf(w, "state:\t%s (declared %s)\n", vmStateWord(vm.GetState()), vmStateWord(vm.GetDesiredState()))
				fmt.Fprintf(w, "host:\t%s\n", orDash(vm.GetHost()))
				fmt.Fprintf(w, "vcpus:\t%d\n", spec.GetVcpus())
				fmt.Fprintf(w, "memory:\t%s\n", memoryText(vm))
				if st.GetMemoryActualBytes() > 0 {
					fmt.Fprintf(w, "memory in use:\t%s (balloon)\n", sizeString(st.GetMemoryActualBytes()))
				}
				fmt.Fprintf(w, "firmware:\t%s\n", firmwareWord(spec.GetFirmware()))
				if spec.GetKernel() != "" {
					fmt.Fprintf(w, "kernel:\t%s\ninitrd:\t%s\ncmdline:\t%s\n", spec.GetKernel(), orDash(spec.GetInitrd()), orDash(spec.GetCmdline()))
				}
				for _, d := range spec.GetDisks() {
					boot := ""
					if d.GetBootOrder() > 0 {
						boot = fmt.Sprintf(" (boot %d)", d.GetBootOrder())
					}
					fmt.Fprintf(w, "disk:\t%s%s\n", d.GetVolume(), boot)
				}
				for _, n := range spec.GetNics() {
					fmt.Fprintf(w, "nic:\t%s/%s\n", n.GetNetwork(), n.GetPort())
				}
				printHA(w, vm)
				if vm.GetClonedFrom() != "" {
					fmt.Fprintf(w, "cloned from:\t%s\n", vm.GetClonedFrom())
				}
				if st != nil {
					fmt.Fprintf(w, "hypervisor:\t%s (%s), pid %d on %s\n", st.GetHypervisor(), orDash(st.GetAccel()), st.GetPid(), st.GetHost())
					if st.GetStartedAt() != nil && st.GetPid() != 0 {
						fmt.Fprintf(w, "running for:\t%s\n", age(time.Since(st.GetStartedAt().AsTime())))
					}
					fmt.Fprintf(w, "console log:\t%s (on %s)\n", st.GetConsoleLog(), st.GetHost())
					if st.GetLastError() != "" {
						fmt.Fprintf(w, "last error:\t%s (%s ago)\n", st.GetLastError(), age(time.Since(st.GetLastErrorAt().AsTime())))
					}
				}
				if m := vm.GetMigration(); m != nil {
					fmt.Fprintf(w, "migration:\trequested to %s%s\n", m.GetTarget(), map[bool]string{true: " (cancelling)"}[m.GetCancel()])
				}
				if p := st.GetMigration(); p != nil {
					fmt.Fprintf(w, "last migration:\t%s\n", migrationLine(p))
				}
				fmt.Fprintf(w, "created:\t%s ago\n", age(time.Since(vm.GetCreatedAt().AsTime())))
			})
		},
	}
}

// migrationLine describes a migration's progress in one line.
func migrationLine(p *basaltv1.MigrationProgress) string {
	s := fmt.Sprintf("%s -> %s: %s", p.GetSource(), p.GetTarget(), p.GetStatus())
	if p.GetTotalBytes() > 0 {
		s += fmt.Sprintf(", %s transferred, %s remaining", sizeString(p.GetTransferredBytes()), sizeString(p.GetRemainingBytes()))
	}
	if p.GetStatus() == "completed" {
		s += fmt.Sprintf(" in %s, downtime %d ms", p.GetFinishedAt().AsTime().Sub(p.GetStartedAt().AsTime()).Round(time.Millisecond), p.GetDowntimeMs())
	}
	if p.GetError() != "" {
		s += ": " + p.GetError()
	}
	return s
}

// waitVM polls the VM until done says it is where it should be, or within ends. done returns an error to
// stop waiting with it.
func (a *app) waitVM(ctx context.Context, name string, within time.Duration, what string, done func(*basaltv1.VM) (bool, error)) (*basaltv1.VM, error) {
	deadline := time.Now().Add(within)
	for {
		vm, err := a.getVM(ctx, name)
		if err != nil {
			return nil, err
		}
		ok, err := done(vm)
		if err != nil || ok {
			return vm, err
		}
		if time.Now().After(deadline) {
			return vm, fmt.Errorf("VM %s is %s, not %s after %s (it may still get there: 'basalt vm inspect %s')", name, vmStateWord(vm.GetState()), what, within, name)
		}
		select {
		case <-ctx.Done():
			return vm, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// reached reports whether the host has acted on the VM's current declaration and it is in state s. A failed
// start ends the wait with the host's error.
func reached(s basaltv1.VMState) func(*basaltv1.VM) (bool, error) {
	return func(vm *basaltv1.VM) (bool, error) {
		st := vm.GetStatus()
		if st.GetObservedGeneration() >= vm.GetGeneration() && vm.GetState() == basaltv1.VMState_VM_STATE_FAILED {
			return false, fmt.Errorf("VM %s failed: %s", vm.GetName(), st.GetLastError())
		}
		return vm.GetState() == s && (s == basaltv1.VMState_VM_STATE_STOPPED || st.GetObservedGeneration() >= vm.GetGeneration()), nil
	}
}

func (a *app) vmStartCmd() *cobra.Command {
	var host string
	var noWait bool
	var wait time.Duration
	cmd := &cobra.Command{
		Use:               "start NAME",
		Short:             "Start a VM (placed on a host with room, or --host)",
		Args:              exactArgs(1, "one VM name"),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var vm *basaltv1.VM
			err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) (err error) {
				vm, err = c.StartVM(ctx, &basaltv1.StartVMRequest{Name: args[0], Host: host})
				return err
			})
			if err != nil {
				return err
			}
			if noWait {
				fmt.Fprintf(a.out, "VM %s starting on %s\n", args[0], vm.GetHost())
				return nil
			}
			start := time.Now()
			if vm, err = a.waitVM(cmd.Context(), args[0], wait, "running", reached(basaltv1.VMState_VM_STATE_RUNNING)); err != nil {
				return err
			}
			fmt.Fprintf(a.out, "VM %s running on %s (started in %s)\n", args[0], vm.GetHost(), time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	cmd.Flags().StringVar(&host, "host", "", "run it on this host")
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "return once the start is recorded")
	cmd.Flags().DurationVar(&wait, "wait", 3*time.Minute, "how long to wait for the VM to run")
	return cmd
}

func (a *app) vmStopCmd() *cobra.Command {
	var timeout, wait time.Duration
	var force, noWait bool
	cmd := &cobra.Command{
		Use:   "stop NAME",
		Short: "Shut a VM down: the ACPI power button, then forced off after --stop-timeout",
		Long: `Presses the VM's ACPI power button; a guest that has not powered off after --stop-timeout is forced off
(its hypervisor process is killed). --force kills it at once, like 'basalt vm kill'.`,
		Args:              exactArgs(1, "one VM name"),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) error {
				_, err := c.StopVM(ctx, &basaltv1.StopVMRequest{Name: args[0], TimeoutSeconds: uint32(timeout / time.Second), Force: force})
				return err
			})
			if err != nil {
				return err
			}
			return a.waitStopped(cmd.Context(), args[0], noWait, max(wait, timeout+30*time.Second))
		},
	}
	cmd.Flags().DurationVar(&timeout, "stop-timeout", 60*time.Second, "how long the guest has to power off before it is forced off")
	cmd.Flags().BoolVar(&force, "force", false, "force it off at once")
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "return once the stop is recorded")
	cmd.Flags().DurationVar(&wait, "wait", 0, "how long to wait for the VM to stop (default: --stop-timeout + 30s)")
	return cmd
}

func (a *app) waitStopped(ctx context.Context, name string, noWait bool, within time.Duration) error {
	if noWait {
		fmt.Fprintf(a.out, "VM %s stopping\n", name)
		return nil
	}
	start := time.Now()
	vm, err := a.waitVM(ctx, name, within, "stopped", reached(basaltv1.VMState_VM_STATE_STOPPED))
	if err != nil {
		return err
	}
	how := "powered off"
	if e := vm.GetStatus().GetLastError(); strings.Contains(e, "forced off") {
		how = e
	}
	fmt.Fprintf(a.out, "VM %s stopped in %s (%s)\n", name, time.Since(start).Round(time.Millisecond), how)
	return nil
}

func (a *app) vmKillCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "kill NAME",
		Short:             "Stop a VM at once (its hypervisor process is killed)",
		Args:              exactArgs(1, "one VM name"),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) error {
				_, err := c.KillVM(ctx, &basaltv1.KillVMRequest{Name: args[0]})
				return err
			})
			if err != nil {
				return err
			}
			return a.waitStopped(cmd.Context(), args[0], false, time.Minute)
		},
	}
}

func (a *app) vmPauseCmd() *cobra.Command {
	return a.vmRunStateCmd("pause", "Pause a VM (its vCPUs stop; memory and devices are kept)", basaltv1.VMState_VM_STATE_PAUSED,
		func(ctx context.Context, c basaltv1.VMServiceClient, name string) error {
			_, err := c.PauseVM(ctx, &basaltv1.PauseVMRequest{Name: name})
			return err
		})
}

func (a *app) vmResumeCmd() *cobra.Command {
	return a.vmRunStateCmd("resume", "Resume a paused VM", basaltv1.VMState_VM_STATE_RUNNING,
		func(ctx context.Context, c basaltv1.VMServiceClient, name string) error {
			_, err := c.ResumeVM(ctx, &basaltv1.ResumeVMRequest{Name: name})
			return err
		})
}

func (a *app) vmRunStateCmd(verb, short string, want basaltv1.VMState, call func(context.Context, basaltv1.VMServiceClient, string) error) *cobra.Command {
	return &cobra.Command{
		Use:               verb + " NAME",
		Short:             short,
		Args:              exactArgs(1, "one VM name"),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) error { return call(ctx, c, args[0]) })
			if err != nil {
				return err
			}
			if _, err := a.waitVM(cmd.Context(), args[0], time.Minute, vmStateWord(want), reached(want)); err != nil {
				return err
			}
			fmt.Fprintf(a.out, "VM %s %s\n", args[0], vmStateWord(want))
			return nil
		},
	}
}

func (a *app) vmDeleteCmd() *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:               "delete NAME",
		Short:             "Delete a stopped VM (its volumes are kept)",
		Args:              exactArgs(1, "one VM name"),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) error {
				_, err := c.DeleteVM(ctx, &basaltv1.DeleteVMRequest{Name: args[0], Force: force})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "VM %s deleted\n", args[0])
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "delete it even if it runs (it is killed)")
	return cmd
}

func (a *app) vmMemoryCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "memory NAME SIZE",
		Short: "Set the memory a running VM may use (the balloon target), within its minimum and maximum",
		Example: `  basalt vm memory web1 3G
  basalt vm memory web1 1536M`,
		Args:              exactArgs(2, "a VM name and a size"),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := parseSize(args[1])
			if err != nil {
				return usageError{err}
			}
			err = a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) error {
				_, err := c.SetVMMemory(ctx, &basaltv1.SetVMMemoryRequest{Name: args[0], TargetBytes: n})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "VM %s memory target set to %s\n", args[0], sizeString(n))
			return nil
		},
	}
}

func (a *app) vmStatsCmd() *cobra.Command {
	var history bool
	var since time.Duration
	cmd := &cobra.Command{
		Use:   "stats NAME [--history [--since DURATION]]",
		Short: "Show a VM's meters: CPU time, memory, disk bytes and operations",
		Long: `Meters count from when the VM's hypervisor process started on its current host; rates are over the host's last sampling interval.

--history shows the VM's metering history instead: one sample a minute over the last 24 hours, from every host
the VM ran on, oldest first (CPU use, memory at the end of the minute, disk throughput and IOPS of all disks
together). It is kept in the cluster, so it is there for a stopped VM too. --since limits it to the last
DURATION and implies --history.`,
		Example: `  basalt vm stats web1
  basalt vm stats web1 --history --since 1h
  basalt vm stats web1 --history -o json`,
		Args:              exactArgs(1, "one VM name"),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if since < 0 {
				return usageError{fmt.Errorf("--since %s: want a positive duration", since)}
			}
			history = history || since > 0
			var st *basaltv1.VMStats
			err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) (err error) {
				st, err = c.GetVMStats(ctx, &basaltv1.GetVMStatsRequest{Name: args[0], History: history})
				return err
			})
			if err != nil {
				return err
			}
			if history {
				st.History = historySince(st.GetHistory(), since, time.Now())
				return a.print(st, func(w *tabwriter.Writer) { historyTable(w, args[0], st.GetHistory()) })
			}
			return a.print(st, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "VM %s on %s\n", st.GetName(), st.GetHost())
				fmt.Fprintf(w, "cpu:\t%s (%.2f CPUs now)\n", time.Duration(st.GetCpuTimeNs()).Round(time.Millisecond), st.GetCpuUsage())
				fmt.Fprintf(w, "memory:\t%s in use, target %s, maximum %s\n", sizeString(st.GetMemoryActualBytes()), sizeString(st.GetMemoryTargetBytes()), sizeString(st.GetMemoryMaximumBytes()))
				fmt.Fprintln(w, "DISK\tREAD\tWRITTEN\tREADS\tWRITES\tREAD IOPS\tWRITE IOPS")
				for _, d := range st.GetDisks() {
					fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%.1f\t%.1f\n", d.GetVolume(), sizeString(d.GetReadBytes()), sizeString(d.GetWriteBytes()),
						d.GetReadOps(), d.GetWriteOps(), d.GetReadIops(), d.GetWriteIops())
				}
			})
		},
	}
	cmd.Flags().BoolVar(&history, "history", false, "show the metering history (a sample a minute, the last 24 hours)")
	cmd.Flags().DurationVar(&since, "since", 0, "with --history: only the samples of the last DURATION (e.g. 1h, 30m)")
	return cmd
}

// historySince keeps the samples that ended within since of now (all of them for 0).
func historySince(samples []*basaltv1.VMMeteringSample, since time.Duration, now time.Time) []*basaltv1.VMMeteringSample {
	if since <= 0 {
		return samples
	}
	cut := now.Add(-since)
	var out []*basaltv1.VMMeteringSample
	for _, s := range samples {
		if !s.GetEnd().AsTime().Before(cut) {
			out = append(out, s)
		}
	}
	return out
}

// historyTable prints one row per metering sample, at its end in local time, with its rates over its own span
// (samples around a restart or a migration may be shorter than a minute).
func historyTable(w *tabwriter.Writer, name string, samples []*basaltv1.VMMeteringSample) {
	if len(samples) == 0 {
		fmt.Fprintf(w, "VM %s has no metering history in that time (the host that runs it adds a sample every minute)\n", name)
		return
	}
	fmt.Fprintln(w, "TIME\tHOST\tCPU %\tMEMORY\tREAD MB/s\tWRITE MB/s\tREAD IOPS\tWRITE IOPS")
	for _, s := range samples {
		secs := s.GetEnd().AsTime().Sub(s.GetStart().AsTime()).Seconds()
		rate := func(n uint64) float64 {
			if secs <= 0 {
				return 0
			}
			return float64(n) / secs
		}
		fmt.Fprintf(w, "%s\t%s\t%.1f\t%s\t%.2f\t%.2f\t%.1f\t%.1f\n", s.GetEnd().AsTime().Local().Format(time.DateTime), s.GetHost(),
			100*s.GetCpuUsage(), sizeString(s.GetMemoryActualBytes()), rate(s.GetReadBytes())/1e6, rate(s.GetWriteBytes())/1e6,
			rate(s.GetReadOps()), rate(s.GetWriteOps()))
	}
}

func (a *app) vmCloneCmd() *cobra.Command {
	var checkpoint string
	var start bool
	cmd := &cobra.Command{
		Use:   "clone SOURCE NAME",
		Short: "Make a new VM from a checkpoint of a VM's volumes, while it runs (linked clones)",
		Long: `Checkpoints the source VM's volumes at one instant (the source keeps running; its writes wait only for the
checkpoint), makes a linked clone of each (named NAME-VOLUME), and declares NAME on them with the source's spec,
without NICs.`,
		Args:              exactArgs(2, "a source VM and a new VM name"),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			start0 := time.Now()
			var vm *basaltv1.VM
			err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) (err error) {
				vm, err = c.CloneVM(ctx, &basaltv1.CloneVMRequest{Source: args[0], Name: args[1], Checkpoint: checkpoint, Start: start})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "VM %s cloned from %s in %s\n", vm.GetName(), vm.GetClonedFrom(), time.Since(start0).Round(time.Millisecond))
			return nil
		},
	}
	cmd.Flags().StringVar(&checkpoint, "checkpoint", "", "name of the checkpoint taken (default clone-NAME)")
	cmd.Flags().BoolVar(&start, "start", false, "start the clone")
	return cmd
}

func (a *app) vmMigrateCmd() *cobra.Command {
	var to, bandwidth string
	var compress, cancel, noWait bool
	var downtime, wait time.Duration
	cmd := &cobra.Command{
		Use:   "migrate NAME [--to HOST] | --cancel",
		Short: "Live-migrate a running VM to another host (memory only; disks are shared)",
		Long: `Moves a running VM to another host without stopping it: its memory is copied while it runs, then it is
paused for a moment (at most about --max-downtime) while the rest moves. Disks stay where they are: every
host reaches them through its blockd. Progress is shown until the migration ends; a failed or cancelled
migration leaves the VM running where it was. --cancel cancels the VM's migration in flight.`,
		Example: `  basalt vm migrate web1 --to computed-2
  basalt vm migrate web1 --compress --bandwidth 200M
  basalt vm migrate web1 --cancel`,
		Args:              exactArgs(1, "one VM name"),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if cancel {
				err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) error {
					_, err := c.CancelMigration(ctx, &basaltv1.CancelMigrationRequest{Name: name})
					return err
				})
				if err != nil {
					return err
				}
				fmt.Fprintf(a.out, "migration of VM %s cancelled; it stays on its host\n", name)
				return nil
			}
			req := &basaltv1.MigrateVMRequest{Name: name, TargetHost: to, Compress: compress, MaxDowntimeMs: uint32(downtime / time.Millisecond)}
			if bandwidth != "" {
				n, err := parseSize(bandwidth)
				if err != nil {
					return usageError{fmt.Errorf("--bandwidth: %w", err)}
				}
				req.BandwidthBytesPerSecond = n
			}
			var vm *basaltv1.VM
			err := a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) (err error) {
				vm, err = c.MigrateVM(ctx, req)
				return err
			})
			if err != nil {
				return err
			}
			mig := vm.GetMigration()
			if noWait {
				fmt.Fprintf(a.out, "VM %s migrating from %s to %s (migration %s)\n", name, mig.GetSource(), mig.GetTarget(), mig.GetId())
				return nil
			}
			p, err := a.followMigration(cmd.Context(), name, mig.GetId(), wait)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "VM %s migrated to %s: %s\n", name, p.GetTarget(), migrationLine(p))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&to, "to", "", "target host (default: placed like a start, on another host)")
	f.BoolVar(&compress, "compress", false, "compress the memory stream (zstd)")
	f.StringVar(&bandwidth, "bandwidth", "", "limit the stream, bytes per second with a unit, e.g. 100M")
	f.DurationVar(&downtime, "max-downtime", 0, "longest pause at the switchover (default: the hypervisor's, 300ms)")
	f.BoolVar(&cancel, "cancel", false, "cancel the VM's migration in flight")
	f.BoolVar(&noWait, "no-wait", false, "return once the migration is requested")
	f.DurationVar(&wait, "wait", 30*time.Minute, "how long to follow the migration")
	return cmd
}

// followMigration shows a migration's progress until it ends, and fails unless it completed.
func (a *app) followMigration(ctx context.Context, name, id string, within time.Duration) (*basaltv1.MigrationProgress, error) {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt)
	defer stop()
	var last string
	var final *basaltv1.MigrationProgress
	tty := isTerminal(a.errOut)
	_, err := a.waitVM(ctx, name, within, "migrated", func(vm *basaltv1.VM) (bool, error) {
		p := vm.GetStatus().GetMigration()
		if p.GetId() == id {
			line := fmt.Sprintf("%s: %s", name, migrationLine(p))
			if p.GetTotalBytes() > 0 && p.GetStatus() == "active" {
				line = fmt.Sprintf("%s: migrating to %s, %3.0f%%  %s / %s", name, p.GetTarget(),
					100*float64(p.GetTransferredBytes())/float64(max(p.GetTotalBytes(), 1)), sizeString(p.GetTransferredBytes()), sizeString(p.GetTotalBytes()))
			}
			if line != last {
				if tty {
					fmt.Fprintf(a.errOut, "\r\033[K%s", line)
				} else {
					fmt.Fprintln(a.errOut, line)
				}
				last = line
			}
		}
		if vm.GetMigration().GetId() == id {
			return false, nil // still requested
		}
		if p.GetId() != id {
			// The host reports the outcome before it clears the request: nothing was reported.
			return true, nil
		}
		switch p.GetStatus() {
		case "completed", "failed", "cancelled":
			final = p
			return true, nil
		}
		return false, nil
	})
	if tty && last != "" {
		fmt.Fprintln(a.errOut)
	}
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return nil, fmt.Errorf("stopped following the migration of %s; it goes on (cancel it with 'basalt vm migrate %s --cancel')", name, name)
	}
	if err != nil {
		return nil, err
	}
	if final == nil {
		return nil, fmt.Errorf("the migration of %s ended before its host reported on it", name)
	}
	if final.GetStatus() != "completed" {
		return nil, fmt.Errorf("migration of %s %s: %s; it stays on %s", name, final.GetStatus(), orDash(final.GetError()), final.GetSource())
	}
	return final, nil
}

// consoleDetach is Ctrl-], the key that detaches a console viewer (as in telnet and virsh).
const consoleDetach = 0x1d

func (a *app) vmConsoleCmd() *cobra.Command {
	var logOnly bool
	var tail string
	cmd := &cobra.Command{
		Use:   "console NAME",
		Short: "Attach to a VM's serial console (Ctrl-] detaches)",
		Long: `Attaches to the VM's serial console through the API: it works with no guest network at all, from wherever the
API is reachable. Several viewers may attach at once; each sees all output and may type. When stdin is a
terminal it is put in raw mode; Ctrl-] detaches. The console follows the VM across live migrations.

--log prints the end of the console log its host keeps (also for a stopped VM: a post-mortem) and exits.`,
		Example: `  basalt vm console web1
  basalt vm console web1 --log --tail 64K`,
		Args:              exactArgs(1, "one VM name"),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var tailBytes uint64
			if tail != "" {
				var err error
				if tailBytes, err = parseSizeOrZero(tail); err != nil {
					return usageError{fmt.Errorf("--tail: %w", err)}
				}
			} else if logOnly {
				tailBytes = 16 << 10
			}
			return a.console(cmd.Context(), args[0], uint32(min(tailBytes, 1<<30)), logOnly)
		},
	}
	cmd.Flags().BoolVar(&logOnly, "log", false, "print the end of the console log and exit")
	cmd.Flags().StringVar(&tail, "tail", "", "first print this much of the console log, e.g. 4K (default: none; 16K with --log)")
	return cmd
}

func (a *app) console(ctx context.Context, name string, tail uint32, logOnly bool) error {
	c, where, err := a.conn()
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := basaltv1.NewVMServiceClient(c).StreamConsole(ctx)
	if err != nil {
		return explain(err, where)
	}
	if err := stream.Send(&basaltv1.ConsoleInput{Name: name, TailBytes: tail, NoFollow: logOnly}); err != nil {
		_, err = stream.Recv()
		return explain(err, where)
	}
	if logOnly {
		stream.CloseSend()
	} else {
		stdin := int(os.Stdin.Fd())
		if restore, err := rawTerminal(stdin); err == nil {
			defer restore()
			fmt.Fprintf(a.errOut, "Connected to the console of VM %s; Ctrl-] detaches.\r\n", name)
		}
		go a.consoleInput(os.Stdin, stream, cancel)
	}
	for {
		out, err := stream.Recv()
		if errors.Is(err, io.EOF) || (err != nil && ctx.Err() != nil) {
			return nil
		}
		if err != nil {
			return explain(err, where)
		}
		if n := out.GetNotice(); n != "" {
			fmt.Fprintf(a.errOut, "\r\n[basalt: %s]\r\n", n)
		}
		if len(out.GetData()) > 0 {
			if _, err := a.out.Write(out.GetData()); err != nil {
				return err
			}
		}
	}
}

// consoleInput sends stdin to the console until Ctrl-] (which detaches) or the end of stdin (which only ends
// the input: output goes on until the viewer is stopped).
func (a *app) consoleInput(in io.Reader, stream basaltv1.VMService_StreamConsoleClient, detach context.CancelFunc) {
	buf := make([]byte, 4096)
	for {
		n, err := in.Read(buf)
		if n > 0 {
			b := buf[:n]
			i := bytes.IndexByte(b, consoleDetach)
			if i >= 0 {
				b = b[:i]
			}
			if len(b) > 0 {
				if stream.Send(&basaltv1.ConsoleInput{Data: append([]byte(nil), b...)}) != nil {
					return
				}
			}
			if i >= 0 {
				fmt.Fprint(a.errOut, "\r\n[basalt: detached]\r\n")
				detach()
				return
			}
		}
		if err != nil {
			stream.CloseSend()
			return
		}
	}
}

// rawTerminal puts the terminal fd in raw mode (every key goes to the guest, Ctrl-C included) and returns how
// to restore it; it fails if fd is not a terminal.
func rawTerminal(fd int) (func(), error) {
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return nil, err
	}
	raw := *old
	// What cfmakeraw(3) does.
	raw.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	raw.Oflag &^= unix.OPOST
	raw.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	raw.Cflag &^= unix.CSIZE | unix.PARENB
	raw.Cflag |= unix.CS8
	raw.Cc[unix.VMIN], raw.Cc[unix.VTIME] = 1, 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, &raw); err != nil {
		return nil, err
	}
	return func() { unix.IoctlSetTermios(fd, unix.TCSETS, old) }, nil
}

func (a *app) completeVMs(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var names []string
	a.vms(cmd.Context(), func(ctx context.Context, c basaltv1.VMServiceClient) error {
		resp, err := c.ListVMs(ctx, &basaltv1.ListVMsRequest{})
		for _, vm := range resp.GetVms() {
			names = append(names, vm.GetName())
		}
		return err
	})
	return names, cobra.ShellCompDirectiveNoFileComp
}
