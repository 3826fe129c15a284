package cloudhv

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Names inside a machine's RunDir.
const (
	apiSocketName     = "api.sock"
	consoleSocketName = "console.sock"
	pidFileName       = "cloud-hypervisor.pid"
	logFileName       = "cloud-hypervisor.log"
	disksDirName      = "disks"
)

// process is a running cloud-hypervisor, either started by this computed (a child) or found again after a
// restart (not a child: reaped by init, watched through a pidfd).
type process struct {
	pid int
	// done is closed when the process has exited; exitErr is set before.
	done    chan struct{}
	exitErr error
	// signal sends a signal without racing against pid reuse.
	signal func(syscall.Signal) error
	// release stops watching a found process (a no-op for a child, which must be reaped).
	release func()
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// launch starts binary with args in its own session, so that signals for computed's process group (a
// terminal's ^C, a restart) do not reach it, with output appended to logPath.
func launch(binary string, args []string, logPath string) (*process, error) {
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", logPath, err)
	}
	defer logFile.Close()
	// Not exec.CommandContext: the process must outlive the context of the call that started it.
	cmd := exec.Command(binary, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", binary, err)
	}
	p := &process{
		pid:     cmd.Process.Pid,
		done:    make(chan struct{}),
		signal:  func(sig syscall.Signal) error { return cmd.Process.Signal(sig) },
		release: func() {},
	}
	go func() {
		p.exitErr = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// attach watches an existing process that is not our child. It fails with os.ErrProcessDone if the process is
// gone.
func attach(pid int) (*process, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil, os.ErrProcessDone
	}
	if err != nil {
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	p := &process{pid: pid, done: make(chan struct{})}
	stop := make(chan struct{})
	released := make(chan struct{})
	// fdMu keeps the pidfd from being closed (and its number reused, possibly by another pidfd) while a
	// signal is being sent through it.
	var fdMu sync.Mutex
	fdClosed := false
	p.signal = func(sig syscall.Signal) error {
		fdMu.Lock()
		defer fdMu.Unlock()
		if p.exited() {
			return os.ErrProcessDone
		}
		if fdClosed {
			return errors.New("process handle released")
		}
		return unix.PidfdSendSignal(pidfd, sig, nil, 0)
	}
	p.release = func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-released
	}
	go func() {
		defer close(released)
		defer func() {
			fdMu.Lock()
			unix.Close(pidfd)
			fdClosed = true
			fdMu.Unlock()
		}()
		// A pidfd becomes readable when the process exits. Poll with a timeout so that release is noticed.
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, 200)
			if err != nil && !errors.Is(err, unix.EINTR) {
				p.exitErr = fmt.Errorf("polling pidfd of %d: %w", pid, err)
				close(p.done)
				return
			}
			if n > 0 {
				p.exitErr = fmt.Errorf("process %d exited (not our child: no exit status)", pid)
				close(p.done)
				return
			}
			select {
			case <-stop:
				return
			default:
			}
		}
	}()
	return p, nil
}

// isCloudHypervisor reports whether pid's command line has "--api-socket apiSocket", so that a recycled pid
// is not mistaken for the machine.
func isCloudHypervisor(pid int, apiSocket string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	for i, a := range args {
		if a == "--api-socket" && i+1 < len(args) && (args[i+1] == apiSocket || args[i+1] == "path="+apiSocket) {
			return true
		}
		if a == "--api-socket="+apiSocket {
			return true
		}
	}
	return false
}

// writePIDFile writes pid atomically, so that Find never reads a half-written file.
func writePIDFile(path string, pid int) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.Itoa(pid)+"\n"), 0o640); err != nil {
		return fmt.Errorf("writing pid file: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing pid file: %w", err)
	}
	return nil
}

func readPIDFile(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("pid file %s holds %q", path, bytes.TrimSpace(b))
	}
	return pid, nil
}

// logTail returns the end of a file, for error messages about a process that died.
func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return strings.TrimSpace(string(b))
}

