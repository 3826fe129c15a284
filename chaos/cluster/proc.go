package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Proc is a process seen in /proc.
type Proc struct {
	PID int
	// State is the state letter of /proc/<pid>/stat: R, S, D, T (stopped), Z (zombie), ...
	State byte
	Args  []string
}

// Stopped reports whether the process is stopped by a signal (frozen).
func (p Proc) Stopped() bool { return p.State == 'T' || p.State == 't' }

// Exe is the base name of the process's program.
func (p Proc) Exe() string {
	if len(p.Args) == 0 {
		return ""
	}
	return filepath.Base(p.Args[0])
}

// QEMUGuest returns the VM name a QEMU process runs ("-name guest=NAME,..."), or false for any other process.
func (p Proc) QEMUGuest() (string, bool) {
	if !strings.HasPrefix(p.Exe(), "qemu-system") {
		return "", false
	}
	for i := 0; i+1 < len(p.Args); i++ {
		if p.Args[i] != "-name" {
			continue
		}
		for _, opt := range strings.Split(p.Args[i+1], ",") {
			if name, ok := strings.CutPrefix(opt, "guest="); ok {
				return name, true
			}
		}
	}
	return "", false
}

// nsInode identifies a network namespace by the inode of its file.
func nsInode(path string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// procsIn lists the live (non-zombie) processes whose network namespace is ns, as `ip netns pids` does.
func procsIn(ns string) ([]Proc, error) {
	want, err := nsInode(nsPath(ns))
	if err != nil {
		return nil, fmt.Errorf("network namespace %s: %w", ns, err)
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list processes: %w", err)
	}
	var out []Proc
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		ino, err := nsInode(filepath.Join("/proc", e.Name(), "ns", "net"))
		if err != nil || ino != want {
			continue // gone meanwhile, or a kernel thread
		}
		p, err := readProc(pid)
		if err != nil || p.State == 'Z' || p.State == 'X' {
			continue
		}
		out = append(out, p)
	}
	return out, nil
}

// readProc reads a process's state and command line.
func readProc(pid int) (Proc, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return Proc{}, err
	}
	// The command name is in parentheses and may itself contain spaces or parentheses: the state follows the
	// last ')'.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 || i+2 >= len(stat) {
		return Proc{}, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	p := Proc{PID: pid, State: stat[i+2]}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return Proc{}, err
	}
	for _, a := range bytes.Split(bytes.TrimRight(cmdline, "\x00"), []byte{0}) {
		p.Args = append(p.Args, string(a))
	}
	return p, nil
}

// signalAll sends sig to every process in namespace ns until done reports every one of them in the wanted
// state, or the deadline passes. Sending again covers processes that were being forked while the previous
// pass listed them (a computed starting a QEMU at that instant).
func signalAll(ctx context.Context, ns string, sig syscall.Signal, done func([]Proc) bool, within time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	for {
		ps, err := procsIn(ns)
		if err != nil {
			return err
		}
		if done(ps) {
			return nil
		}
		for _, p := range ps {
			if err := syscall.Kill(p.PID, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
				return fmt.Errorf("send %v to pid %d in %s: %w", sig, p.PID, ns, err)
			}
		}
		select {
		case <-ctx.Done():
			ps, _ := procsIn(ns)
			return fmt.Errorf("processes of %s after %v for %s: %s", ns, sig, within, describe(ps))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func describe(ps []Proc) string {
	var parts []string
	for _, p := range ps {
		parts = append(parts, fmt.Sprintf("%d %s (%c)", p.PID, p.Exe(), p.State))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// killNS SIGKILLs every process in namespace ns and waits until none is left.
func killNS(ctx context.Context, ns string) error {
	return signalAll(ctx, ns, syscall.SIGKILL, func(ps []Proc) bool { return len(ps) == 0 }, 15*time.Second)
}

// killStrays SIGKILLs processes in the root namespace that an earlier, crashed run left behind: programs from
// binDirs (or any metad/basalt-chaos-etcd) whose command line names the chaos subnet. Nothing else uses that
// subnet, so nothing else matches.
func killStrays() error {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return fmt.Errorf("list processes: %w", err)
	}
	marker := Subnet.Addr().String()
	marker = marker[:strings.LastIndexByte(marker, '.')+1] // "10.213.0."
	var errs []error
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		p, err := readProc(pid)
		if err != nil || p.State == 'Z' {
			continue
		}
		switch p.Exe() {
		case "metad", "blockd", "computed", etcdMemberBinary:
		default:
			continue
		}
		if !strings.Contains(strings.Join(p.Args, " "), marker) {
			continue
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("kill stray %s (pid %d): %w", p.Exe(), pid, err))
		}
	}
	return errors.Join(errs...)
}
