package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// AccelProbe is the outcome of the accelerator probe.
type AccelProbe struct {
	// Accel is "kvm" or "tcg".
	Accel string
	// Reason says why, in words for the log and for operators.
	Reason string
	// CPU is the CPU model to run guests with under Accel.
	CPU string
	// TCG and KVM are how long the probe guest's work took under each (0: not run or did not finish).
	TCG, KVM time.Duration
	// Key identifies what the result holds for: kernel release, QEMU binary and version, CPU models.
	Key string
	At  time.Time
	// Cached is true when the result came from the state directory rather than a run.
	Cached bool
}

// probeVersion changes whenever the probe guest or the decision rule changes, to invalidate saved results.
const probeVersion = 2

// Accel returns the accelerator this driver runs guests with, probing on first use: whether KVM can actually
// boot a guest here, and faster than TCG would. /dev/kvm existing is not enough: under nested virtualization
// without working second-level paging (our machines), KVM runs real-mode firmware but takes minutes to get a
// Linux kernel through its decompressor. The result is kept per driver in memory and in the state directory
// keyed by kernel release and QEMU version, so a host pays for the probe once.
func (d *Driver) Accel(ctx context.Context) (AccelProbe, error) {
	d.accelMu.Lock()
	defer d.accelMu.Unlock()
	if d.accel != nil {
		return *d.accel, nil
	}
	p, err := d.probeAccel(ctx)
	if err != nil {
		return AccelProbe{}, err
	}
	d.log.Info("qemu accelerator", "accel", p.Accel, "cpu", p.CPU, "reason", p.Reason, "cached", p.Cached,
		"tcg", p.TCG.Round(time.Millisecond), "kvm", p.KVM.Round(time.Millisecond))
	d.accel = &p
	return p, nil
}

func (d *Driver) probeAccel(ctx context.Context) (AccelProbe, error) {
	switch d.cfg.Accel {
	case "kvm", "tcg":
		cpu := d.cfg.CPU
		if cpu == "" && d.cfg.Accel == "kvm" {
			cpu = "host"
		} else if cpu == "" {
			cpu = d.tcgCPU()
		}
		return AccelProbe{Accel: d.cfg.Accel, CPU: cpu, Reason: "configured", At: time.Now()}, nil
	case "":
	default:
		return AccelProbe{}, fmt.Errorf("qemu: unknown accelerator %q (kvm, tcg or empty to probe)", d.cfg.Accel)
	}
	key, err := d.probeKey(ctx)
	if err != nil {
		return AccelProbe{}, err
	}
	cache := filepath.Join(d.cfg.StateDir, "accel.json")
	if b, err := os.ReadFile(cache); err == nil {
		var p AccelProbe
		if json.Unmarshal(b, &p) == nil && p.Key == key && (p.Accel == "kvm" || p.Accel == "tcg") {
			p.Cached = true
			return p, nil
		}
	}

	p := AccelProbe{Key: key, At: time.Now()}
	tcg, err := d.runProbe(ctx, "tcg", d.tcgCPU(), d.cfg.ProbeTimeout, 0)
	if err != nil {
		// QEMU cannot even emulate: nothing will boot; say so now rather than at every Start.
		return AccelProbe{}, fmt.Errorf("qemu: accelerator probe under TCG: %w", err)
	}
	p.Accel, p.CPU, p.TCG = "tcg", d.tcgCPU(), tcg
	// "host" is the CPU model to want under KVM; when QEMU cannot even start a vCPU with it (a nested host
	// that hides or rejects some MSR, say), a plain model still shows whether KVM itself is usable.
	models := []string{"host", "qemu64"}
	if d.cfg.CPU != "" {
		models = []string{d.cfg.CPU}
	}
	var why []string
	for _, cpu := range models {
		kvm, err := d.runProbe(ctx, "kvm", cpu, d.cfg.ProbeTimeout, tcg)
		if err == nil {
			p.Accel, p.CPU, p.KVM = "kvm", cpu, kvm
			why = append(why, fmt.Sprintf("KVM with -cpu %s ran the probe guest in %s, TCG in %s", cpu,
				kvm.Round(time.Millisecond), tcg.Round(time.Millisecond)))
			break
		}
		if errors.Is(err, errKVMUnavailable) {
			why = append(why, err.Error())
			break
		}
		if errors.Is(err, errSlower) {
			why = append(why, fmt.Sprintf("KVM with -cpu %s did not finish the probe guest's work within %s, while TCG took %s (nested virtualization without usable second-level paging?)",
				cpu, d.slowLimit(tcg).Round(time.Millisecond), tcg.Round(time.Millisecond)))
			break // slowness is KVM's, not the CPU model's
		}
		why = append(why, fmt.Sprintf("KVM with -cpu %s: %v", cpu, err))
	}
	p.Reason = strings.Join(why, "; ")
	if ctx.Err() != nil {
		// An interrupted probe proves nothing: do not remember it.
		return AccelProbe{}, fmt.Errorf("qemu: accelerator probe: %w", ctx.Err())
	}
	if err := writeJSONFile(cache, p); err != nil {
		d.log.Warn("qemu: cannot save the accelerator probe result; it will run again", "path", cache, "err", err)
	}
	return p, nil
}

