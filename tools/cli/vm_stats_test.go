package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"strings"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/api"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/metering"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// TestVMStatsHistory runs 'basalt vm stats --history' against the real API on a real etcd holding a stopped
// VM and the metering history its hosts left: the table has one row per sample with its rates, --since keeps
// the recent ones, and -o json gives the samples.
func TestVMStatsHistory(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e := etcdtest.Start(t, "")
	s := store.New(e.Client(t))
	if _, err := registry.InitCluster(ctx, s); err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(api.UnimplementedInterceptor))
	api.Register(srv, &api.ClusterServer{Store: s})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	run := func(args ...string) string {
		t.Helper()
		var out, errOut bytes.Buffer
		if code := Execute(ctx, append([]string{"--endpoint", l.Addr().String()}, args...), &out, &errOut); code != 0 {
			t.Fatalf("basalt %s: exit %d: %s", strings.Join(args, " "), code, errOut.String())
		}
		return out.String()
	}

	if _, err := s.Create(ctx, schema.VMKey("v1"), &basaltv1.VM{Name: "v1", DesiredState: basaltv1.VMState_VM_STATE_STOPPED,
		Spec: &basaltv1.VMSpec{Vcpus: 1, Memory: &basaltv1.VMMemory{StartupBytes: 64 << 20}, Kernel: "/k"}}); err != nil {
		t.Fatal(err)
	}
	if out := run("vm", "stats", "v1", "--history"); !strings.Contains(out, "VM v1 has no metering history") {
		t.Fatalf("history of a VM without one: %q", out)
	}
	now := time.Now()
	sample := func(ago time.Duration, host string, cpu float64, readMB, writeOps uint64) *basaltv1.VMMeteringSample {
		end := now.Add(-ago)
		return &basaltv1.VMMeteringSample{Start: timestamppb.New(end.Add(-time.Minute)), End: timestamppb.New(end), Host: host,
			CpuTimeNs: uint64(cpu * 60e9), CpuUsage: cpu, MemoryActualBytes: 96 << 20, ReadBytes: readMB * 60e6, WriteBytes: writeOps * 60 * 4096,
			ReadOps: readMB * 60, WriteOps: writeOps * 60}
	}
	hist := &basaltv1.VMMeteringHistory{Samples: []*basaltv1.VMMeteringSample{
		sample(3*time.Hour, "computed-1", 0.25, 2, 10),
		sample(2*time.Minute, "computed-2", 1.5, 0, 300),
	}}
	if err := metering.Append(ctx, s, "v1", hist.Samples, 1440, now); err != nil {
		t.Fatal(err)
	}

	out := run("vm", "stats", "v1", "--history")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "TIME") {
		t.Fatalf("history table:\n%s", out)
	}
	for i, want := range [][]string{
		{now.Add(-3 * time.Hour).Local().Format(time.DateTime), "computed-1", "25.0", "96MiB", "2.00", "0.04", "2.0", "10.0"},
		{now.Add(-2 * time.Minute).Local().Format(time.DateTime), "computed-2", "150.0", "96MiB", "0.00", "1.23", "0.0", "300.0"},
	} {
		if got := strings.Fields(lines[i+1]); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("row %d: %q, want %q", i+1, got, want)
		}
	}

	out = run("vm", "stats", "v1", "--since", "1h")
	if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) != 2 || !strings.Contains(lines[1], "computed-2") {
		t.Fatalf("--since 1h (implies --history):\n%s", out)
	}

	var js struct {
		Name    string `json:"name"`
		History []struct {
			Host     string  `json:"host"`
			CPUUsage float64 `json:"cpu_usage"`
		} `json:"history"`
	}
	if err := json.Unmarshal([]byte(run("vm", "stats", "v1", "--history", "-o", "json")), &js); err != nil {
		t.Fatalf("-o json is not JSON: %v", err)
	}
	if js.Name != "v1" || len(js.History) != 2 || js.History[0].Host != "computed-1" || js.History[1].CPUUsage != 1.5 {
		t.Fatalf("-o json: %+v", js)
	}
}
