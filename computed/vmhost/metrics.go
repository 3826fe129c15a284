package vmhost

import (
	"bufio"
	"fmt"
	"net/http"
	"strings"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"
)

// MetricsHandler serves the host's VM meters in the Prometheus text exposition format (version 0.0.4),
// written by hand: github.com/prometheus/client_golang is only an indirect dependency of this module, and the
// format is a few lines of text. Label values are written with Go's %q, whose escaping of '\', '"' and
// newlines is the format's (and Basalt's names hold none of them). Counters restart from zero when a VM's hypervisor process starts (a start
// or a migration here), which Prometheus' rate() treats as a counter reset.
func (h *Host) MetricsHandler() http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		w := bufio.NewWriter(rw)
		defer w.Flush()
		host := h.cfg.NodeID
		workers := h.workerList()
		var stats []*basaltv1.VMStats
		var states []*basaltv1.VMStatus
		for _, wk := range workers {
			if m, _ := wk.machine(); m == nil {
				continue
			}
			if st := wk.stats(); st != nil {
				stats = append(stats, st)
			}
			states = append(states, wk.statusSnapshot())
		}

		family(w, "basalt_host_memory_offered_bytes", "gauge", "Memory this host offers to VMs.")
		fmt.Fprintf(w, "basalt_host_memory_offered_bytes{host=%q} %d\n", host, h.cfg.MemoryBytes)
		family(w, "basalt_host_vms", "gauge", "VM machines on this host.")
		fmt.Fprintf(w, "basalt_host_vms{host=%q} %d\n", host, len(states))

		family(w, "basalt_vm_state", "gauge", "1 for the state each VM on this host is in.")
		for _, st := range states {
			fmt.Fprintf(w, "basalt_vm_state{host=%q,vm=%q,state=%q} 1\n", host, st.GetName(), strings.ToLower(strings.TrimPrefix(st.GetState().String(), "VM_STATE_")))
		}
		type metric struct {
			name, kind, help string
			value            func(*basaltv1.VMStats) float64
		}
		for _, m := range []metric{
			{"basalt_vm_cpu_seconds_total", "counter", "CPU time of the VM's hypervisor process (vCPUs and device emulation).",
				func(s *basaltv1.VMStats) float64 { return float64(s.GetCpuTimeNs()) / 1e9 }},
			{"basalt_vm_memory_target_bytes", "gauge", "The VM's balloon target.",
				func(s *basaltv1.VMStats) float64 { return float64(s.GetMemoryTargetBytes()) }},
			{"basalt_vm_memory_actual_bytes", "gauge", "Memory the balloon leaves the guest.",
				func(s *basaltv1.VMStats) float64 { return float64(s.GetMemoryActualBytes()) }},
			{"basalt_vm_memory_maximum_bytes", "gauge", "The most memory the VM may be given.",
				func(s *basaltv1.VMStats) float64 { return float64(s.GetMemoryMaximumBytes()) }},
		} {
			family(w, m.name, m.kind, m.help)
			for _, s := range stats {
				fmt.Fprintf(w, "%s{host=%q,vm=%q} %g\n", m.name, host, s.GetName(), m.value(s))
			}
		}
		type disk struct {
			name, help string
			value      func(*basaltv1.DiskStats) uint64
		}
		for _, d := range []disk{
			{"basalt_vm_disk_read_bytes_total", "Bytes the guest read from the disk.", (*basaltv1.DiskStats).GetReadBytes},
			{"basalt_vm_disk_written_bytes_total", "Bytes the guest wrote to the disk.", (*basaltv1.DiskStats).GetWriteBytes},
			{"basalt_vm_disk_reads_total", "Read operations of the guest on the disk.", (*basaltv1.DiskStats).GetReadOps},
			{"basalt_vm_disk_writes_total", "Write operations of the guest on the disk.", (*basaltv1.DiskStats).GetWriteOps},
		} {
			family(w, d.name, "counter", d.help)
			for _, s := range stats {
				for _, ds := range s.GetDisks() {
					fmt.Fprintf(w, "%s{host=%q,vm=%q,volume=%q} %d\n", d.name, host, s.GetName(), ds.GetVolume(), d.value(ds))
				}
			}
		}
	})
}

func family(w *bufio.Writer, name, kind, help string) {
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, kind)
}
