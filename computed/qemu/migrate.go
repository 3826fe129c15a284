package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/computed/qemu/qmp"
)

// A migration URI from StartIncoming is QEMU's "tcp:HOST:PORT" followed by "#compress=<method>&layout=<digest>":
// the stream settings the destination was prepared for and a fingerprint of its PCI layout. Migrate strips the
// fragment before handing the URI to QEMU and refuses a destination whose settings or layout do not match the
// source's, with a clear error, instead of letting QEMU fail half way through the stream.

// defaultDowntime is the longest switchover pause when MigrateOptions.MaxDowntime is 0 (QEMU's own default).
const defaultDowntime = 300 * time.Millisecond

// unlimitedBandwidth stands in for "no limit": QEMU's max-bandwidth has no such value (its default is a
// conservative 32 MiB/s, far below what a host link carries).
const unlimitedBandwidth = 1 << 40

// StartIncomingWith is StartIncoming for a stream with opts' settings: with opts.Compress the destination is
// prepared for multifd with zstd (or zlib, if this QEMU lacks zstd), and the URI tells the source which.
func (d *Driver) StartIncomingWith(ctx context.Context, spec hypervisor.Spec, listenHost string, opts hypervisor.MigrateOptions) (hypervisor.Machine, string, error) {
	// The URI carries the listen address to the source, so it must be one the source can reach.
	if ip := net.ParseIP(listenHost); listenHost == "" || ip != nil && ip.IsUnspecified() {
		return nil, "", fmt.Errorf("qemu: machine %s: incoming migration needs a listen address the source can reach, not %q", spec.ID, listenHost)
	}
	m, err := d.launch(ctx, spec, true)
	if err != nil {
		return nil, "", err
	}
	uri, err := m.listen(ctx, listenHost, opts)
	if err != nil {
		m.Kill(context.WithoutCancel(ctx))
		m.Close()
		return nil, "", err
	}
	d.log.Info("qemu machine waiting for migration", "id", spec.ID, "uri", uri)
	return m, uri, nil
}

func (m *machine) listen(ctx context.Context, host string, opts hypervisor.MigrateOptions) (string, error) {
	compress := "none"
	caps := []map[string]any{{"capability": "multifd", "state": opts.Compress}}
	if err := m.qmp.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil); err != nil {
		return "", m.errf(err, "prepare incoming migration")
	}
	if opts.Compress {
		// zstd compresses better and faster than zlib; a QEMU built without it rejects the value.
		for _, method := range []string{"zstd", "zlib"} {
			err := m.qmp.Execute(ctx, "migrate-set-parameters", map[string]any{"multifd-compression": method}, nil)
			if err == nil {
				compress = method
				break
			}
			var qe *qmp.Error
			if !errors.As(err, &qe) {
				return "", m.errf(err, "prepare incoming migration")
			}
		}
		if compress == "none" {
			return "", m.errf(errors.New("this QEMU supports neither zstd nor zlib multifd compression"), "prepare incoming migration")
		}
	}
	// Port 0: the kernel picks a free port, QEMU reports it; no race with another listener.
	if err := m.qmp.Execute(ctx, "migrate-incoming", map[string]any{"uri": "tcp:" + net.JoinHostPort(host, "0")}, nil); err != nil {
		return "", m.errf(err, "listen for migration on %s", host)
	}
	mig, err := m.queryMigrate(ctx)
	if err != nil {
		return "", m.errf(err, "listen for migration")
	}
	var port string
	for _, a := range mig.SocketAddress {
		if a.Type == "inet" {
			port = a.Port
		}
	}
	if port == "" {
		return "", m.errf(fmt.Errorf("QEMU reported no listening port (%+v)", mig.SocketAddress), "listen for migration")
	}
	layout, err := m.portLayout(ctx)
	if err != nil {
		return "", m.errf(err, "listen for migration")
	}
	frag := url.Values{"compress": {compress}, "layout": {layoutDigest(layout)}}
	return "tcp:" + net.JoinHostPort(host, port) + "#" + frag.Encode(), nil
}

