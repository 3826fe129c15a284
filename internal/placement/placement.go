// Package placement decides where data lives. A volume's address space is cut into fixed-size objects; an
// object hashes into one of its pool's placement groups (PGs); a PG maps to an ordered set of storage nodes in
// distinct failure domains, computed from the cluster map alone, so every node that holds the same map epoch
// computes the same answer without asking anyone. The first node of a PG's acting set is its primary.
//
// The mapping from PG to nodes is rendezvous (highest-random-weight) hashing: each candidate node gets a
// pseudo-random score for the PG and the highest scores win. Adding or removing one node moves only the PGs
// that node wins or held (about 1/N of them), which keeps recovery traffic proportional to the change.
// It depends only on the API types and the standard library.
package placement

import (
	"encoding/binary"
	"slices"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"
)

// ObjectSize is the size of the pieces a volume is cut into: large enough that per-object metadata stays
// small, small enough that recovery and rebalancing move data in fine steps.
const ObjectSize = 4 << 20

// PG names a placement group.
type PG struct {
	Pool uint32
	Num  uint32
}

// hash64 is a fixed, process-independent hash: every node must compute the same placement, so a seeded hash
// such as hash/maphash (random seed per process) would not do.
func hash64(parts ...uint64) uint64 {
	var b [8]byte
	// FNV-1a over the little-endian words, then a final mix (splitmix64) for avalanche.
	h := uint64(14695981039346656037)
	for _, p := range parts {
		binary.LittleEndian.PutUint64(b[:], p)
		for _, c := range b {
			h ^= uint64(c)
			h *= 1099511628211
		}
	}
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	return h
}

func hashString(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return h
}

// ObjectPG returns the PG of object index idx of volume vol in pool p.
func ObjectPG(p *basaltv1.Pool, vol, idx uint64) PG {
	return PG{Pool: p.GetId(), Num: uint32(hash64(vol, idx) % uint64(max(p.GetPgCount(), 1)))}
}

// Members returns the PG's members in order: the highest-scoring nodes among those that are in, at most one
// per failure domain, up to the pool's replication factor. Members that are down stay members (they keep their
// place and catch up when they return); ActingSet filters them out.
func Members(m *basaltv1.ClusterMap, p *basaltv1.Pool, pg PG) []*basaltv1.StorageNode {
	type cand struct {
		n     *basaltv1.StorageNode
		score uint64
	}
	cands := make([]cand, 0, len(m.GetNodes()))
	for _, n := range m.GetNodes() {
		if n.GetIn() {
			cands = append(cands, cand{n, hash64(uint64(pg.Pool), uint64(pg.Num), hashString(n.GetId()))})
		}
	}
	slices.SortFunc(cands, func(a, b cand) int {
		switch {
		case a.score > b.score:
			return -1
		case a.score < b.score:
			return 1
		}
		return 0
	})
	want := int(p.GetReplicas())
	out := make([]*basaltv1.StorageNode, 0, want)
	domains := make(map[string]bool, want)
	for _, c := range cands {
		if len(out) == want {
			break
		}
		if domains[c.n.GetFailureDomain()] {
			continue
		}
		domains[c.n.GetFailureDomain()] = true
		out = append(out, c.n)
	}
	return out
}

// ActingSet returns the members of the PG that are up, in order; the first is the primary. An empty set means
// the PG is unavailable (every member is down).
func ActingSet(m *basaltv1.ClusterMap, p *basaltv1.Pool, pg PG) []*basaltv1.StorageNode {
	members := Members(m, p, pg)
	out := members[:0:0]
	for _, n := range members {
		if n.GetUp() {
			out = append(out, n)
		}
	}
	return out
}

// Pool returns the named pool of the map, or nil.
func Pool(m *basaltv1.ClusterMap, name string) *basaltv1.Pool {
	for _, p := range m.GetPools() {
		if p.GetName() == name {
			return p
		}
	}
	return nil
}

// Node returns the storage node with the given ID, or nil.
func Node(m *basaltv1.ClusterMap, id string) *basaltv1.StorageNode {
	for _, n := range m.GetNodes() {
		if n.GetId() == id {
			return n
		}
	}
	return nil
}
