// Package testguest builds and reads the project's test guest: a Linux kernel and an initramfs made from
// Debian packages only (linux-image-cloud-amd64's kernel and modules, busybox-static) plus the agent in
// ./agent, a static Go program built at build time with the local Go toolchain (no downloads). The agent writes
// a counter of CRC-checked records to the guest's first disk and prints each on the serial console, so tests
// can prove that a guest kept running, and that its disk stayed consistent, across pause, restart, migration
// and hot-plug. Given an agent channel (hypervisor.Spec.Agent), the agent also sends a heartbeat on it every
// second and can be told to hang, for testing VM monitoring (formats in the record package). This package builds
// the pair (cached by a hash of every input), and parses the console and verifies the disk on the host side. It depends on the standard library and the record package, and runs
// the go command.
package testguest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"
)

// formatVersion changes whenever the layout of the initramfs changes in a way the inputs do not show.
const formatVersion = "testguest-v1"

// agentPackage is the agent's import path, for finding its source when this file's own path is unknown.
const agentPackage = "github.com/basalt-hv/basalt/computed/testguest/agent"

// Options tune Build; the zero value finds everything in its default place.
type Options struct {
	// Dir caches built guests; default <os.UserCacheDir>/basalt/testguest.
	Dir string
	// KernelRelease selects /boot/vmlinuz-<release> and /lib/modules/<release>; default the newest release
	// that has both, preferring Debian's cloud flavour.
	KernelRelease string
	// Boot and Modules are where kernels and modules live; defaults /boot and /lib/modules.
	Boot, Modules string
	// Busybox is a statically linked busybox; default /bin/busybox (Debian's busybox-static).
	Busybox string
	// Go is the go command that builds the agent; default "go" from PATH, then /usr/local/go/bin/go.
	Go string
	// AgentDir is the agent's source directory; default found next to this package's source.
	AgentDir string
	Logger   *slog.Logger
}

// Guest is a built kernel and initramfs pair.
type Guest struct {
	Kernel, Initrd string
	KernelRelease  string
	// Modules are the modules the initramfs loads, in order; Builtin the wanted ones the kernel has built in.
	Modules, Builtin []string
	// Key is the hash of the inputs that names the cache entry.
	Key string
}

// Cmdline is the kernel command line for the guest: the serial console, reboot-free panics, quiet boot, and
// agent options such as "basalt.memload=256".
func (g Guest) Cmdline(agentOptions ...string) string {
	return strings.Join(append([]string{"console=ttyS0", "panic=-1", "quiet"}, agentOptions...), " ")
}