// probeKey names what a probe result depends on: the host kernel (KVM lives there), the QEMU binary and its
// version, the CPU models, and the probe itself.
func (d *Driver) probeKey(ctx context.Context) (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", fmt.Errorf("qemu: uname: %w", err)
	}
	out, err := exec.CommandContext(ctx, d.cfg.Binary, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("qemu: %s --version: %w", d.cfg.Binary, err)
	}
	version, _, _ := strings.Cut(string(out), "\n")
	return fmt.Sprintf("probe=%d kernel=%s qemu=%s (%s) cpu=%q/%s", probeVersion, unix.ByteSliceToString(u.Release[:]),
		strings.TrimSpace(version), d.cfg.Binary, d.cfg.CPU, d.tcgCPU()), nil
}

var (
	errKVMUnavailable = errors.New("kvm unavailable")
	errSlower         = errors.New("slower than TCG")
)

// slowLimit is how long KVM may take over the probe's work before it counts as slower than TCG: twice TCG's
// time and half a second, so that scheduling noise on a busy host cannot flip a healthy KVM to TCG.
func (d *Driver) slowLimit(tcg time.Duration) time.Duration { return 2*tcg + 500*time.Millisecond }

// runProbe boots the probe guest under accel and returns how long its work took, from the 'S' to the 'E' it
// prints. With tcg > 0 (the KVM run) it gives up as soon as the work has taken longer than slowLimit(tcg).
func (d *Driver) runProbe(ctx context.Context, accel, cpu string, timeout, tcg time.Duration) (time.Duration, error) {
	if accel == "kvm" {
		f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
		if err != nil {
			return 0, fmt.Errorf("%w: %v", errKVMUnavailable, err)
		}
		f.Close()
	}
	if err := os.MkdirAll(d.cfg.StateDir, 0o755); err != nil {
		return 0, err
	}
	bin, err := os.CreateTemp(d.cfg.StateDir, "probe-*.bin")
	if err != nil {
		return 0, err
	}
	defer os.Remove(bin.Name())
	if _, err := bin.Write(probeGuest); err != nil {
		bin.Close()
		return 0, err
	}
	bin.Close()

	cmd := exec.Command(d.cfg.Binary, "-accel", accel, "-machine", "q35", "-cpu", cpu, "-m", "128",
		"-nodefaults", "-no-user-config", "-display", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
		"-kernel", bin.Name(), "-serial", "stdio")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return 0, err
	}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start %s: %w", d.cfg.Binary, err)
	}
	// Kill the whole process group whatever happens; Wait reaps it.
	defer func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
	}()

	marks := make(chan time.Time, 2)
	go func() {
		r := bufio.NewReader(stdout)
		for {
			c, err := r.ReadByte()
			if err != nil {
				close(marks)
				return
			}
			if c == 'S' || c == 'E' {
				marks <- time.Now()
			}
		}
	}()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	var started time.Time
	var slow <-chan time.Time
	for {
		select {
		case at, ok := <-marks:
			if !ok {
				how := "exited"
				if err := cmd.Wait(); err != nil {
					how = err.Error() // "exit status 1", "signal: aborted (core dumped)", ...
				}
				return 0, fmt.Errorf("probe guest ended (%s) before finishing: %s", how, oneLine(stderr.String()))
			}
			if started.IsZero() {
				started = at
				if tcg > 0 {
					t := time.NewTimer(d.slowLimit(tcg))
					defer t.Stop()
					slow = t.C
				}
				continue
			}
			return at.Sub(started), nil
		case <-slow:
			return 0, errSlower
		case <-deadline.C:
			if started.IsZero() {
				return 0, fmt.Errorf("probe guest did not reach long mode within %s", timeout)
			}
			return 0, errSlower
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// oneLine folds QEMU's stderr into one line for an error message, keeping its end (where the cause is).
func oneLine(s string) string {
	s = strings.Join(strings.Fields(strings.ReplaceAll(strings.TrimSpace(s), "\n", " | ")), " ")
	if s == "" {
		return "no message"
	}
	if len(s) > 400 {
		s = "..." + s[len(s)-400:]
	}
	return s
}

// writeJSONFile replaces path atomically, so a crash never leaves half a file for the next reader.
func writeJSONFile(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	if _, err := io.Copy(tmp, bytes.NewReader(append(b, '\n'))); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), path)
}
