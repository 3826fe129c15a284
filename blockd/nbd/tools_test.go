package nbd

// Tests against the real NBD clients: libnbd's nbdinfo and nbdcopy, qemu's
// block layer (qemu-io, qemu-img) and fio's nbd engine. They are what will
// talk to blockd in production, so they are the arbiters of whether the
// server speaks the protocol as it is used.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// debianPackage names the package that provides each tool.
var debianPackage = map[string]string{
	"nbdinfo":  "libnbd-bin",
	"nbdcopy":  "libnbd-bin",
	"qemu-io":  "qemu-utils",
	"qemu-img": "qemu-utils",
	"fio":      "fio",
}

func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (apt-get install %s)", tool, debianPackage[tool])
		}
	}
}

// run runs a tool to completion, failing the test if it fails. The timeout
// kills a hung client rather than the whole test binary.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := runErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (f *fixture) uri(export string) string { return "nbd://" + f.tcp + "/" + export }
func (f *fixture) unixURI(export string) string {
	return "nbd+unix:///" + export + "?socket=" + f.unix
}

// withImage adds a 16 MiB export "img" for copy round trips.
const imgSize = 16 << 20

func withImage(img *memBackend) func(*fixture) {
	return func(f *fixture) {
		f.exports["img"] = &Export{Size: imgSize, MultiConn: true, Backend: img}
	}
}

func TestNbdinfo(t *testing.T) {
	needTools(t, "nbdinfo")
	f := newFixture(t)

	type export struct {
		Name        string   `json:"export-name"`
		Description string   `json:"description"`
		Size        int64    `json:"export-size"`
		Contexts    []string `json:"contexts"`
		ReadOnly    bool     `json:"is_read_only"`
		CanCache    bool     `json:"can_cache"`
		CanDF       bool     `json:"can_df"`
		CanFastZero bool     `json:"can_fast_zero"`
		CanFlush    bool     `json:"can_flush"`
		CanFUA      bool     `json:"can_fua"`
		CanMulti    bool     `json:"can_multi_conn"`
		CanTrim     bool     `json:"can_trim"`
		CanZero     bool     `json:"can_zero"`
		MinBlock    uint32   `json:"block_size_minimum"`
		PrefBlock   uint32   `json:"block_size_preferred"`
		MaxBlock    uint32   `json:"block_size_maximum"`
	}
	type info struct {
		Protocol   string   `json:"protocol"`
		TLS        bool     `json:"TLS"`
		Structured bool     `json:"structured"`
		Exports    []export `json:"exports"`
	}
	get := func(args ...string) info {
		t.Helper()
		var i info
		out := run(t, "nbdinfo", append([]string{"--json"}, args...)...)
		if err := json.Unmarshal([]byte(out), &i); err != nil {
			t.Fatalf("nbdinfo output: %v\n%s", err, out)
		}
		return i
	}

	i := get(f.uri("disk"))
	want := export{
		Name: "disk", Description: "test disk", Size: diskSize, Contexts: []string{"base:allocation"},
		CanCache: true, CanDF: true, CanFastZero: true, CanFlush: true, CanFUA: true, CanMulti: true, CanTrim: true, CanZero: true,
		MinBlock: 1, PrefBlock: 4096, MaxBlock: 32 << 20,
	}
	if i.Protocol != "newstyle-fixed" || i.TLS || !i.Structured || len(i.Exports) != 1 || fmt.Sprint(i.Exports[0]) != fmt.Sprint(want) {
		t.Errorf("nbdinfo disk:\n got %+v\nwant one export %+v", i, want)
	}

	// Over the Unix socket, a read-only export with non-default sizes.
	i = get(f.unixURI("ro"))
	want = export{
		Name: "ro", Size: roSize, Contexts: []string{"base:allocation"}, ReadOnly: true,
		CanCache: true, CanDF: true, CanFlush: true, MinBlock: 1, PrefBlock: 4096, MaxBlock: 32 << 20,
	}
	if len(i.Exports) != 1 || fmt.Sprint(i.Exports[0]) != fmt.Sprint(want) {
		t.Errorf("nbdinfo ro:\n got %+v\nwant %+v", i.Exports, want)
	}
	i = get(f.uri("strict"))
	if e := i.Exports[0]; e.MinBlock != strictMin || e.MaxBlock != strictMax {
		t.Errorf("nbdinfo strict: block sizes %d/%d/%d", e.MinBlock, e.PrefBlock, e.MaxBlock)
	}

	i = get("--list", f.uri(""))
	var names []string
	for _, e := range i.Exports {
		names = append(names, e.Name)
	}
	if strings.Join(names, ",") != "disk,ro,strict" {
		t.Errorf("nbdinfo --list: %v", names)
	}

	// libnbd 1.14 reports NBD_REP_ERR_UNKNOWN as ENOENT and does not show
	// the server's message.
	if out, err := runErr("nbdinfo", f.uri("missing")); err == nil || !strings.Contains(out, "No such file") {
		t.Errorf("nbdinfo on a missing export: err %v, output %q", err, out)
	}
}