// Build returns the test guest for opts, building it unless the cache already holds one made from the same
// inputs (kernel, modules, busybox, agent binary, init script).
func Build(ctx context.Context, opts Options) (Guest, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if opts.Boot == "" {
		opts.Boot = "/boot"
	}
	if opts.Modules == "" {
		opts.Modules = "/lib/modules"
	}
	if opts.Busybox == "" {
		opts.Busybox = "/bin/busybox"
	}
	if opts.Dir == "" {
		cache, err := os.UserCacheDir()
		if err != nil {
			return Guest{}, fmt.Errorf("test guest: no cache directory: %w", err)
		}
		opts.Dir = filepath.Join(cache, "basalt", "testguest")
	}
	rel := opts.KernelRelease
	if rel == "" {
		var err error
		if rel, err = findKernel(opts.Boot, opts.Modules); err != nil {
			return Guest{}, err
		}
	}
	kernel := filepath.Join(opts.Boot, "vmlinuz-"+rel)
	modDir := filepath.Join(opts.Modules, rel)
	load, builtin, err := moduleOrder(modDir, guestModules)
	if err != nil {
		return Guest{}, fmt.Errorf("test guest: kernel %s: %w", rel, err)
	}
	if err := checkStatic(opts.Busybox); err != nil {
		return Guest{}, fmt.Errorf("test guest: %w (install Debian's busybox-static)", err)
	}

	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return Guest{}, fmt.Errorf("test guest: %w", err)
	}
	tmp, err := os.MkdirTemp(opts.Dir, ".build-")
	if err != nil {
		return Guest{}, fmt.Errorf("test guest: %w", err)
	}
	defer os.RemoveAll(tmp)
	agent := filepath.Join(tmp, "agent")
	if err := buildAgent(ctx, opts, agent); err != nil {
		return Guest{}, err
	}

	names := make([]string, len(load))
	for i, p := range load {
		names[i] = moduleName(p)
	}
	initScript := makeInit(names)

	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n", formatVersion, initScript)
	inputs := []string{kernel, opts.Busybox, agent}
	for _, p := range load {
		inputs = append(inputs, filepath.Join(modDir, p))
	}
	for _, p := range inputs {
		if err := hashFile(h, p); err != nil {
			return Guest{}, fmt.Errorf("test guest: %w", err)
		}
	}
	key := hex.EncodeToString(h.Sum(nil))[:16]
	g := Guest{
		Kernel: filepath.Join(opts.Dir, key, "vmlinuz"), Initrd: filepath.Join(opts.Dir, key, "initrd"),
		KernelRelease: rel, Modules: names, Builtin: builtin, Key: key,
	}
	if _, err := os.Stat(g.Initrd); err == nil {
		return g, nil
	}

	start := time.Now()
	out := filepath.Join(tmp, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		return Guest{}, fmt.Errorf("test guest: %w", err)
	}
	if err := copyFile(kernel, filepath.Join(out, "vmlinuz")); err != nil {
		return Guest{}, fmt.Errorf("test guest: %w", err)
	}
	if err := writeInitrd(filepath.Join(out, "initrd"), initScript, opts.Busybox, agent, modDir, load); err != nil {
		return Guest{}, fmt.Errorf("test guest: initramfs: %w", err)
	}
	// Publish atomically: a concurrent build of the same inputs either wins the rename or finds ours.
	if err := os.Rename(out, filepath.Join(opts.Dir, key)); err != nil {
		if _, serr := os.Stat(g.Initrd); serr != nil {
			return Guest{}, fmt.Errorf("test guest: publish build: %w", err)
		}
	}
	log.Info("built test guest", "dir", filepath.Join(opts.Dir, key), "kernel", rel, "modules", names,
		"builtin", builtin, "took", time.Since(start).Round(time.Millisecond))
	pruneOld(opts.Dir, key)
	return g, nil
}

// findKernel picks the newest kernel release that has both an image and modules, preferring the cloud flavour
// (it is small and boots fastest under TCG).
func findKernel(boot, modules string) (string, error) {
	imgs, _ := filepath.Glob(filepath.Join(boot, "vmlinuz-*"))
	var rels []string
	for _, img := range imgs {
		rel := strings.TrimPrefix(filepath.Base(img), "vmlinuz-")
		if _, err := os.Stat(filepath.Join(modules, rel, "modules.dep")); err == nil {
			rels = append(rels, rel)
		}
	}
	if len(rels) == 0 {
		return "", fmt.Errorf("test guest: no kernel with modules in %s and %s (install Debian's linux-image-cloud-amd64)", boot, modules)
	}
	sort.Slice(rels, func(i, j int) bool {
		ci, cj := strings.Contains(rels[i], "cloud"), strings.Contains(rels[j], "cloud")
		if ci != cj {
			return ci
		}
		return versionLess(rels[j], rels[i])
	})
	return rels[0], nil
}

// versionLess compares kernel releases by their numeric parts, so 6.10 sorts after 6.9.
func versionLess(a, b string) bool {
	split := func(s string) []string {
		return strings.FieldsFunc(s, func(r rune) bool { return r == '.' || r == '-' || r == '+' })
	}
	pa, pb := split(a), split(b)
	for i := 0; i < len(pa) && i < len(pb); i++ {
		var na, nb int
		_, ea := fmt.Sscanf(pa[i], "%d", &na)
		_, eb := fmt.Sscanf(pb[i], "%d", &nb)
		if ea == nil && eb == nil && na != nb {
			return na < nb
		}
		if ea != nil || eb != nil {
			if pa[i] != pb[i] {
				return pa[i] < pb[i]
			}
		}
	}
	return len(pa) < len(pb)
}

