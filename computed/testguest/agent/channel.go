package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/basalt-hv/basalt/computed/testguest/record"
)

// hung is set by the host's "hang" command: the counter and the heartbeat stop until the next boot.
var hung atomic.Bool

// agentChannel finds the agent port (record.AgentPort), then writes a heartbeat every second and obeys the
// commands the host sends. A guest started without the channel has no such port: then it does nothing.
func agentChannel(con *console, boot uint64) {
	path, err := findAgentPort(30 * time.Second)
	if err != nil {
		con.printf("agent channel=none")
		return
	}
	// Non-blocking: while computed does not hold the host end, a write fails at once (EAGAIN) and that beat is
	// dropped, instead of a stale backlog arriving when computed connects.
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		con.printf("error agent channel %s: %v", path, err)
		return
	}
	con.printf("agent channel=%s", path)
	go commands(con, fd)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	// The first beat goes out at once: the host counts the boot against the heartbeat timeout.
	for seq := uint64(1); ; seq++ {
		if hung.Load() {
			return
		}
		line := record.BeatLine(seq, boot)
		if _, err := unix.Write(fd, []byte(line)); err != nil && !errors.Is(err, unix.EAGAIN) {
			con.printf("error agent beat seq=%d: %v", seq, err)
		}
		<-tick.C
	}
}

// commands reads command lines from the host. Poll reports POLLHUP while the host end is closed, and read
// then returns 0, so the loop sleeps instead of spinning until computed connects.
func commands(con *console, fd int) {
	buf := make([]byte, 4096)
	var partial []byte
	for {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, 1000); err != nil && !errors.Is(err, unix.EINTR) {
			con.printf("error agent channel poll: %v", err)
			return
		}
		if fds[0].Revents&unix.POLLIN == 0 {
			if fds[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0 {
				time.Sleep(250 * time.Millisecond)
			}
			continue
		}
		n, err := unix.Read(fd, buf)
		if err != nil && !errors.Is(err, unix.EAGAIN) {
			con.printf("error agent channel read: %v", err)
			return
		}
		if n <= 0 {
			time.Sleep(250 * time.Millisecond)
			continue
		}
		partial = append(partial, buf[:n]...)
		for {
			i := bytes.IndexByte(partial, '\n')
			if i < 0 {
				break
			}
			cmd := strings.TrimSpace(string(partial[:i]))
			partial = partial[i+1:]
			switch cmd {
			case record.CmdHang:
				hung.Store(true)
				con.printf("hang")
			case "":
			default:
				con.printf("error agent command %q: unknown", cmd)
			}
		}
	}
}

// findAgentPort waits for the virtio-serial port named record.AgentPort (the driver adds its ports shortly
// after it loads) and returns its device node. The initramfs has no udev: devtmpfs normally has the node, and
// if not it is made from the dev numbers in sysfs.
func findAgentPort(wait time.Duration) (string, error) {
	deadline := time.Now().Add(wait)
	for {
		names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, n := range names {
			b, err := os.ReadFile(n)
			if err != nil || strings.TrimSpace(string(b)) != record.AgentPort {
				continue
			}
			dir := filepath.Dir(n)
			return deviceNode(filepath.Base(dir), filepath.Join(dir, "dev"))
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no virtio-serial port named %s", record.AgentPort)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// deviceNode returns /dev/<name>, creating it from the "major:minor" in devFile if it is missing.
func deviceNode(name, devFile string) (string, error) {
	path := "/dev/" + name
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	b, err := os.ReadFile(devFile)
	if err != nil {
		return "", fmt.Errorf("device numbers of %s: %w", name, err)
	}
	maj, min, ok := strings.Cut(strings.TrimSpace(string(b)), ":")
	ma, err1 := strconv.ParseUint(maj, 10, 32)
	mi, err2 := strconv.ParseUint(min, 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return "", fmt.Errorf("device numbers of %s: %q", name, b)
	}
	if err := unix.Mknod(path, unix.S_IFCHR|0o600, int(unix.Mkdev(uint32(ma), uint32(mi)))); err != nil && !errors.Is(err, unix.EEXIST) {
		return "", fmt.Errorf("create %s: %w", path, err)
	}
	return path, nil
}