// migrationInfo is query-migrate's answer.
type migrationInfo struct {
	Status        string
	TotalTime     uint64 `json:"total-time"`
	Downtime      uint64 // ms, once completed
	SetupTime     uint64 `json:"setup-time"`
	ErrorDesc     string `json:"error-desc"`
	SocketAddress []struct {
		Type, Host, Port string
	} `json:"socket-address"`
	RAM *struct {
		Transferred uint64
		Remaining   uint64
		Total       uint64
		Mbps        float64
		DirtySync   uint64 `json:"dirty-sync-count"`
	} `json:"ram"`
}

func (m *machine) queryMigrate(ctx context.Context) (migrationInfo, error) {
	var mi migrationInfo
	err := m.qmp.Execute(ctx, "query-migrate", nil, &mi)
	return mi, err
}

// status converts query-migrate's answer. TransferredBytes is QEMU's ram.transferred, which QEMU 7.2 counts
// before compression when multifd compresses: it says how much memory was sent, not how many bytes crossed.
func (mi migrationInfo) status() hypervisor.MigrationStatus {
	st := hypervisor.MigrationStatus{Status: mi.Status}
	if mi.RAM != nil {
		st.TransferredBytes, st.RemainingBytes, st.TotalBytes = mi.RAM.Transferred, mi.RAM.Remaining, mi.RAM.Total
	}
	if mi.Status == "completed" {
		st.Downtime = time.Duration(mi.Downtime) * time.Millisecond
	}
	return st
}

func migrationActive(status string) bool {
	switch status {
	case "", "none", "completed", "failed", "cancelled":
		return false
	}
	return true
}

