// Command basalt-bench runs `make bench`: fio against the raw file, qemu-nbd, nbdkit and Basalt with 1 and 3
// replicas, in one run, and prints a Markdown table of the results with ratios to qemu-nbd. See tools/bench.
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/basalt-hv/basalt/tools/bench"
)

func main() {
	dir := flag.String("dir", "/var/tmp/basalt-bench", "scratch directory on the disk to measure (emptied first)")
	binDir := flag.String("bin-dir", "bin", "directory with the basalt binaries")
	size := flag.String("size", "1G", "bytes each target holds (the sequential write fills them)")
	runtime := flag.Duration("runtime", 5*time.Second, "duration of each timed job")
	suites := flag.String("suites", "nbd,checkpoint", "comma-separated suites to run: nbd (fio against Basalt and its peers), checkpoint (checkpoint create, writes after a checkpoint, merge under load)")
	flag.Parse()
	if err := run(*dir, *binDir, *size, *runtime, *suites); err != nil {
		fmt.Fprintf(os.Stderr, "basalt-bench: %v\n", err)
		os.Exit(1)
	}
}

type target struct {
	name string
	// fio arguments that select the target.
	args []string
}

func run(dir, binDir, size string, runtime time.Duration, suites string) error {
	for _, tool := range []string{"fio", "qemu-nbd", "nbdkit", "qemu-img"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not installed (run `make deps`)", tool)
		}
	}
	binDir, _ = filepath.Abs(binDir)
	os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()

	raw := filepath.Join(dir, "raw.img")
	if out, err := exec.Command("qemu-img", "create", "-f", "raw", raw, size).CombinedOutput(); err != nil {
		return fmt.Errorf("create raw file: %v: %s", err, out)
	}
	qemuImg, nbdkitImg := filepath.Join(dir, "qemu-nbd.img"), filepath.Join(dir, "nbdkit.img")
	for _, f := range []string{qemuImg, nbdkitImg} {
		if out, err := exec.Command("qemu-img", "create", "-f", "raw", f, size).CombinedOutput(); err != nil {
			return fmt.Errorf("create %s: %v: %s", f, err, out)
		}
	}
	qsock, ksock := filepath.Join(dir, "qemu-nbd.sock"), filepath.Join(dir, "nbdkit.sock")
	if err := background(ctx, "qemu-nbd", "--cache=none", "--aio=native", "--format=raw", "--shared=8", "--persistent", "--socket="+qsock, qemuImg); err != nil {
		return err
	}
	if err := background(ctx, "nbdkit", "--foreground", "--unix", ksock, "file", nbdkitImg); err != nil {
		return err
	}
	base, err := freeBase()
	if err != nil {
		return err
	}
	env := append(os.Environ(), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"), fmt.Sprintf("BASALT_ENDPOINT=127.0.0.1:%d", base))
	up := exec.CommandContext(ctx, filepath.Join(binDir, "basalt"), "up", "--data-dir", filepath.Join(dir, "basalt"),
		"--bin-dir", binDir, "--base-port", fmt.Sprint(base), "--no-client-config")
	up.Env = env
	up.Cancel = func() error { return up.Process.Signal(syscall.SIGINT) }
	up.WaitDelay = 30 * time.Second
	upOut, _ := up.StdoutPipe()
	up.Stderr = os.Stderr
	if err := up.Start(); err != nil {
		return fmt.Errorf("start basalt up: %w", err)
	}
	defer func() { stop(); up.Wait() }()
	if err := waitFor(upOut, "Press Ctrl-C", 2*time.Minute); err != nil {
		return fmt.Errorf("basalt up: %w", err)
	}
	basalt := func(args ...string) error {
		cmd := exec.Command(filepath.Join(binDir, "basalt"), args...)
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("basalt %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	if err := basalt("pool", "create", "one", "--replicas", "1"); err != nil {
		return err
	}
	if err := basalt("volume", "create", "r1", "--size", size, "--pool", "one"); err != nil {
		return err
	}
	if err := basalt("volume", "create", "r3", "--size", size); err != nil {
		return err
	}
	bsock := filepath.Join(dir, "basalt", "blockd-1", "nbd.sock")
	if strings.Contains(suites, "checkpoint") {
		fio := func(args ...string) (bench.Result, error) {
			cmd := exec.CommandContext(ctx, "fio", append([]string{"--name=bench", "--output-format=json", "--randrepeat=0", "--norandommap"}, args...)...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				return bench.Result{}, fmt.Errorf("fio %v: %w: %s", args, err, strings.TrimSpace(stderr.String()))
			}
			return bench.ParseFio(bytes.NewReader(out))
		}
		if err := checkpointSuite(ctx, fmt.Sprintf("127.0.0.1:%d", base), filepath.Join(dir, "basalt", "logs"), basalt, fio, bsock, size, runtime); err != nil {
			return fmt.Errorf("checkpoint suite: %w", err)
		}
	}
	if !strings.Contains(suites, "nbd") {
		return nil
	}
	targets := []target{
		{"raw file (O_DIRECT)", []string{"--ioengine=libaio", "--direct=1", "--filename=" + raw}},
		{"qemu-nbd", []string{"--ioengine=nbd", "--uri=nbd+unix:///?socket=" + qsock}},
		{"nbdkit file", []string{"--ioengine=nbd", "--uri=nbd+unix:///?socket=" + ksock}},
		{"Basalt 1 replica", []string{"--ioengine=nbd", "--uri=nbd+unix:///r1?socket=" + bsock}},
		{"Basalt 3 replicas", []string{"--ioengine=nbd", "--uri=nbd+unix:///r3?socket=" + bsock}},
	}
	results := map[string]map[string]bench.Result{}
	var names []string
	for _, t := range targets {
		names = append(names, t.name)
		results[t.name] = map[string]bench.Result{}
		for _, j := range bench.Jobs() {
			args := append([]string{"--name=bench", "--output-format=json", "--rw=" + j.RW, "--bs=" + j.BS,
				fmt.Sprintf("--iodepth=%d", j.IODepth), "--size=" + size, "--randrepeat=0", "--norandommap"}, t.args...)
			// The sequential write is the fill: one pass over the whole target, so that reads find data.
			if j.RW != "write" {
				args = append(args, fmt.Sprintf("--runtime=%ds", int(runtime.Seconds())), "--time_based")
			}
			fmt.Fprintf(os.Stderr, "%s: %s\n", t.name, j.Name)
			var stderr bytes.Buffer
			cmd := exec.CommandContext(ctx, "fio", args...)
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				return fmt.Errorf("fio %s on %s: %w: %s", j.Name, t.name, err, strings.TrimSpace(stderr.String()))
			}
			r, err := bench.ParseFio(bytes.NewReader(out))
			if err != nil {
				return fmt.Errorf("%s on %s: %w", j.Name, t.name, err)
			}
			results[t.name][j.Name] = r
		}
	}
	fmt.Printf("fio %s, %s per timed job, %s per target; ratios are to qemu-nbd.\n\n", fioVersion(), runtime, size)
	fmt.Print(bench.Table(names, results, "qemu-nbd"))
	return nil
}

