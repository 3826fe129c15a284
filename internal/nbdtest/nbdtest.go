// Package nbdtest is test support for packages whose tests need an NBD server that is not blockd: it serves a
// fresh raw image with qemu-nbd (Debian qemu-utils) on a Unix socket, as blockd serves a volume, and makes
// temporary directories short enough for Unix socket paths. It is imported only by _test files. It depends on
// the standard library and runs qemu-img and qemu-nbd.
package nbdtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// ShortDir makes a temporary directory with a short path, removed at the end of the test: Unix socket paths
// are limited to 107 bytes, and t.TempDir's paths grow with test names.
func ShortDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Serve creates a raw image of size bytes in dir and serves it with qemu-nbd as export on dir/nbd.sock until
// the test ends, accepting several connections at once (a migration's two ends, hot-plug). It returns the
// socket and the image's path.
func Serve(t testing.TB, dir, export string, size int64) (sock, img string) {
	t.Helper()
	img = filepath.Join(dir, "disk.img")
	if out, err := exec.Command("qemu-img", "create", "-f", "raw", img, fmt.Sprint(size)).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v: %s", err, out)
	}
	sock = filepath.Join(dir, "nbd.sock")
	cmd := exec.Command("qemu-nbd", "--persistent", "--shared=16", "--socket="+sock, "--format=raw", "--export-name="+export, img)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			return sock, img
		}
		select {
		case <-exited:
			t.Fatalf("qemu-nbd exited: %s", stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("qemu-nbd did not create its socket")
		}
	}
}
