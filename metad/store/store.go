// Package store is a typed record store over the etcd v3 client. Records are protobuf messages; every read
// returns the record's revision and every update can be made conditional on it (compare-and-swap), so
// controllers never overwrite a change they did not see. Key names come from metad/schema. It depends on the
// etcd client and protobuf only.
package store

import (
	"context"
	"errors"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
)

var (
	// ErrNotFound is returned (wrapped) when a key does not exist.
	ErrNotFound = errors.New("not found")
	// ErrExists is returned (wrapped) by Create when the key already exists.
	ErrExists = errors.New("already exists")
	// ErrConflict is returned (wrapped) when a conditional write lost a race: the record changed (or vanished)
	// since the revision the caller read.
	ErrConflict = errors.New("changed concurrently")
)

// Store reads and writes typed records in etcd.
type Store struct {
	Client *clientv3.Client
}

// New returns a Store on an etcd client. The caller owns the client.
func New(c *clientv3.Client) *Store { return &Store{Client: c} }

// Message is the constraint for record types: P is a pointer to a generated protobuf message M.
type Message[M any] interface {
	*M
	proto.Message
}

// Record is a decoded value with the etcd revisions needed to update it safely.
type Record[P proto.Message] struct {
	Key   string
	Value P
	// ModRevision is the revision of the last write to the key; pass it to Update or Delete.
	ModRevision int64
	// CreateRevision is the revision at which the key was created.
	CreateRevision int64
	// Lease is the lease the key is attached to, 0 for none.
	Lease clientv3.LeaseID
}

// Decode turns an etcd key-value into a Record.
func Decode[M any, P Message[M]](key string, value []byte, modRev, createRev, lease int64) (Record[P], error) {
	p := P(new(M))
	if err := proto.Unmarshal(value, p); err != nil {
		return Record[P]{}, fmt.Errorf("decode %s: %w", key, err)
	}
	return Record[P]{Key: key, Value: p, ModRevision: modRev, CreateRevision: createRev, Lease: clientv3.LeaseID(lease)}, nil
}

func encode(key string, m proto.Message) (string, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return "", fmt.Errorf("encode %s: %w", key, err)
	}
	return string(b), nil
}

// Get reads one record.
func Get[M any, P Message[M]](ctx context.Context, s *Store, key string) (Record[P], error) {
	resp, err := s.Client.Get(ctx, key)
	if err != nil {
		return Record[P]{}, fmt.Errorf("get %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return Record[P]{}, fmt.Errorf("get %s: %w", key, ErrNotFound)
	}
	kv := resp.Kvs[0]
	return Decode[M, P](key, kv.Value, kv.ModRevision, kv.CreateRevision, kv.Lease)
}

// List reads every record under prefix, in key order, and the store revision they were read at (for starting a
// watch that misses nothing).
func List[M any, P Message[M]](ctx context.Context, s *Store, prefix string) ([]Record[P], int64, error) {
	resp, err := s.Client.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("list %s: %w", prefix, err)
	}
	out := make([]Record[P], 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		r, err := Decode[M, P](string(kv.Key), kv.Value, kv.ModRevision, kv.CreateRevision, kv.Lease)
		if err != nil {
			return nil, 0, err
		}
		out = append(out, r)
	}
	return out, resp.Header.Revision, nil
}

// Create writes a record that must not exist yet and returns its revision.
func (s *Store) Create(ctx context.Context, key string, m proto.Message, opts ...clientv3.OpOption) (int64, error) {
	v, err := encode(key, m)
	if err != nil {
		return 0, err
	}
	resp, err := s.Client.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, v, opts...)).
		Commit()
	if err != nil {
		return 0, fmt.Errorf("create %s: %w", key, err)
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("create %s: %w", key, ErrExists)
	}
	return resp.Header.Revision, nil
}

// Update overwrites a record only if it is still at modRevision, and returns the new revision.
func (s *Store) Update(ctx context.Context, key string, m proto.Message, modRevision int64, opts ...clientv3.OpOption) (int64, error) {
	v, err := encode(key, m)
	if err != nil {
		return 0, err
	}
	resp, err := s.Client.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", modRevision)).
		Then(clientv3.OpPut(key, v, opts...)).
		Commit()
	if err != nil {
		return 0, fmt.Errorf("update %s: %w", key, err)
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("update %s at revision %d: %w", key, modRevision, ErrConflict)
	}
	return resp.Header.Revision, nil
}

// Put writes a record unconditionally. Use it only for records a single owner writes (a node's own liveness).
func (s *Store) Put(ctx context.Context, key string, m proto.Message, opts ...clientv3.OpOption) (int64, error) {
	v, err := encode(key, m)
	if err != nil {
		return 0, err
	}
	resp, err := s.Client.Put(ctx, key, v, opts...)
	if err != nil {
		return 0, fmt.Errorf("put %s: %w", key, err)
	}
	return resp.Header.Revision, nil
}

// Delete removes a record only if it is still at modRevision.
func (s *Store) Delete(ctx context.Context, key string, modRevision int64) error {
	resp, err := s.Client.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", modRevision)).
		Then(clientv3.OpDelete(key)).
		Commit()
	if err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("delete %s at revision %d: %w", key, modRevision, ErrConflict)
	}
	return nil
}
