// Package registry registers running nodes in etcd and answers who is in the cluster. A node has two records:
// its registration (schema.NodeKey), kept until the node is removed, and its liveness (schema.AliveKey),
// attached to an etcd lease that the node keeps alive. A node whose process dies stops renewing the lease, so
// within the lease TTL its liveness vanishes and it is reported down. It depends on metad/store, metad/schema
// and the API types.
package registry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"sync"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// ErrNodeUp is returned (wrapped) by Remove for a node that still holds a live lease.
var ErrNodeUp = errors.New("node is up")

// MinTTL is the shortest lease etcd grants reliably (it must outlast a leader election).
const MinTTL = 2 * time.Second

// Registration is a node's live presence in the cluster. Close it to leave at once.
type Registration struct {
	store    *store.Store
	node     *basaltv1.Node
	liveness *basaltv1.Liveness
	ttl      time.Duration
	log      *slog.Logger

	mu    sync.Mutex
	lease clientv3.LeaseID

	cancel context.CancelFunc
	done   chan struct{}
}

// Register records node (creating or refreshing its registration), publishes its liveness on a lease of the
// given TTL, and keeps that lease alive until Close or until ctx is cancelled. If the lease is lost (etcd
// unreachable for longer than the TTL) it registers again with a new lease as soon as etcd answers.
func Register(ctx context.Context, s *store.Store, node *basaltv1.Node, version string, ttl time.Duration, log *slog.Logger) (*Registration, error) {
	if err := schema.ValidateName("node", node.GetId()); err != nil {
		return nil, err
	}
	if ttl < MinTTL {
		return nil, fmt.Errorf("lease TTL %s is shorter than the minimum %s", ttl, MinTTL)
	}
	if err := upsertNode(ctx, s, node); err != nil {
		return nil, err
	}
	r := &Registration{
		store: s,
		node:  node,
		liveness: &basaltv1.Liveness{
			LeaseTtlSeconds: int64(ttl / time.Second),
			Pid:             int32(os.Getpid()),
			Version:         version,
			StartedAt:       timestamppb.Now(),
		},
		ttl:  ttl,
		log:  log,
		done: make(chan struct{}),
	}
	// The renewal loop outlives ctx (which may only bound the registration itself); Close ends it.
	loopCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	ka, err := r.publish(ctx, loopCtx)
	if err != nil {
		cancel()
		return nil, err
	}
	r.cancel = cancel
	go r.keepAlive(loopCtx, ka)
	return r, nil
}

// upsertNode creates the node's registration or refreshes its address, keeping the first registration time.
// A registration of another kind under the same ID is an operator error, never silently overwritten.
func upsertNode(ctx context.Context, s *store.Store, node *basaltv1.Node) error {
	key := schema.NodeKey(node.GetId())
	for {
		cur, err := store.Get[basaltv1.Node](ctx, s, key)
		if errors.Is(err, store.ErrNotFound) {
			n := proto.Clone(node).(*basaltv1.Node)
			n.RegisteredAt = timestamppb.Now()
			_, err = s.Create(ctx, key, n)
			if errors.Is(err, store.ErrExists) {
				continue
			}
			if err == nil {
				node.RegisteredAt = n.RegisteredAt
			}
			return err
		}
		if err != nil {
			return err
		}
		if cur.Value.GetKind() != node.GetKind() {
			return fmt.Errorf("node ID %q is already registered as a %s node; choose another --node-id or remove that node first", node.GetId(), cur.Value.GetKind().Name())
		}
		n := proto.Clone(node).(*basaltv1.Node)
		n.RegisteredAt = cur.Value.GetRegisteredAt()
		_, err = s.Update(ctx, key, n, cur.ModRevision)
		if errors.Is(err, store.ErrConflict) {
			continue
		}
		if err == nil {
			node.RegisteredAt = n.RegisteredAt
		}
		return err
	}
}

// publish grants a lease and writes the liveness record on it; the lease is renewed until streamCtx ends.
func (r *Registration) publish(ctx, streamCtx context.Context) (<-chan *clientv3.LeaseKeepAliveResponse, error) {
	grant, err := r.store.Client.Grant(ctx, int64(r.ttl/time.Second))
	if err != nil {
		return nil, fmt.Errorf("grant lease for node %s: %w", r.node.GetId(), err)
	}
	live := proto.Clone(r.liveness).(*basaltv1.Liveness)
	live.LeaseId = int64(grant.ID)
	if _, err := r.store.Put(ctx, schema.AliveKey(r.node.GetId()), live, clientv3.WithLease(grant.ID)); err != nil {
		r.store.Client.Revoke(context.WithoutCancel(ctx), grant.ID)
		return nil, fmt.Errorf("publish liveness of node %s: %w", r.node.GetId(), err)
	}
	ka, err := r.store.Client.KeepAlive(streamCtx, grant.ID)
	if err != nil {
		r.store.Client.Revoke(context.WithoutCancel(ctx), grant.ID)
		return nil, fmt.Errorf("keep lease of node %s alive: %w", r.node.GetId(), err)
	}
	r.mu.Lock()
	r.lease = grant.ID
	r.mu.Unlock()
	return ka, nil
}

