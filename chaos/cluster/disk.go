package cluster

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// mountDisk mounts a tmpfs of size bytes at dir, named source (so that cleanupMounts finds it after a crash):
// a host's disk whose "full" is real, and whose content vanishes with the run.
func mountDisk(source, dir string, size int64) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("create mount point %s: %w", dir, err)
	}
	if err := unix.Mount(source, dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("size=%d,mode=0750", size)); err != nil {
		return fmt.Errorf("mount a %d MiB tmpfs at %s: %w", size>>20, dir, err)
	}
	return nil
}

// unmountDisk detaches the tmpfs at dir. Lazily: a daemon that still has files open (one being killed, or
// the copy of the mount in the private mount namespace `ip netns exec` gives each process) keeps its view
// until it exits.
func unmountDisk(dir string) error {
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", dir, err)
	}
	return nil
}

// cleanupMounts unmounts every tmpfs whose source starts with Prefix (left by a crashed run).
func cleanupMounts() error {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	var dirs []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// mountinfo: ID parent major:minor root mountpoint options [optional...] - fstype source superoptions
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, x := range fields {
			if x == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+2 >= len(fields) || len(fields) < 5 {
			continue
		}
		if fields[sep+1] == "tmpfs" && strings.HasPrefix(fields[sep+2], Prefix) {
			dirs = append(dirs, unescapeMount(fields[4]))
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read mounts: %w", err)
	}
	var errs []error
	// Deepest first, so that nested mounts come off before their parents.
	for i := len(dirs) - 1; i >= 0; i-- {
		errs = append(errs, unmountDisk(dirs[i]))
	}
	return errors.Join(errs...)
}

// unescapeMount undoes mountinfo's octal escapes of spaces, tabs, newlines and backslashes.
func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// fillFile is the file FillDisk grows until the file system is full.
const fillFile = "chaos-fill"

// fill writes zeros to dir/chaos-fill until the file system holding dir is full, and returns how many bytes it
// took. Writing (rather than fallocate) is what a runaway log or another tenant does, and leaves not a single
// block free.
func fill(dir string) (int64, error) {
	f, err := os.OpenFile(filepath.Join(dir, fillFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return 0, fmt.Errorf("create %s: %w", filepath.Join(dir, fillFile), err)
	}
	defer f.Close()
	var total int64
	for _, chunk := range []int{1 << 20, 4096, 512} {
		buf := make([]byte, chunk)
		for {
			n, err := f.Write(buf)
			total += int64(n)
			if errors.Is(err, syscall.ENOSPC) {
				break
			}
			if err != nil {
				return total, fmt.Errorf("fill %s: %w", dir, err)
			}
		}
	}
	return total, nil
}

// freeSpace removes what fill wrote.
func freeSpace(dir string) error {
	if err := os.Remove(filepath.Join(dir, fillFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("free %s: %w", dir, err)
	}
	return nil
}

// diskFree returns the bytes available to unprivileged writers of the file system holding dir.
func diskFree(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return int64(st.Bavail) * st.Bsize, nil
}