// Migrate sends the machine to uri (from the destination's StartIncoming). Disk safety at the switchover rests
// on three things: QEMU stops the guest and flushes and inactivates its block nodes (no more NBD writes from
// the source) before it sends the final device state; the destination opened its NBD exports inactive at start
// and activates them only after loading that state; and with the return-path capability the source reports
// "completed" only after the destination confirmed the load, so a destination that fails to load leaves the
// source to resume (QEMU reactivates the disks and restarts the guest) instead of leaving no copy running.
func (m *machine) Migrate(ctx context.Context, uri string, opts hypervisor.MigrateOptions, progress func(hypervisor.MigrationStatus)) (hypervisor.MigrationStatus, error) {
	m.migrating.Lock()
	defer m.migrating.Unlock()
	target, params, err := parseMigrationURI(uri)
	if err != nil {
		return hypervisor.MigrationStatus{}, m.errf(err, "migrate")
	}
	compress := params.Get("compress")
	if compress == "" {
		compress = "none"
	}
	if opts.Compress != (compress != "none") {
		return hypervisor.MigrationStatus{}, m.errf(fmt.Errorf("the destination expects compression %q, the options ask for compress=%t", compress, opts.Compress), "migrate")
	}
	if want := params.Get("layout"); want != "" {
		layout, err := m.portLayout(ctx)
		if err != nil {
			return hypervisor.MigrationStatus{}, m.errf(err, "migrate")
		}
		if got := layoutDigest(layout); got != want {
			return hypervisor.MigrationStatus{}, m.errf(fmt.Errorf("the destination's PCI layout (%s) differs from this machine's (%s: %s); after hot-plug the destination's Spec must list the devices in port order",
				want, got, strings.Join(layout, ",")), "migrate")
		}
	}
	st, err := m.status(ctx)
	if err != nil {
		return hypervisor.MigrationStatus{}, m.errf(err, "migrate")
	}
	if st.Status != "running" && st.Status != "paused" {
		return hypervisor.MigrationStatus{}, m.errf(fmt.Errorf("machine is %s", st.Status), "migrate")
	}

	caps := []map[string]any{
		{"capability": "return-path", "state": true},
		// Without it a guest that dirties memory faster than the link carries it never converges; with it QEMU
		// throttles the vCPUs progressively until the remainder fits the downtime limit.
		{"capability": "auto-converge", "state": true},
		{"capability": "multifd", "state": opts.Compress},
		// QEMU stops in "pre-switchover" with the guest stopped and its disks flushed, before the device state
		// goes out, until migrate-continue: the moment the disks' attachment generation moves.
		{"capability": "pause-before-switchover", "state": opts.BeforeSwitchover != nil},
	}
	if err := m.qmp.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil); err != nil {
		return hypervisor.MigrationStatus{}, m.errf(err, "migrate: set capabilities")
	}
	bw := opts.BandwidthBytes
	if bw == 0 {
		bw = unlimitedBandwidth
	}
	downtime := opts.MaxDowntime
	if downtime == 0 {
		downtime = defaultDowntime
	}
	mp := map[string]any{"max-bandwidth": bw, "downtime-limit": downtime.Milliseconds()}
	if opts.Compress {
		mp["multifd-compression"] = compress
	}
	if err := m.qmp.Execute(ctx, "migrate-set-parameters", mp, nil); err != nil {
		return hypervisor.MigrationStatus{}, m.errf(err, "migrate: set parameters")
	}
	sw := &switchover{m: m, hook: opts.BeforeSwitchover}
	if sw.hook != nil {
		// Subscribed before the migration starts, so the event cannot be missed; the poll below is the backstop.
		sub := m.qmp.Subscribe("MIGRATION")
		defer sub.Close()
		go sw.watch(ctx, sub)
	}
	if err := m.qmp.Execute(ctx, "migrate", map[string]any{"uri": target}, nil); err != nil {
		return hypervisor.MigrationStatus{}, m.errf(err, "migrate to %s", target)
	}
	m.d.log.Info("qemu migration started", "id", m.spec.ID, "to", target, "compress", compress)

	final, err := m.followMigration(ctx, progress, sw)
	if err == nil && final.Status == "completed" {
		m.d.log.Info("qemu migration completed", "id", m.spec.ID, "to", target, "downtime_ms", final.Downtime,
			"total_ms", final.TotalTime)
		return final.status(), nil
	}
	if st.Running {
		m.ensureRunning(context.WithoutCancel(ctx))
	}
	if err != nil {
		return final.status(), err
	}
	desc := final.ErrorDesc
	if herr := sw.failed(); herr != nil {
		desc = "before the switchover: " + herr.Error()
	}
	if desc == "" {
		desc = "no reason given"
	}
	return final.status(), m.errf(fmt.Errorf("migration %s: %s", final.Status, desc), "migrate to %s", target)
}

// ensureRunning restarts a guest that a failed or cancelled migration left stopped. QEMU does so itself when
// the guest was running before; this makes sure, since after a failure the guest must go on here. It never
// touches a guest while a migration is still in flight or after one completed (postmigrate: the guest runs on
// the destination now).
func (m *machine) ensureRunning(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	mi, err := m.queryMigrate(ctx)
	if err != nil || migrationActive(mi.Status) || mi.Status == "completed" {
		return
	}
	st, err := m.status(ctx)
	if err != nil || st.Running || st.Status == "postmigrate" {
		return
	}
	if err := m.qmp.Execute(ctx, "cont", nil, nil); err != nil {
		m.d.log.Error("qemu: guest not resumed after a failed migration", "id", m.spec.ID, "err", err)
		return
	}
	m.d.log.Warn("qemu: resumed the guest after a failed migration", "id", m.spec.ID, "was", st.Status)
}

