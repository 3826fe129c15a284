package qemu

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestAccelProbe runs the real probe in a fresh state directory and checks that its result is consistent,
// remembered on disk for the same kernel and QEMU, and ignored for another.
func TestAccelProbe(t *testing.T) {
	needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	state := t.TempDir()
	log := slog.New(slog.NewTextHandler(testLogWriter{t}, nil))
	d, err := New(Config{StateDir: state, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	p, err := d.Accel(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("probe: accel=%s cpu=%s tcg=%s kvm=%s: %s", p.Accel, p.CPU, p.TCG, p.KVM, p.Reason)
	switch {
	case p.Cached || p.Reason == "" || p.TCG <= 0 || p.CPU == "" || p.Key == "":
		t.Fatalf("probe result %+v", p)
	case p.Accel == "kvm" && (p.KVM <= 0 || p.KVM > d.slowLimit(p.TCG)):
		t.Fatalf("KVM chosen though it took %s against TCG's %s", p.KVM, p.TCG)
	case p.Accel == "tcg" && p.KVM != 0:
		t.Fatalf("TCG chosen though KVM finished in %s", p.KVM)
	case p.Accel != "kvm" && p.Accel != "tcg":
		t.Fatalf("accel %q", p.Accel)
	}
	if again, _ := d.Accel(ctx); again != p {
		t.Fatalf("second call on the same driver: %+v", again)
	}

	// A new driver (computed restarted) reads the saved result.
	d2, _ := New(Config{StateDir: state, Logger: log})
	p2, err := d2.Accel(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !p2.Cached || p2.Accel != p.Accel || p2.CPU != p.CPU || p2.Reason != p.Reason || p2.Key != p.Key {
		t.Fatalf("saved result %+v, probed %+v", p2, p)
	}

	// A result saved for another kernel or QEMU is not trusted.
	b, _ := json.Marshal(AccelProbe{Accel: "kvm", CPU: "host", Reason: "elsewhere", Key: "probe=2 kernel=other"})
	if err := os.WriteFile(filepath.Join(state, "accel.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	d3, _ := New(Config{StateDir: state, Logger: log})
	p3, err := d3.Accel(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if p3.Cached || p3.Key != p.Key || p3.Accel != p.Accel {
		t.Fatalf("stale saved result used: %+v", p3)
	}

	// A configured accelerator skips the probe; an unknown one is refused.
	d4, _ := New(Config{StateDir: t.TempDir(), Accel: "tcg", Logger: log})
	if p4, err := d4.Accel(ctx); err != nil || p4.Accel != "tcg" || p4.CPU != "max" || p4.Reason != "configured" {
		t.Fatalf("configured tcg: %+v, %v", p4, err)
	}
	d5, _ := New(Config{StateDir: t.TempDir(), Accel: "xen", Logger: log})
	if _, err := d5.Accel(ctx); err == nil {
		t.Fatal("unknown accelerator accepted")
	}
}
