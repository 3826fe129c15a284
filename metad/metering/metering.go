// Package metering keeps VMs' metering histories in etcd (docs/compute.md, "Metering"): the samples the host a
// VM runs on appends once a minute, one record per VM per hour (schema.VMMeteringKey), kept for a day. Each
// append is a compare-and-swap of one hour's record, so two hosts appending at once (around a migration's
// switchover) never lose each other's samples, and an append rewrites at most an hour of samples: etcd keeps
// every version of a key until it compacts, so one record holding the whole day would cost a day's worth of
// storage per VM per minute. It depends on metad/store and metad/schema and the API types.
package metering

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
)

// Retention is the age past which samples are dropped.
const Retention = 24 * time.Hour

// maxAttempts bounds the compare-and-swap retries of one record's append: it has one writer most of the time
// and two around a migration, so losing this many races in a row means something else is wrong.
const maxAttempts = 20

// ErrVMGone is returned by Append when the VM's declaration no longer exists: deleting a VM deletes its
// history, and a late sample must not bring it back.
var ErrVMGone = errors.New("the VM's declaration is gone")

// Append adds samples to the VM's history, each to the record of the hour its interval ends in. A record is
// written only if neither it nor the VM's declaration changed since it was read (again from the read when they
// did). Samples already stored (same host and start: a write that succeeded although its answer was lost) are
// not added twice. A record keeps at most perHour samples (the newest). Records older than Retention are
// deleted.
func Append(ctx context.Context, s *store.Store, name string, add []*basaltv1.VMMeteringSample, perHour int, now time.Time) error {
	byKey := map[string][]*basaltv1.VMMeteringSample{}
	var keys []string
	for _, smp := range add {
		k := schema.VMMeteringKey(name, smp.GetEnd().AsTime())
		if byKey[k] == nil {
			keys = append(keys, k)
		}
		byKey[k] = append(byKey[k], smp)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if err := appendRecord(ctx, s, name, k, byKey[k], perHour, now); err != nil {
			return err
		}
	}
	return expire(ctx, s, name, now)
}

func appendRecord(ctx context.Context, s *store.Store, name, key string, add []*basaltv1.VMMeteringSample, limit int, now time.Time) error {
	vmKey := schema.VMKey(name)
	for range maxAttempts {
		// One transaction reads both, so the revisions compared below are of one moment.
		resp, err := s.Client.Txn(ctx).Then(clientv3.OpGet(vmKey, clientv3.WithKeysOnly()), clientv3.OpGet(key)).Commit()
		if err != nil {
			return fmt.Errorf("read the metering history of %s: %w", name, err)
		}
		vms := resp.Responses[0].GetResponseRange().GetKvs()
		if len(vms) == 0 {
			return ErrVMGone
		}
		hist := &basaltv1.VMMeteringHistory{}
		var mod int64 // 0 compares equal to a key that does not exist
		if kvs := resp.Responses[1].GetResponseRange().GetKvs(); len(kvs) > 0 {
			if err := proto.Unmarshal(kvs[0].Value, hist); err != nil {
				return fmt.Errorf("decode the metering history of %s: %w", name, err)
			}
			mod = kvs[0].ModRevision
		}
		hist.Samples = Merge(hist.Samples, add, limit, now)
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(hist)
		if err != nil {
			return fmt.Errorf("encode the metering history of %s: %w", name, err)
		}
		put, err := s.Client.Txn(ctx).If(
			clientv3.Compare(clientv3.ModRevision(key), "=", mod),
			clientv3.Compare(clientv3.CreateRevision(vmKey), "=", vms[0].CreateRevision),
		).Then(clientv3.OpPut(key, string(b))).Commit()
		if err != nil {
			return fmt.Errorf("write the metering history of %s: %w", name, err)
		}
		if put.Succeeded {
			return nil
		}
	}
	return fmt.Errorf("append to the metering history of %s: %w %d times in a row", name, store.ErrConflict, maxAttempts)
}

// expire deletes the VM's records of hours that ended more than Retention ago.
func expire(ctx context.Context, s *store.Store, name string, now time.Time) error {
	prefix := schema.VMMeteringVMPrefix(name)
	resp, err := s.Client.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return fmt.Errorf("list the metering records of %s: %w", name, err)
	}
	oldest := schema.VMMeteringKey(name, now.Add(-Retention))
	for _, kv := range resp.Kvs {
		if string(kv.Key) >= oldest {
			break // keys sort by hour
		}
		if _, err := s.Client.Delete(ctx, string(kv.Key)); err != nil {
			return fmt.Errorf("expire the metering record %s: %w", kv.Key, err)
		}
	}
	return nil
}

// History returns the VM's samples, oldest first, without those older than Retention.
func History(ctx context.Context, s *store.Store, name string) ([]*basaltv1.VMMeteringSample, error) {
	resp, err := s.Client.Get(ctx, schema.VMMeteringVMPrefix(name), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read the metering history of %s: %w", name, err)
	}
	var out []*basaltv1.VMMeteringSample
	for _, kv := range resp.Kvs {
		hist := &basaltv1.VMMeteringHistory{}
		if err := proto.Unmarshal(kv.Value, hist); err != nil {
			return nil, fmt.Errorf("decode the metering record %s: %w", kv.Key, err)
		}
		out = append(out, hist.GetSamples()...)
	}
	cut := time.Now().Add(-Retention)
	return slices.DeleteFunc(out, func(s *basaltv1.VMMeteringSample) bool { return s.GetEnd().AsTime().Before(cut) }), nil
}

// DeleteOp deletes every metering record of the VM (in the transaction that deletes its declaration).
func DeleteOp(name string) clientv3.Op {
	return clientv3.OpDelete(schema.VMMeteringVMPrefix(name), clientv3.WithPrefix())
}

// Merge adds add to stored, skipping samples stored already, and returns them in the order of their ends
// (oldest first: two hosts' samples may arrive out of order), without those older than Retention and at most
// limit of them (the newest).
func Merge(stored, add []*basaltv1.VMMeteringSample, limit int, now time.Time) []*basaltv1.VMMeteringSample {
	type id struct {
		host  string
		start int64
	}
	have := make(map[id]bool, len(stored))
	for _, s := range stored {
		have[id{s.GetHost(), s.GetStart().AsTime().UnixNano()}] = true
	}
	out := slices.Clone(stored)
	for _, s := range add {
		if k := (id{s.GetHost(), s.GetStart().AsTime().UnixNano()}); !have[k] {
			have[k] = true
			out = append(out, s)
		}
	}
	slices.SortStableFunc(out, func(a, b *basaltv1.VMMeteringSample) int {
		return cmp.Compare(a.GetEnd().AsTime().UnixNano(), b.GetEnd().AsTime().UnixNano())
	})
	cut := now.Add(-Retention)
	out = slices.DeleteFunc(out, func(s *basaltv1.VMMeteringSample) bool { return s.GetEnd().AsTime().Before(cut) })
	if len(out) > limit {
		out = out[len(out)-limit:]
	}
	return out
}
