package testguest

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// needInputs skips when the Debian packages the guest is made from are missing.
func needInputs(t *testing.T) {
	t.Helper()
	if _, err := findKernel("/boot", "/lib/modules"); err != nil {
		t.Skipf("%v", err)
	}
	if err := checkStatic("/bin/busybox"); err != nil {
		t.Skipf("%v (Debian package busybox-static)", err)
	}
}

func TestBuild(t *testing.T) {
	needInputs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	g, err := Build(ctx, Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(g.Initrd) != filepath.Join(dir, g.Key) || filepath.Dir(g.Kernel) != filepath.Dir(g.Initrd) {
		t.Fatalf("guest files %s, %s not in the cache entry %s", g.Kernel, g.Initrd, g.Key)
	}
	kernel, _ := os.ReadFile(filepath.Join("/boot", "vmlinuz-"+g.KernelRelease))
	if built, _ := os.ReadFile(g.Kernel); !bytes.Equal(kernel, built) || len(built) == 0 {
		t.Fatal("cached kernel differs from /boot's")
	}

	f, err := os.Open(g.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ents, err := readCPIO(f)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]cpioEntry{}
	for _, e := range ents {
		byName[e.Name] = e
	}
	for _, want := range []string{"init", "agent", "bin/busybox", "bin/sh", "dev/console"} {
		if _, ok := byName[want]; !ok {
			t.Errorf("initramfs lacks %s", want)
		}
	}
	if c := byName["dev/console"]; c.Mode&0o170000 != cpioChar || c.Major != 5 || c.Minor != 1 {
		t.Errorf("dev/console = %+v", c)
	}
	if init := byName["init"]; init.Mode&0o111 == 0 || !strings.HasPrefix(string(init.Data), "#!/bin/busybox sh") {
		t.Errorf("init not an executable script: mode %o", init.Mode)
	}
	if !bytes.HasPrefix(byName["agent"].Data, []byte("\x7fELF")) {
		t.Error("agent is not an ELF binary")
	}
	// Every wanted module is loaded or built in, each after what it depends on.
	for _, m := range guestModules {
		if !slices.Contains(g.Modules, m) && !slices.Contains(g.Builtin, m) {
			t.Errorf("module %s neither loaded nor built in (loaded %v, built in %v)", m, g.Modules, g.Builtin)
		}
		if slices.Contains(g.Modules, m) {
			if _, ok := byName["lib/modules/"+m+".ko"]; !ok {
				t.Errorf("initramfs lacks module %s", m)
			}
		}
	}
	load, _, err := moduleOrder(filepath.Join("/lib/modules", g.KernelRelease), guestModules)
	if err != nil {
		t.Fatal(err)
	}
	deps := readDeps(t, filepath.Join("/lib/modules", g.KernelRelease, "modules.dep"))
	for i, p := range load {
		for _, d := range deps[p] {
			if j := slices.Index(load, d); j < 0 || j > i {
				t.Errorf("%s loads at %d but its dependency %s at %d", p, i, d, j)
			}
		}
	}
	if !strings.Contains(string(byName["init"].Data), strings.Join(g.Modules, " ")) {
		t.Errorf("init does not load %v in order:\n%s", g.Modules, byName["init"].Data)
	}

	// Same inputs: the cache answers, nothing is rebuilt.
	info, _ := os.Stat(g.Initrd)
	g2, err := Build(ctx, Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	info2, _ := os.Stat(g2.Initrd)
	if g2.Key != g.Key || !info2.ModTime().Equal(info.ModTime()) {
		t.Fatalf("second build %s (%s), first %s (%s)", g2.Key, info2.ModTime(), g.Key, info.ModTime())
	}
	// A changed input (another busybox binary) gives another key.
	bb := filepath.Join(t.TempDir(), "busybox")
	b, _ := os.ReadFile("/bin/busybox")
	os.WriteFile(bb, append(b, 0), 0o755)
	g3, err := Build(ctx, Options{Dir: dir, Busybox: bb})
	if err != nil {
		t.Fatal(err)
	}
	if g3.Key == g.Key {
		t.Fatal("changed busybox, same cache key")
	}
}

func readDeps(t *testing.T, path string) map[string][]string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	deps := map[string][]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if m, rest, ok := strings.Cut(l, ":"); ok {
			deps[m] = strings.Fields(rest)
		}
	}
	return deps
}

func TestModuleOrderErrors(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "modules.dep"), []byte("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\nkernel/c.ko.xz:\nkernel/d-x.ko:\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/e.ko\n"), 0o644)
	if _, _, err := moduleOrder(dir, []string{"a"}); err == nil || !strings.Contains(err.Error(), "cycle") {
		t.Errorf("cycle: %v", err)
	}
	if _, _, err := moduleOrder(dir, []string{"c.ko.xz"}); err == nil {
		t.Error("compressed module accepted")
	}
	if _, _, err := moduleOrder(dir, []string{"nope"}); err == nil {
		t.Error("unknown module accepted")
	}
	load, builtin, err := moduleOrder(dir, []string{"d_x", "e"})
	if err != nil || !slices.Equal(load, []string{"kernel/d-x.ko"}) || !slices.Equal(builtin, []string{"e"}) {
		t.Errorf("moduleOrder = %v, %v, %v", load, builtin, err)
	}
}

func TestCPIORoundTrip(t *testing.T) {
	var buf bytes.Buffer
	c := newCPIO(&buf)
	c.Dir("d")
	c.File("/d/f", 0o644, []byte("hello"))
	c.Symlink("d/l", "f")
	c.CharDev("d/c", 0o600, 5, 1)
	c.File("odd", 0o755, []byte("abc")) // lengths that need padding
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Fatalf("archive of %d bytes is not 4-aligned", buf.Len())
	}
	ents, err := readCPIO(&buf)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name)
	}
	if !slices.Equal(names, []string{"d", "d/f", "d/l", "d/c", "odd"}) || string(ents[1].Data) != "hello" ||
		string(ents[2].Data) != "f" || ents[3].Major != 5 || string(ents[4].Data) != "abc" || ents[4].Mode != cpioFile|0o755 {
		t.Fatalf("entries = %+v", ents)
	}
}

func TestVersionLess(t *testing.T) {
	if !versionLess("6.1.0-9-cloud-amd64", "6.1.0-10-cloud-amd64") || versionLess("6.10.0-1-amd64", "6.9.0-1-amd64") {
		t.Fatal("numeric parts compared as strings")
	}
}