func (r *Registration) keepAlive(ctx context.Context, ka <-chan *clientv3.LeaseKeepAliveResponse) {
	defer close(r.done)
	backoff := 200 * time.Millisecond
	for {
		// Drain renewals; the channel closes when the lease is gone or the client gives up on it.
		for range ka {
		}
		// A closed client means the process is shutting down: nothing to renew with.
		if ctx.Err() != nil || r.store.Client.Ctx().Err() != nil {
			return
		}
		r.log.Warn("node lease lost; registering again", "node", r.node.GetId(), "lease", fmt.Sprintf("%x", r.Lease()))
		for {
			// Bound each attempt: with etcd unreachable a grant would otherwise wait forever.
			attemptCtx, cancelAttempt := context.WithTimeout(ctx, r.ttl)
			var err error
			ka, err = r.publish(attemptCtx, ctx)
			cancelAttempt()
			if err == nil {
				r.log.Info("node registered again", "node", r.node.GetId(), "lease", fmt.Sprintf("%x", r.Lease()))
				backoff = 200 * time.Millisecond
				break
			}
			if ctx.Err() != nil || r.store.Client.Ctx().Err() != nil {
				return
			}
			r.log.Warn("register node", "node", r.node.GetId(), "err", err, "retry_in", backoff)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, r.ttl/2)
		}
	}
}

// Lease returns the lease the node's liveness is currently attached to.
func (r *Registration) Lease() clientv3.LeaseID {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lease
}

// Close stops renewing and revokes the lease, so the node is reported down at once rather than after the TTL.
func (r *Registration) Close(ctx context.Context) error {
	r.cancel()
	lease := r.Lease()
	_, err := r.store.Client.Revoke(ctx, lease)
	<-r.done
	if err != nil {
		return fmt.Errorf("revoke lease of node %s: %w", r.node.GetId(), err)
	}
	return nil
}

// List returns nodes sorted by kind then ID, read at one revision so registration and liveness agree.
// kind UNSPECIFIED lists every kind; includeDown adds registered nodes without a live lease.
func List(ctx context.Context, s *store.Store, kind basaltv1.NodeKind, includeDown bool) ([]*basaltv1.NodeStatus, error) {
	nodes, rev, err := store.List[basaltv1.Node](ctx, s, schema.NodesPrefix)
	if err != nil {
		return nil, err
	}
	alive, err := s.Client.Get(ctx, schema.AlivePrefix, clientv3.WithPrefix(), clientv3.WithRev(rev))
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", schema.AlivePrefix, err)
	}
	live := make(map[string]*basaltv1.Liveness, len(alive.Kvs))
	for _, kv := range alive.Kvs {
		r, err := store.Decode[basaltv1.Liveness](string(kv.Key), kv.Value, kv.ModRevision, kv.CreateRevision, kv.Lease)
		if err != nil {
			return nil, err
		}
		live[schema.IDFromKey(schema.AlivePrefix, string(kv.Key))] = r.Value
	}
	out := make([]*basaltv1.NodeStatus, 0, len(nodes))
	for _, n := range nodes {
		if kind != basaltv1.NodeKind_NODE_KIND_UNSPECIFIED && n.Value.GetKind() != kind {
			continue
		}
		st := status(n.Value, live[n.Value.GetId()])
		if st.State == basaltv1.NodeState_NODE_STATE_DOWN && !includeDown {
			continue
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i].GetNode(), out[j].GetNode()
		if a.GetKind() != b.GetKind() {
			return a.GetKind() < b.GetKind()
		}
		return a.GetId() < b.GetId()
	})
	return out, nil
}

// Get returns one node's status; the error wraps store.ErrNotFound if it is not registered.
func Get(ctx context.Context, s *store.Store, id string) (*basaltv1.NodeStatus, error) {
	n, err := store.Get[basaltv1.Node](ctx, s, schema.NodeKey(id))
	if err != nil {
		return nil, err
	}
	l, err := store.Get[basaltv1.Liveness](ctx, s, schema.AliveKey(id))
	switch {
	case errors.Is(err, store.ErrNotFound):
		return status(n.Value, nil), nil
	case err != nil:
		return nil, err
	}
	return status(n.Value, l.Value), nil
}

func status(n *basaltv1.Node, l *basaltv1.Liveness) *basaltv1.NodeStatus {
	if l == nil {
		return &basaltv1.NodeStatus{Node: n, State: basaltv1.NodeState_NODE_STATE_DOWN}
	}
	return &basaltv1.NodeStatus{Node: n, State: basaltv1.NodeState_NODE_STATE_UP, Liveness: l}
}

// Remove deletes the registration of a node that is down. The check and the delete are one transaction, so a
// node that comes back at that instant is never removed while up.
func Remove(ctx context.Context, s *store.Store, id string) error {
	n, err := store.Get[basaltv1.Node](ctx, s, schema.NodeKey(id))
	if err != nil {
		return err
	}
	resp, err := s.Client.Txn(ctx).
		If(
			clientv3.Compare(clientv3.CreateRevision(schema.AliveKey(id)), "=", 0),
			clientv3.Compare(clientv3.ModRevision(n.Key), "=", n.ModRevision),
		).
		Then(clientv3.OpDelete(n.Key)).
		Commit()
	if err != nil {
		return fmt.Errorf("remove node %s: %w", id, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("remove node %s: %w (stop its process first, or wait for its lease to expire)", id, ErrNodeUp)
	}
	return nil
}
