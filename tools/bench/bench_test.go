package bench

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestParseRealFioOutput runs fio itself on a small file and parses what it prints.
func TestParseRealFioOutput(t *testing.T) {
	if _, err := exec.LookPath("fio"); err != nil {
		t.Skip("fio not installed (Debian package fio; make test installs it)")
	}
	f := filepath.Join(t.TempDir(), "f")
	out, err := exec.Command("fio", "--name=t", "--output-format=json", "--rw=randwrite", "--bs=4k", "--size=4M",
		"--filename="+f, "--ioengine=psync").Output()
	if err != nil {
		t.Fatal(err)
	}
	r, err := ParseFio(bytes.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	if r.IOPS <= 0 || r.MBps <= 0 || r.LatUsec <= 0 {
		t.Fatalf("parsed %+v from a real fio run", r)
	}
	if r2, err := ParseFio(strings.NewReader("fio: connected to NBD server\n" + string(out))); err != nil || r2 != r {
		t.Fatalf("output with the nbd engine's greeting line: %+v, %v", r2, err)
	}
	if _, err := ParseFio(strings.NewReader(`{"jobs":[]}`)); err == nil {
		t.Fatal("empty fio output accepted")
	}
	if _, err := ParseFio(strings.NewReader(`{"jobs":[{"error":5}]}`)); err == nil {
		t.Fatal("a failed fio job accepted")
	}
}

func TestTableRatios(t *testing.T) {
	res := map[string]map[string]Result{
		"qemu-nbd": {"4K rand read QD32": {IOPS: 50000}},
		"basalt":   {"4K rand read QD32": {IOPS: 25000}},
	}
	tab := Table([]string{"qemu-nbd", "basalt"}, res, "qemu-nbd")
	if !strings.Contains(tab, "| 4K rand read QD32 (IOPS) | 50k | 25k (0.50×) |") {
		t.Fatalf("table:\n%s", tab)
	}
}
