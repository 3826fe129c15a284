package up

import (
	"strings"
	"testing"
	"time"
)

func TestPlanLaysOutPortsWithoutOverlap(t *testing.T) {
	s, err := Plan(Options{DataDir: "/d", Blockd: MaxBlockd, BasePort: 7400, LeaseTTL: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Processes) != MaxBlockd+3 {
		t.Fatalf("%d processes, want %d", len(s.Processes), MaxBlockd+3)
	}
	seen := map[int]string{}
	for _, p := range s.Processes {
		for _, port := range p.Ports {
			if other, dup := seen[port]; dup {
				t.Fatalf("port %d given to %s and %s", port, other, p.ID)
			}
			seen[port] = p.ID
		}
		if !strings.HasPrefix(p.DataDir, "/d/") || !strings.Contains(strings.Join(p.Args, " "), "--lease-ttl 5s") {
			t.Errorf("%s: data dir %s, args %v", p.ID, p.DataDir, p.Args)
		}
	}
	if s.Endpoint != "127.0.0.1:7400" || s.EtcdURL != "http://127.0.0.1:7401" {
		t.Fatalf("endpoint %s, etcd %s", s.Endpoint, s.EtcdURL)
	}
	if first, last := s.Processes[1], s.Processes[len(s.Processes)-1]; first.GRPC != "127.0.0.1:7410" || last.ID != "netd-1" {
		t.Fatalf("first node %s at %s, last %s", first.ID, first.GRPC, last.ID)
	}
}

func TestPlanWithTwoComputed(t *testing.T) {
	s, err := Plan(Options{DataDir: "/d", Blockd: 3, Computed: 2, BasePort: 7400, LeaseTTL: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, p := range s.Processes {
		ids = append(ids, p.ID)
	}
	if got := strings.Join(ids, " "); got != "metad-1 blockd-1 blockd-2 blockd-3 computed-1 computed-2 netd-1" {
		t.Fatalf("processes %s", got)
	}
	for i, want := range map[int]string{4: "/d/blockd-1/nbd.sock", 5: "/d/blockd-2/nbd.sock"} {
		p := s.Processes[i]
		if args := strings.Join(p.Args, " "); !strings.Contains(args, "--blockd-socket "+want) || !strings.Contains(args, "--metrics-listen 127.0.0.1:") {
			t.Errorf("%s: args %s", p.ID, args)
		}
	}
	if s.Processes[5].GRPC != "127.0.0.1:7450" || s.Processes[6].GRPC != "127.0.0.1:7460" {
		t.Fatalf("computed-2 at %s, netd-1 at %s", s.Processes[5].GRPC, s.Processes[6].GRPC)
	}
}

func TestPlanRejectsBadOptions(t *testing.T) {
	for _, o := range []Options{
		{DataDir: "d", Blockd: 0, BasePort: 7400},
		{DataDir: "d", Blockd: MaxBlockd + 1, BasePort: 7400},
		{DataDir: "d", Blockd: 3, BasePort: 80},
		{DataDir: "d", Blockd: 3, BasePort: 65500},
		{DataDir: "d", Blockd: 3, Computed: MaxComputed + 1, BasePort: 7400},
		{DataDir: "d", Blockd: MaxBlockd, Computed: 2, BasePort: 7400},
	} {
		if _, err := Plan(o); err == nil {
			t.Errorf("Plan(%+v) accepted", o)
		}
	}
}