// background starts a peer server that lives until ctx ends, and waits for its socket.
func background(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	go cmd.Wait()
	var sock string
	for _, a := range args {
		if s, ok := strings.CutPrefix(a, "--socket="); ok {
			sock = s
		}
	}
	for i, a := range args {
		if a == "--unix" && i+1 < len(args) {
			sock = args[i+1]
		}
	}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return nil
		}
	}
	return fmt.Errorf("%s did not open %s", name, sock)
}

func waitFor(r interface{ Read([]byte) (int, error) }, marker string, within time.Duration) error {
	found := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(r)
		ok := false
		for sc.Scan() {
			if !ok && strings.Contains(sc.Text(), marker) {
				ok = true
				found <- true
			}
		}
		if !ok {
			found <- false
		}
	}()
	select {
	case ok := <-found:
		if !ok {
			return fmt.Errorf("exited before %q", marker)
		}
		return nil
	case <-time.After(within):
		return fmt.Errorf("no %q within %s", marker, within)
	}
}

// freeBase finds 100 free ports below Linux's ephemeral range (32768 up), where no outgoing connection can
// take one between this check and the daemons' binds.
func freeBase() (int, error) {
	for base := 22000; base < 32700; base += 100 {
		free := true
		for p := base; p < base+100 && free; p++ {
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
			if err != nil {
				free = false
				continue
			}
			l.Close()
		}
		if free {
			return base, nil
		}
	}
	return 0, fmt.Errorf("no free port range")
}

func fioVersion() string {
	out, err := exec.Command("fio", "--version").Output()
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(out))
}
