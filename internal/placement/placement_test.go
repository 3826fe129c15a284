package placement

import (
	"fmt"
	"testing"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"
)

func testMap(nodes, domains int) *basaltv1.ClusterMap {
	m := &basaltv1.ClusterMap{Epoch: 1}
	for i := range nodes {
		m.Nodes = append(m.Nodes, &basaltv1.StorageNode{
			Id: fmt.Sprintf("blockd-%d", i+1), FailureDomain: fmt.Sprintf("rack-%d", i%domains), Up: true, In: true,
		})
	}
	return m
}

var pool = &basaltv1.Pool{Name: "default", Id: 1, Replicas: 3, PgCount: 256}

func TestMembersAreDistinctDomainsAndDeterministic(t *testing.T) {
	m := testMap(9, 3)
	for pg := range pool.GetPgCount() {
		a := Members(m, pool, PG{1, pg})
		b := Members(m, pool, PG{1, pg})
		if len(a) != 3 {
			t.Fatalf("PG %d has %d members, want 3", pg, len(a))
		}
		seen := map[string]bool{}
		for i, n := range a {
			if seen[n.GetFailureDomain()] {
				t.Fatalf("PG %d: two members in %s", pg, n.GetFailureDomain())
			}
			seen[n.GetFailureDomain()] = true
			if b[i].GetId() != n.GetId() {
				t.Fatalf("PG %d: placement is not deterministic", pg)
			}
		}
	}
	// Fewer domains than replicas: as many members as domains, never two in one domain.
	if got := Members(testMap(4, 2), pool, PG{1, 7}); len(got) != 2 {
		t.Fatalf("2 domains gave %d members, want 2", len(got))
	}
}

func TestPrimariesAreBalanced(t *testing.T) {
	m := testMap(6, 6)
	big := &basaltv1.Pool{Id: 2, Replicas: 3, PgCount: 6000}
	count := map[string]int{}
	for pg := range big.GetPgCount() {
		count[ActingSet(m, big, PG{2, pg})[0].GetId()]++
	}
	for id, c := range count {
		// 1000 expected per node; a fair hash stays well within ±15%.
		if c < 850 || c > 1150 {
			t.Errorf("%s is primary of %d PGs, want about 1000 (counts %v)", id, c, count)
		}
	}
}

func TestLosingANodeMovesOnlyItsPGs(t *testing.T) {
	m := testMap(6, 6)
	before := map[uint32][]string{}
	for pg := range pool.GetPgCount() {
		for _, n := range Members(m, pool, PG{1, pg}) {
			before[pg] = append(before[pg], n.GetId())
		}
	}
	// blockd-3 goes down: it stays a member (no data moves) but leaves the acting set.
	m.Nodes[2].Up = false
	for pg := range pool.GetPgCount() {
		mem := Members(m, pool, PG{1, pg})
		act := ActingSet(m, pool, PG{1, pg})
		held := false
		for i, n := range mem {
			if n.GetId() != before[pg][i] {
				t.Fatalf("PG %d: a node going down changed the members", pg)
			}
			held = held || n.GetId() == "blockd-3"
		}
		if held && len(act) != 2 || !held && len(act) != 3 {
			t.Fatalf("PG %d: acting set %d members (held by the down node: %v)", pg, len(act), held)
		}
	}
	// blockd-3 goes out: only PGs that held it change, and in each only its slot is refilled.
	m.Nodes[2].In = false
	moved := 0
	for pg := range pool.GetPgCount() {
		mem := Members(m, pool, PG{1, pg})
		changed := 0
		oldSet := map[string]bool{}
		for _, id := range before[pg] {
			oldSet[id] = true
		}
		for _, n := range mem {
			if !oldSet[n.GetId()] {
				changed++
			}
		}
		if oldSet["blockd-3"] {
			moved++
			if changed != 1 {
				t.Fatalf("PG %d: %d new members after one node went out, want 1", pg, changed)
			}
		} else if changed != 0 {
			t.Fatalf("PG %d did not hold blockd-3 but changed", pg)
		}
	}
	if moved == 0 || moved > int(pool.GetPgCount())*3/6*12/10 {
		t.Fatalf("%d PGs moved, want about half (3 of 6 nodes per PG)", moved)
	}
}

func TestObjectPGSpreads(t *testing.T) {
	hits := make([]int, pool.GetPgCount())
	for idx := range uint64(256 * 100) {
		hits[ObjectPG(pool, 42, idx).Num]++
	}
	for pg, h := range hits {
		if h < 50 || h > 150 {
			t.Fatalf("PG %d got %d of 25600 objects, want about 100", pg, h)
		}
	}
}
