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

func TestPlanRejectsBadOptions(t *testing.T) {
	for _, o := range []Options{
		{DataDir: "d", Blockd: 0, BasePort: 7400},
		{DataDir: "d", Blockd: MaxBlockd + 1, BasePort: 7400},
		{DataDir: "d", Blockd: 3, BasePort: 80},
		{DataDir: "d", Blockd: 3, BasePort: 65500},
	} {
		if _, err := Plan(o); err == nil {
			t.Errorf("Plan(%+v) accepted", o)
		}
	}
}