// socketInodes returns the inodes of the sockets pid has open.
func socketInodes(pid int) (map[uint64]bool, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	inodes := make(map[uint64]bool)
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		if s, ok := strings.CutPrefix(target, "socket:["); ok {
			if ino, err := strconv.ParseUint(strings.TrimSuffix(s, "]"), 10, 64); err == nil {
				inodes[ino] = true
			}
		}
	}
	return inodes, nil
}

// listening reports whether pid has a listening socket for url, a migration URL "tcp:<host>:<port>" or
// "unix:<path>". Connecting to find out is not an option: Cloud Hypervisor accepts exactly one connection and
// takes it for the migration.
func listening(pid int, url string) (bool, error) {
	inodes, err := socketInodes(pid)
	if err != nil {
		return false, err
	}
	if path, ok := strings.CutPrefix(url, "unix:"); ok {
		return unixListening(pid, path, inodes)
	}
	addr, ok := strings.CutPrefix(url, "tcp:")
	if !ok {
		return false, fmt.Errorf("migration URL %q is neither tcp: nor unix:", url)
	}
	i := strings.LastIndex(addr, ":")
	if i < 0 {
		return false, fmt.Errorf("migration URL %q has no port", url)
	}
	port, err := strconv.ParseUint(addr[i+1:], 10, 16)
	if err != nil {
		return false, fmt.Errorf("migration URL %q: bad port: %w", url, err)
	}
	for _, table := range []string{"tcp", "tcp6"} {
		ok, err := tcpListening(fmt.Sprintf("/proc/%d/net/%s", pid, table), uint16(port), inodes)
		if err != nil || ok {
			return ok, err
		}
	}
	return false, nil
}

// tcpListening scans a /proc/net/tcp table for a socket in LISTEN state (0A) on port owned by one of inodes.
func tcpListening(table string, port uint16, inodes map[uint64]bool) (bool, error) {
	f, err := os.Open(table)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil // no IPv6
	}
	if err != nil {
		return false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || fields[3] != "0A" {
			continue
		}
		_, portHex, ok := strings.Cut(fields[1], ":")
		if !ok {
			continue
		}
		p, err := strconv.ParseUint(portHex, 16, 16)
		if err != nil || uint16(p) != port {
			continue
		}
		if ino, err := strconv.ParseUint(fields[9], 10, 64); err == nil && inodes[ino] {
			return true, nil
		}
	}
	return false, sc.Err()
}

// unixListening scans /proc/<pid>/net/unix for a listening socket (flag __SO_ACCEPTCON, 0x10000) bound to path
// and owned by one of inodes.
func unixListening(pid int, path string, inodes map[uint64]bool) (bool, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/net/unix", pid))
	if err != nil {
		return false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header: Num RefCount Protocol Flags Type St Inode Path
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 8 || fields[7] != path {
			continue
		}
		flags, err := strconv.ParseUint(fields[3], 16, 32)
		if err != nil || flags&0x10000 == 0 {
			continue
		}
		if ino, err := strconv.ParseUint(fields[6], 10, 64); err == nil && inodes[ino] {
			return true, nil
		}
	}
	return false, sc.Err()
}

// cpuTime is the user+system CPU time of pid and all its threads (vCPUs included), from /proc/<pid>/stat.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is parenthesised and may contain spaces; fields after it are plain.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	fields := strings.Fields(string(b[i+1:]))
	// After the name: state is field 3, so utime (14) and stime (15) are at indices 11 and 12.
	if len(fields) < 13 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	utime, err1 := strconv.ParseUint(fields[11], 10, 64)
	stime, err2 := strconv.ParseUint(fields[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("parsing /proc/%d/stat: %w", pid, err)
	}
	// /proc reports clock ticks of USER_HZ, which the kernel ABI fixes at 100 on every architecture Linux
	// runs KVM on.
	const userHZ = 100
	return time.Duration(utime+stime) * time.Second / userHZ, nil
}

// waitFor polls cond every interval until it returns true or an error, or ctx ends.
func waitFor(ctx context.Context, interval time.Duration, cond func() (bool, error)) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}
