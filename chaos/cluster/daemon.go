package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Daemon is one process of the cluster, restartable.
type Daemon struct {
	// ID is the node ID (metad-1, blockd-2, computed-3) or the etcd member name (etcd-1).
	ID   string
	Kind string
	// NS is the network namespace it runs in; empty for the root namespace.
	NS   string
	Bin  string
	Args []string
	Log  string

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	err    error
}

// start starts a new incarnation; the daemon must not be running.
func (d *Daemon) start() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd != nil {
		select {
		case <-d.exited:
		default:
			return fmt.Errorf("%s is already running (pid %d)", d.ID, d.cmd.Process.Pid)
		}
	}
	logf, err := os.OpenFile(d.Log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("open the log of %s: %w", d.ID, err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "---- chaos: starting %s at %s\n", d.ID, time.Now().Format("15:04:05.000"))
	cmd := exec.Command(d.Bin, d.Args...)
	if d.NS != "" {
		// `ip netns exec` enters the namespace and execs the daemon: the pid is the daemon's.
		cmd = exec.Command("ip", append([]string{"netns", "exec", d.NS, d.Bin}, d.Args...)...)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own process group (a ^C reaches only the harness), and killed with the harness if it dies: the next run
	// cleans up what is left (QEMU, which computed starts in its own session).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", d.ID, err)
	}
	exited := make(chan struct{})
	d.cmd, d.exited, d.err = cmd, exited, nil
	go func() {
		err := cmd.Wait()
		d.mu.Lock()
		d.err = err
		d.mu.Unlock()
		close(exited)
	}()
	return nil
}

// PID is the current incarnation's process ID (0 if never started).
func (d *Daemon) PID() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

// Running reports whether the current incarnation has not exited.
func (d *Daemon) Running() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return false
	}
	select {
	case <-d.exited:
		return false
	default:
		return true
	}
}

// exitErr returns why the current incarnation exited, or nil while it runs.
func (d *Daemon) exitErr() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return errors.New("never started")
	}
	select {
	case <-d.exited:
		if d.err == nil {
			return errors.New("exited with status 0")
		}
		return d.err
	default:
		return nil
	}
}

// waitExit waits until the current incarnation has exited and been reaped (after a kill of its namespace:
// the process is gone, but Running may not say so yet).
func (d *Daemon) waitExit(ctx context.Context) error {
	d.mu.Lock()
	exited := d.exited
	d.mu.Unlock()
	if exited == nil {
		return nil
	}
	select {
	case <-exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wait for %s to exit: %w", d.ID, ctx.Err())
	}
}

// stop sends SIGTERM, then SIGKILL after grace, and waits for the exit.
func (d *Daemon) stop(grace time.Duration) {
	d.mu.Lock()
	cmd, exited := d.cmd, d.exited
	d.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(grace):
		cmd.Process.Kill()
		<-exited
	}
}

// Tail returns the last n lines of the daemon's log.
func (d *Daemon) Tail(n int) string {
	b, err := os.ReadFile(d.Log)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
