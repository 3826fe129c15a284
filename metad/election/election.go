// Package election elects one leader among the replicas of a controller (the HA controller, the recovery
// scheduler) through etcd. A leader holds leadership through an etcd session lease: if its process dies or
// loses etcd, the lease expires and the next candidate in line takes over within the TTL. It depends on the
// etcd client's concurrency package and metad/schema.
package election

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/basalt-hv/basalt/metad/schema"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// ErrNoLeader is returned (wrapped) by Leader when nobody leads the election.
var ErrNoLeader = errors.New("no leader")

// Leadership is held by the winner of an election until it resigns or loses its lease.
type Leadership struct {
	Name      string
	Candidate string
	session   *concurrency.Session
	election  *concurrency.Election
}

// Campaign blocks until candidate leads the named election, or ctx ends. ttl is how long leadership survives
// the leader's silence: the hand-over time after a leader dies.
func Campaign(ctx context.Context, c *clientv3.Client, name, candidate string, ttl time.Duration) (*Leadership, error) {
	if err := schema.ValidateName("election", name); err != nil {
		return nil, err
	}
	secs := int(ttl / time.Second)
	if secs < 1 {
		secs = 1
	}
	// The session's lease must outlive ctx: ctx bounds the campaign, not the leadership.
	s, err := concurrency.NewSession(c, concurrency.WithTTL(secs), concurrency.WithContext(context.WithoutCancel(ctx)))
	if err != nil {
		return nil, fmt.Errorf("open etcd session for election %s: %w", name, err)
	}
	e := concurrency.NewElection(s, schema.ElectionPrefix(name))
	if err := e.Campaign(ctx, candidate); err != nil {
		s.Close()
		return nil, fmt.Errorf("campaign in election %s as %s: %w", name, candidate, err)
	}
	return &Leadership{Name: name, Candidate: candidate, session: s, election: e}, nil
}

// Done is closed when leadership is lost (the session's lease expired or was revoked). A leader must stop
// acting as leader when it fires: someone else may already lead.
func (l *Leadership) Done() <-chan struct{} { return l.session.Done() }

// Resign gives leadership up at once so the next candidate takes over without waiting for the TTL.
func (l *Leadership) Resign(ctx context.Context) error {
	err := l.election.Resign(ctx)
	cerr := l.session.Close()
	if err != nil {
		return fmt.Errorf("resign from election %s: %w", l.Name, err)
	}
	if cerr != nil {
		return fmt.Errorf("close session of election %s: %w", l.Name, cerr)
	}
	return nil
}

// Leader returns the candidate that currently leads the named election.
func Leader(ctx context.Context, c *clientv3.Client, name string) (string, error) {
	resp, err := c.Get(ctx, schema.ElectionPrefix(name), clientv3.WithFirstCreate()...)
	if err != nil {
		return "", fmt.Errorf("read leader of election %s: %w", name, err)
	}
	if len(resp.Kvs) == 0 {
		return "", fmt.Errorf("election %s: %w", name, ErrNoLeader)
	}
	return string(resp.Kvs[0].Value), nil
}

// Run campaigns in the named election and calls lead while candidate leads, with a context that ends when
// leadership is lost (or ctx ends); then campaigns again, until ctx ends. It is the loop of every leader-elected
// controller: a controller only writes lead. On the way out it resigns, so the next candidate takes over at once.
func Run(ctx context.Context, c *clientv3.Client, name, candidate string, ttl time.Duration, log *slog.Logger, lead func(ctx context.Context)) {
	for ctx.Err() == nil {
		l, err := Campaign(ctx, c, name, candidate, ttl)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Warn("campaign", "election", name, "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		log.Info("leading", "election", name)
		lctx, cancel := context.WithCancel(ctx)
		go func() {
			select {
			case <-l.Done():
			case <-lctx.Done():
			}
			cancel()
		}()
		lead(lctx)
		cancel()
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		l.Resign(rctx)
		rcancel()
		if ctx.Err() == nil {
			log.Warn("leadership lost", "election", name)
		}
	}
}