type mapEntry struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Type   uint32 `json:"type"`
}

func nbdinfoMap(t *testing.T, uri string) []mapEntry {
	t.Helper()
	out := run(t, "nbdinfo", "--map", "--json", uri)
	var m []mapEntry
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("nbdinfo --map: %v\n%s", err, out)
	}
	return m
}

func TestQemuIO(t *testing.T) {
	needTools(t, "qemu-io", "nbdinfo")
	f := newFixture(t)
	cmds := []string{
		"write -P 0xab 0 1M",
		"write -f -P 0xcd 1M 64k", // FUA
		"write -z 2M 1M",          // zeroes, must stay allocated
		"write -z -u 3M 1M",       // zeroes, may unmap
		"discard 0 64k",
		"flush",
		"read -P 0xab 64k 960k",
		"read -P 0xcd 1M 64k",
		"read -P 0 1088k 960k",
		"read -P 0 2M 2M",
		"aio_write -P 0x11 8M 4k",
		"aio_write -P 0x22 8196k 4k",
		"aio_flush",
		"read -P 0x11 8M 4k",
		"read -P 0x22 8196k 4k",
	}
	var args []string
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := run(t, "qemu-io", append(append([]string{"-f", "raw"}, args...), f.uri("disk"))...)
	if strings.Contains(out, "failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io:\n%s", out)
	}

	// The trim and the unmapping zero left holes; everything else is
	// allocated.
	const hz = stateHole | stateZero
	want := []mapEntry{
		{0, 64 << 10, hz},
		{64 << 10, 1 << 20, 0},
		{1<<20 + 64<<10, 1<<20 - 64<<10, hz},
		{2 << 20, 1 << 20, 0},
		{3 << 20, 5 << 20, hz},
		{8 << 20, 8 << 10, 0},
		{8<<20 + 8<<10, diskSize - 8<<20 - 8<<10, hz},
	}
	if got := nbdinfoMap(t, f.uri("disk")); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("nbdinfo --map:\n got %v\nwant %v", got, want)
	}

	// A deliberately wrong pattern must be noticed, or the checks above
	// prove nothing.
	if out, err := runErr("qemu-io", "-f", "raw", "-c", "read -P 0x99 0 4k", f.uri("disk")); err == nil && !strings.Contains(out, "Pattern verification failed") {
		t.Errorf("qemu-io did not detect a wrong pattern:\n%s", out)
	}

	// The same over the Unix socket.
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5e 4M 128k", f.unixURI("disk"))
	out = run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x5e 4M 128k", f.unixURI("disk"))
	if strings.Contains(out, "failed") {
		t.Fatalf("qemu-io over Unix socket:\n%s", out)
	}
}

// writeSparseImage writes a 16 MiB file with random data in a few places
// and holes elsewhere, and returns the 4 KiB-page offsets holding data.
func writeSparseImage(t *testing.T, path string) []int64 {
	t.Helper()
	file, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	if err := file.Truncate(imgSize); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	var pages []int64
	for _, r := range [][2]int64{{0, 64 << 10}, {1 << 20, 4 << 10}, {5<<20 + 12<<10, 1 << 20}, {imgSize - 8<<10, 8 << 10}} {
		b := make([]byte, r[1])
		for i := range b {
			b[i] = byte(rng.IntN(255) + 1) // never zero, so qemu-img cannot skip it
		}
		if _, err := file.WriteAt(b, r[0]); err != nil {
			t.Fatal(err)
		}
		for off := r[0]; off < r[0]+r[1]; off += memPageSize {
			pages = append(pages, off)
		}
	}
	return pages
}

