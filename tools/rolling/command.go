package rolling

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// Runner runs the update command for host h, writing its output to out. It must stop the command and return
// once ctx ends. A nil error means the update succeeded.
type Runner func(ctx context.Context, h Host, command string, out io.Writer) error

// StopGrace is how long Exec waits after SIGTERM (and after the shell exits while something it started
// still holds its output) before it kills the command's processes.
const StopGrace = 10 * time.Second

// Exec is the default Runner: `/bin/sh -c command` on this machine, with BASALT_HOST (the node ID) and
// BASALT_HOSTNAME (the machine's name the computed publishes) added to this process's environment, stdin
// empty, and every line of its stdout and stderr written to out with a "[node] " prefix. The command runs
// in its own process group so that a terminal's Ctrl-C reaches the caller only; when ctx ends the whole
// group gets SIGTERM, then SIGKILL after StopGrace.
func Exec(ctx context.Context, h Host, command string, out io.Writer) error {
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", command)
	cmd.Env = append(os.Environ(), "BASALT_HOST="+h.Node, "BASALT_HOSTNAME="+h.Hostname)
	pw := newPrefixWriter(out, "["+h.Node+"] ")
	cmd.Stdout, cmd.Stderr = pw, pw
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = StopGrace
	err := cmd.Run()
	pw.Flush()
	if cmd.Process != nil && ctx.Err() != nil {
		// Whatever of the group outlived its SIGTERM and the grace period.
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	var exit *exec.ExitError
	switch {
	case err == nil:
		return nil
	case errors.Is(err, exec.ErrWaitDelay) && ctx.Err() == nil:
		// The shell exited 0 but left a process holding its output (a daemon started in the background, say):
		// the command is done, only its output is no longer read.
		fmt.Fprintf(pw, "(the command exited but left a process holding its output; no longer reading it)\n")
		pw.Flush()
		return nil
	case ctx.Err() != nil:
		return fmt.Errorf("command stopped (%v)", context.Cause(ctx))
	case errors.As(err, &exit):
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return fmt.Errorf("command killed by signal %s", ws.Signal())
		}
		return fmt.Errorf("command exited with status %d", exit.ExitCode())
	}
	return fmt.Errorf("run the command: %w", err)
}

// prefixWriter writes whole lines to w, each with prefix. Safe for concurrent use (a command's stdout and
// stderr write to one).
type prefixWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
	buf    []byte
}

// maxLine bounds what a prefixWriter holds while waiting for a newline; a longer line is written in parts.
const maxLine = 64 << 10

func newPrefixWriter(w io.Writer, prefix string) *prefixWriter {
	return &prefixWriter{w: w, prefix: prefix}
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.buf = append(p.buf, b...)
	for {
		i := bytes.IndexByte(p.buf, '\n')
		if i < 0 {
			if len(p.buf) < maxLine {
				return len(b), nil
			}
			i = maxLine - 1
		}
		if err := p.line(p.buf[:i+1]); err != nil {
			return len(b), err
		}
		p.buf = p.buf[i+1:]
	}
}

// Flush writes a last line that has no newline.
func (p *prefixWriter) Flush() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.buf) > 0 {
		p.line(p.buf)
		p.buf = nil
	}
}

func (p *prefixWriter) line(l []byte) error {
	out := make([]byte, 0, len(p.prefix)+len(l)+1)
	out = append(append(out, p.prefix...), l...)
	if out[len(out)-1] != '\n' {
		out = append(out, '\n')
	}
	_, err := p.w.Write(out)
	return err
}
