package registry

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// MetadataFormat is the version of the key layout and record encoding this build reads and writes. A daemon
// refuses to join a cluster whose metadata has another format.
const MetadataFormat = 1

// ErrNoCluster is returned (wrapped) by CheckCluster when etcd holds no Basalt cluster yet.
var ErrNoCluster = errors.New("no Basalt cluster in etcd")

// InitCluster returns the cluster's identity, creating it if this is the first metad to start on this etcd.
func InitCluster(ctx context.Context, s *store.Store) (*basaltv1.ClusterInfo, error) {
	id := make([]byte, 8)
	if _, err := rand.Read(id); err != nil {
		return nil, fmt.Errorf("generate cluster ID: %w", err)
	}
	info := &basaltv1.ClusterInfo{ClusterId: hex.EncodeToString(id), CreatedAt: timestamppb.Now(), DataFormat: MetadataFormat}
	_, err := s.Create(ctx, schema.Cluster, info)
	if err == nil {
		return info, nil
	}
	if !errors.Is(err, store.ErrExists) {
		return nil, fmt.Errorf("initialise cluster: %w", err)
	}
	return CheckCluster(ctx, s)
}

// CheckCluster returns the cluster's identity and checks that this build understands its metadata.
func CheckCluster(ctx context.Context, s *store.Store) (*basaltv1.ClusterInfo, error) {
	r, err := store.Get[basaltv1.ClusterInfo](ctx, s, schema.Cluster)
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("%w (start metad first: it initialises the cluster)", ErrNoCluster)
	}
	if err != nil {
		return nil, fmt.Errorf("read cluster identity: %w", err)
	}
	if f := r.Value.GetDataFormat(); f != MetadataFormat {
		return nil, fmt.Errorf("cluster %s has metadata format %d; this build reads format %d", r.Value.GetClusterId(), f, MetadataFormat)
	}
	return r.Value, nil
}