// followMigration polls query-migrate until the migration ends, reporting progress. If ctx ends first, it
// cancels the migration and waits for QEMU to confirm, so that the caller knows where the guest runs.
func (m *machine) followMigration(ctx context.Context, progress func(hypervisor.MigrationStatus), sw *switchover) (migrationInfo, error) {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		mi, err := m.queryMigrate(context.WithoutCancel(ctx))
		if err != nil {
			return mi, m.errf(err, "migrate: query progress")
		}
		if progress != nil {
			progress(mi.status())
		}
		if !migrationActive(mi.Status) {
			return mi, nil
		}
		if mi.Status == "pre-switchover" {
			go sw.run(ctx)
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			if err := m.qmp.Execute(cctx, "migrate_cancel", nil, nil); err != nil {
				return mi, m.errf(err, "migrate: cancel after %v", ctx.Err())
			}
			for migrationActive(mi.Status) {
				select {
				case <-tick.C:
				case <-cctx.Done():
					return mi, m.errf(cctx.Err(), "migrate: waiting for the cancel to take effect")
				}
				if mi, err = m.queryMigrate(cctx); err != nil {
					return mi, m.errf(err, "migrate: query progress")
				}
			}
			if mi.Status == "completed" {
				return mi, nil // it finished before the cancel landed: the guest runs on the destination
			}
			return mi, m.errf(ctx.Err(), "migrate: %s", mi.Status)
		}
	}
}

// switchover runs MigrateOptions.BeforeSwitchover once QEMU paused in "pre-switchover", then lets QEMU finish
// (migrate-continue) or, if the hook failed, cancels the migration (the guest resumes here).
type switchover struct {
	m    *machine
	hook func(context.Context) error
	once sync.Once
	mu   sync.Mutex
	err  error
}

// watch waits for the MIGRATION event that says QEMU paused before the switchover.
func (sw *switchover) watch(ctx context.Context, sub *qmp.Subscription) {
	for {
		ev, err := sub.Next(ctx)
		if errors.Is(err, qmp.ErrEventsDropped) {
			continue
		}
		if err != nil {
			return
		}
		var data struct{ Status string }
		if json.Unmarshal(ev.Data, &data) == nil && data.Status == "pre-switchover" {
			sw.run(ctx)
			return
		}
	}
}

func (sw *switchover) run(ctx context.Context) {
	if sw == nil || sw.hook == nil {
		return
	}
	sw.once.Do(func() {
		m := sw.m
		start := time.Now()
		err := sw.hook(ctx)
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if err != nil {
			sw.mu.Lock()
			sw.err = err
			sw.mu.Unlock()
			m.d.log.Warn("qemu: cancelling the migration: the switchover hook failed", "id", m.spec.ID, "err", err)
			if cerr := m.qmp.Execute(cctx, "migrate_cancel", nil, nil); cerr != nil {
				m.d.log.Error("qemu: cancel the migration after the switchover hook failed", "id", m.spec.ID, "err", cerr)
			}
			return
		}
		if err := m.qmp.Execute(cctx, "migrate-continue", map[string]any{"state": "pre-switchover"}, nil); err != nil {
			m.d.log.Error("qemu: continue the migration after the switchover hook", "id", m.spec.ID, "err", err)
			return
		}
		m.d.log.Info("qemu: switchover hook done", "id", m.spec.ID, "took", time.Since(start))
	})
}

func (sw *switchover) failed() error {
	sw.mu.Lock()
	defer sw.mu.Unlock()
	return sw.err
}

// CancelMigration cancels the outgoing migration; the guest keeps running here.
func (m *machine) CancelMigration(ctx context.Context) error {
	if err := m.qmp.Execute(ctx, "migrate_cancel", nil, nil); err != nil {
		return m.errf(err, "cancel migration")
	}
	return nil
}

func parseMigrationURI(uri string) (target string, params url.Values, err error) {
	target, frag, _ := strings.Cut(uri, "#")
	hostport, ok := strings.CutPrefix(target, "tcp:")
	if !ok {
		return "", nil, fmt.Errorf("migration URI %q: only tcp: URIs are supported", uri)
	}
	if _, _, err := net.SplitHostPort(hostport); err != nil {
		return "", nil, fmt.Errorf("migration URI %q: %w", uri, err)
	}
	params, err = url.ParseQuery(frag)
	if err != nil {
		return "", nil, fmt.Errorf("migration URI %q: %w", uri, err)
	}
	return target, params, nil
}
