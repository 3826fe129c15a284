package testguest

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// guestModules are the modules the test guest needs beyond what the cloud kernel builds in: the virtio
// transport and devices (disk, network, balloon, console), and the ACPI power button with the event device
// that the agent reads it from. Their dependencies are added from modules.dep.
var guestModules = []string{
	"virtio_pci", "virtio_blk", "virtio_net", "virtio_balloon", "virtio_console", "button", "evdev",
}

// moduleName is the name the kernel knows a module file by: base name without .ko, dashes as underscores.
func moduleName(path string) string {
	base := filepath.Base(path)
	base = strings.TrimSuffix(base, ".ko")
	return strings.ReplaceAll(base, "-", "_")
}

// moduleOrder resolves wanted module names against modDir's modules.dep and modules.builtin. It returns the
// module files (relative to modDir) to load, each after its dependencies, and the wanted modules that are
// built into the kernel and need no loading.
func moduleOrder(modDir string, wanted []string) (load []string, builtin []string, err error) {
	deps := map[string][]string{} // module path -> dependency paths
	byName := map[string]string{}
	f, err := os.Open(filepath.Join(modDir, "modules.dep"))
	if err != nil {
		return nil, nil, fmt.Errorf("read modules.dep: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		mod, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		deps[mod] = strings.Fields(rest)
		byName[moduleName(mod)] = mod
	}
	if err := sc.Err(); err != nil {
		return nil, nil, fmt.Errorf("read modules.dep: %w", err)
	}
	isBuiltin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			isBuiltin[moduleName(l)] = true
		}
	}

	seen := map[string]bool{}
	var visit func(path string, chain []string) error
	visit = func(path string, chain []string) error {
		if seen[path] {
			return nil
		}
		for _, c := range chain {
			if c == path {
				return fmt.Errorf("dependency cycle: %s", strings.Join(append(chain, path), " -> "))
			}
		}
		if !strings.HasSuffix(path, ".ko") {
			return fmt.Errorf("module %s is compressed; the test guest loads plain .ko files only", path)
		}
		for _, d := range deps[path] {
			if err := visit(d, append(chain, path)); err != nil {
				return err
			}
		}
		seen[path] = true
		load = append(load, path)
		return nil
	}
	for _, name := range wanted {
		name = strings.ReplaceAll(name, "-", "_")
		if path, ok := byName[name]; ok {
			if err := visit(path, nil); err != nil {
				return nil, nil, err
			}
			continue
		}
		if isBuiltin[name] {
			builtin = append(builtin, name)
			continue
		}
		return nil, nil, fmt.Errorf("module %s is neither in %s/modules.dep nor built in", name, modDir)
	}
	return load, builtin, nil
}
