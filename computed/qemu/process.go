package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

// process is a handle on a QEMU process through a pidfd, so that it works the same for a child of this
// computed and for one an earlier computed started (whose parent is now init): a pidfd can be waited on by
// anyone and signalled without the risk of hitting a recycled pid.
type process struct {
	pid    int
	pidfd  *os.File
	exited chan struct{} // closed when the process has exited
	closed chan struct{} // closed when the handle is closed
}

// openProcess opens a handle on pid; a pid that does not exist is hypervisor.ErrNotFound.
func openProcess(pid int) (*process, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, fmt.Errorf("process %d is gone: %w", pid, hypervisor.ErrNotFound)
		}
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	// A non-blocking pidfd joins the runtime's poller: readable means exited, and Close wakes the watcher.
	p := &process{pid: pid, pidfd: os.NewFile(uintptr(fd), "pidfd:"+strconv.Itoa(pid)),
		exited: make(chan struct{}), closed: make(chan struct{})}
	go p.watch()
	return p, nil
}

func (p *process) watch() {
	rc, err := p.pidfd.SyscallConn()
	if err != nil {
		return
	}
	err = rc.Read(func(fd uintptr) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, _ := unix.Poll(fds, 0)
		return n > 0
	})
	if err == nil {
		close(p.exited)
	}
}

// alive reports whether the process has not exited yet.
func (p *process) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// signal sends sig; a process that already exited is not an error.
func (p *process) signal(sig syscall.Signal) error {
	rc, err := p.pidfd.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.PidfdSendSignal(int(fd), sig, nil, 0) }); err != nil {
		return err
	}
	if errors.Is(serr, unix.ESRCH) {
		return nil
	}
	return serr
}

// wait returns when the process has exited.
func (p *process) wait(ctx context.Context) error {
	select {
	case <-p.exited:
		return nil
	case <-p.closed:
		return errors.New("machine handle closed")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// close releases the handle without touching the process.
func (p *process) close() {
	select {
	case <-p.closed:
		return
	default:
	}
	close(p.closed)
	p.pidfd.Close()
}

// readPidFile reads the pid QEMU wrote with -pidfile.
func readPidFile(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("pid file %s holds %q", path, b)
	}
	return pid, nil
}

// cpuTicks reads the process's user and system CPU time from /proc/<pid>/stat, in clock ticks.
func cpuTicks(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces: fields count from its closing one.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat: %q", pid, s)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat: %q", pid, s)
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64)
	stime, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("unexpected /proc/%d/stat: %q", pid, s)
	}
	return utime + stime, nil
}

// userHZ is the unit of /proc/<pid>/stat's times. It is fixed at 100 on Linux for every architecture we run
// on (the kernel converts its internal HZ to USER_HZ for userspace), and reading sysconf would need cgo.
const userHZ = 100