func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("busybox %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("busybox %s is dynamically linked", path)
		}
	}
	return nil
}

// agentDir finds the agent's source: next to this file when the binary was built from a checkout (tests, go
// run, make build), else through go list from the working directory.
func agentDir(ctx context.Context, goCmd string) (string, error) {
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		dir := filepath.Join(filepath.Dir(file), "agent")
		if _, err := os.Stat(filepath.Join(dir, "main.go")); err == nil {
			return dir, nil
		}
	}
	out, err := exec.CommandContext(ctx, goCmd, "list", "-f", "{{.Dir}}", agentPackage).Output()
	if err != nil {
		return "", fmt.Errorf("find the agent's source (run from the basalt checkout or set Options.AgentDir): %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

func goCommand(opts Options) (string, error) {
	if opts.Go != "" {
		return opts.Go, nil
	}
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/local/go/bin/go"); err == nil {
		return "/usr/local/go/bin/go", nil
	}
	return "", errors.New("test guest: the go command is not on PATH; it builds the agent")
}

// buildAgent compiles the agent into out: static, for the guest's architecture, offline. The go build cache
// makes this quick when nothing changed, and Go builds are reproducible, so the binary's hash is a fair input
// to the cache key.
func buildAgent(ctx context.Context, opts Options, out string) error {
	goCmd, err := goCommand(opts)
	if err != nil {
		return err
	}
	dir := opts.AgentDir
	if dir == "" {
		if dir, err = agentDir(ctx, goCmd); err != nil {
			return fmt.Errorf("test guest: %w", err)
		}
	}
	cmd := exec.CommandContext(ctx, goCmd, "build", "-trimpath", "-ldflags=-s -w", "-o", out, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOPROXY=off",
		"GOTOOLCHAIN=local", "GOFLAGS=-mod=readonly")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("test guest: build agent in %s: %w: %s", dir, err, bytes.TrimSpace(b))
	}
	return nil
}

// makeInit is the initramfs's /init: mount the kernel filesystems, load the modules in dependency order, and
// hand over to the agent.
func makeInit(modules []string) string {
	return `#!/bin/busybox sh
# Basalt test guest: load the virtio modules, then run the agent as PID 1.
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
for m in ` + strings.Join(modules, " ") + `; do
	/bin/busybox insmod /lib/modules/$m.ko || echo "BASALT error insmod $m"
done
exec /agent
`
}

// writeInitrd writes the initramfs. It is left uncompressed: the kernel unpacks it faster that way under TCG,
// and it is small (a few MiB).
func writeInitrd(path, initScript, busybox, agent, modDir string, load []string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	c := newCPIO(f)
	for _, d := range []string{"bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"} {
		c.Dir(d)
	}
	// The kernel opens /dev/console for init's stdin/stdout before devtmpfs is mounted.
	c.CharDev("dev/console", 0o600, 5, 1)
	c.File("init", 0o755, []byte(initScript))
	for _, bin := range []struct{ src, dst string }{{busybox, "bin/busybox"}, {agent, "agent"}} {
		b, err := os.ReadFile(bin.src)
		if err != nil {
			return err
		}
		c.File(bin.dst, 0o755, b)
	}
	c.Symlink("bin/sh", "busybox")
	for _, p := range load {
		b, err := os.ReadFile(filepath.Join(modDir, p))
		if err != nil {
			return err
		}
		c.File("lib/modules/"+moduleName(p)+".ko", 0o644, b)
	}
	if err := c.Close(); err != nil {
		return err
	}
	return f.Close()
}

func hashFile(h io.Writer, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fmt.Fprintf(h, "%s\n", filepath.Base(path))
	_, err = io.Copy(h, f)
	return err
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// pruneOld removes cached builds other than keep that have not been touched for a day, so that rebuilding on
// every agent change does not fill the cache, while a build another process is using right now is left alone.
func pruneOld(dir, keep string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		if !e.IsDir() || e.Name() == keep {
			continue
		}
		if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > 24*time.Hour {
			os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
}