func sameFiles(t *testing.T, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(x, y) {
		t.Errorf("%s and %s differ", a, b)
	}
}

func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

func TestQemuImgRoundTrip(t *testing.T) {
	needTools(t, "qemu-img")
	img := newMemBackend(imgSize)
	f := newFixture(t, withImage(img))
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src.raw"), filepath.Join(dir, "dst.raw")
	pages := writeSparseImage(t, src)
	// Garbage in the target, which convert must overwrite or zero.
	img.WriteAt(context.Background(), bytes.Repeat([]byte{0xff}, 2<<20), 8<<20, false)

	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, f.uri("img"))
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, f.uri("img"))
	// Holes in the source stayed holes in the export.
	if got := img.allocated(); fmt.Sprint(got) != fmt.Sprint(pages) {
		t.Errorf("allocated pages after convert:\n got %v\nwant %v", got, pages)
	}
	var m []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
	}
	out := run(t, "qemu-img", "map", "--output=json", "-f", "raw", f.uri("img"))
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("qemu-img map: %v\n%s", err, out)
	}
	var data int64
	for _, e := range m {
		if e.Data {
			data += e.Length
		}
	}
	if want := int64(len(pages)) * memPageSize; data != want {
		t.Errorf("qemu-img map reports %d bytes of data, want %d:\n%s", data, want, out)
	}

	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", f.uri("img"), dst)
	sameFiles(t, src, dst)
	if n := allocatedBytes(t, dst); n > 4<<20 {
		t.Errorf("copy out of the export allocated %d bytes; holes were not preserved", n)
	}
	if _, err := runErr("qemu-img", "compare", "-f", "raw", "-F", "raw", src, f.uri("disk")); err == nil {
		t.Errorf("qemu-img compare of different images succeeded")
	}
}

func TestNbdcopy(t *testing.T) {
	needTools(t, "nbdcopy")
	img := newMemBackend(imgSize)
	f := newFixture(t, withImage(img))
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src.raw"), filepath.Join(dir, "dst.raw")
	pages := writeSparseImage(t, src)

	// nbdcopy uses several connections (the export is multi-conn) and
	// many requests in flight on each.
	run(t, "nbdcopy", "--flush", src, f.uri("img"))
	if got := img.allocated(); fmt.Sprint(got) != fmt.Sprint(pages) {
		t.Errorf("allocated pages after nbdcopy:\n got %v\nwant %v", got, pages)
	}
	run(t, "nbdcopy", f.unixURI("img"), dst)
	sameFiles(t, src, dst)
	if n := allocatedBytes(t, dst); n > 4<<20 {
		t.Errorf("copy out of the export allocated %d bytes; holes were not preserved", n)
	}
	// Export to export.
	run(t, "nbdcopy", f.uri("img"), f.uri("disk"))
	run(t, "nbdcopy", f.uri("disk"), dst)
	b, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	s, _ := os.ReadFile(src)
	if !bytes.Equal(b[:imgSize], s) || !bytes.Equal(b[imgSize:], make([]byte, diskSize-imgSize)) {
		t.Errorf("export-to-export copy differs")
	}
}

func TestFio(t *testing.T) {
	needTools(t, "fio")
	f := newFixture(t)
	// Random 4 KiB writes at queue depth 32 over all 64 MiB, then a read
	// pass verifying every block's checksum.
	out := run(t, "fio", "--name=nbd", "--ioengine=nbd", "--uri="+f.uri("disk"),
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=64M",
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json")
	// fio prints a line about connecting before the JSON.
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Write struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"write"`
			Read struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"read"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &res); err != nil {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	if len(res.Jobs) != 1 || res.Jobs[0].Error != 0 || res.Jobs[0].Write.IOBytes != diskSize || res.Jobs[0].Read.IOBytes != diskSize {
		t.Errorf("fio: %+v\n%s", res, out)
	}
	if got := len(f.disk.allocated()); got != diskSize/memPageSize {
		t.Errorf("%d pages written, want all %d", got, diskSize/memPageSize)
	}
}
