// Package bench measures live migration with the qemu driver: test guests (computed/testguest) that keep a
// share of their memory changing are migrated on loopback, one at a time and several at once, with and without
// compression. For each migration it reports the total time, the downtime as QEMU measured it and as the guest's
// counter shows it from outside (the silence on the serial console across the switchover), and the bytes that
// went over the wire, counted by a relay between the two QEMUs (QEMU 7.2 counts multifd pages uncompressed). It
// also verifies that the guests' counters went on without a gap. It runs real processes (QEMU, qemu-nbd) and
// depends on the qemu driver, the hypervisor seam and the test guest.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/computed/qemu"
	"github.com/basalt-hv/basalt/computed/testguest"
)

// Scenario is one round of migrations.
type Scenario struct {
	// Parallel is how many guests migrate at once.
	Parallel int
	Compress bool
}

func (s Scenario) String() string {
	c := "plain"
	if s.Compress {
		c = "compressed"
	}
	return fmt.Sprintf("%d at once, %s", s.Parallel, c)
}

// Options tune Run; zero values take the defaults in brackets.
type Options struct {
	// MemoryMiB is each guest's memory [512]; LoadMiB how much of it the guest keeps dirtying [256], at
	// DirtyMiBps MiB per second [32].
	MemoryMiB, LoadMiB, DirtyMiBps int
	// Warmup is how long the load runs before the migration starts [5s].
	Warmup time.Duration
	// Scenarios to run [1 plain, 1 compressed, 4 plain, 4 compressed].
	Scenarios []Scenario
	// MaxDowntime and BandwidthBytes go to every migration (0: the driver's defaults).
	MaxDowntime    time.Duration
	BandwidthBytes uint64
	// WorkDir holds disks and run directories [os.TempDir()]; everything Run creates there is removed.
	WorkDir string
	Driver  qemu.Config
	Guest   testguest.Options
	Logger  *slog.Logger
}

// Migration is one guest's migration.
type Migration struct {
	Status hypervisor.MigrationStatus
	// Total is the time Migrate took, from the migrate command to completion.
	Total time.Duration
	// QEMUDowntime is QEMU's measure of the switchover pause.
	QEMUDowntime time.Duration
	// Switchover is the silence on the guest's console across the switchover: from the arrival of the last
	// record the source printed to the first the destination printed (one record interval of it is the
	// counter's own period).
	Switchover time.Duration
	// MaxGap is the longest silence between two records over the whole migration, which includes the vCPU
	// throttling auto-converge applies while memory is copied.
	MaxGap time.Duration
	// WireBytes went from source to destination; QEMUBytes is what QEMU reports as transferred.
	WireBytes, QEMUBytes uint64
	// Problem is set when the guest's counter shows a gap or a bad record across this migration.
	Problem string
}

// Result is one scenario's migrations.
type Result struct {
	Scenario   Scenario
	Migrations []Migration
}

// Report is a whole run.
type Report struct {
	Accel, CPU                  string
	MemoryMiB, LoadMiB, DirtyMB int
	Interval                    time.Duration
	Results                     []Result
}

// Run runs the scenarios one after another. A migration whose guest lost a record (a gap in the counter on
// the console or the disk) does not stop the run: it is reported in its Migration.Problem, and Run then
// returns the report with an error.
func Run(ctx context.Context, opts Options) (Report, error) {
	if opts.MemoryMiB == 0 {
		opts.MemoryMiB = 512
	}
	if opts.LoadMiB == 0 {
		opts.LoadMiB = 256
	}
	if opts.DirtyMiBps == 0 {
		opts.DirtyMiBps = 32
	}
	if opts.Warmup == 0 {
		opts.Warmup = 5 * time.Second
	}
	if len(opts.Scenarios) == 0 {
		opts.Scenarios = []Scenario{{1, false}, {1, true}, {4, false}, {4, true}}
	}
	if opts.WorkDir == "" {
		opts.WorkDir = os.TempDir()
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Driver.Logger == nil {
		opts.Driver.Logger = opts.Logger
	}
	if opts.Guest.Logger == nil {
		opts.Guest.Logger = opts.Logger
	}
	for _, tool := range []string{"qemu-nbd", "qemu-img"} {
		if _, err := exec.LookPath(tool); err != nil {
			return Report{}, fmt.Errorf("bench: %s not installed (Debian package qemu-utils)", tool)
		}
	}
	g, err := testguest.Build(ctx, opts.Guest)
	if err != nil {
		return Report{}, err
	}
	d, err := qemu.New(opts.Driver)
	if err != nil {
		return Report{}, err
	}
	accel, err := d.Accel(ctx)
	if err != nil {
		return Report{}, err
	}
	rep := Report{Accel: accel.Accel, CPU: accel.CPU, MemoryMiB: opts.MemoryMiB, LoadMiB: opts.LoadMiB,
		DirtyMB: opts.DirtyMiBps, Interval: 20 * time.Millisecond}
	for _, sc := range opts.Scenarios {
		opts.Logger.Info("migration benchmark", "scenario", sc.String())
		r, err := runScenario(ctx, d, g, opts, sc)
		if err != nil {
			return rep, fmt.Errorf("bench: %s: %w", sc, err)
		}
		rep.Results = append(rep.Results, r)
	}
	var problems []error
	for _, r := range rep.Results {
		for i, m := range r.Migrations {
			if m.Problem != "" {
				problems = append(problems, fmt.Errorf("%s, guest %d: %s", r.Scenario, i, m.Problem))
			}
		}
	}
	if len(problems) > 0 {
		return rep, fmt.Errorf("bench: guests lost continuity: %w", errors.Join(problems...))
	}
	return rep, nil
}

// vm is one guest of a scenario and everything it holds.
type vm struct {
	spec     hypervisor.Spec
	img      string
	src, dst hypervisor.Machine
	conSrc   *testguest.Console
	conDst   *testguest.Console
	relay    *relay
	uri      string
	start    time.Time // of the migration
	result   Migration
	err      error
}

func runScenario(ctx context.Context, d *qemu.Driver, g testguest.Guest, opts Options, sc Scenario) (res Result, err error) {
	res.Scenario = sc
	dir, err := os.MkdirTemp(opts.WorkDir, "migbench")
	if err != nil {
		return res, err
	}
	var cleanups []func()
	defer func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
		os.RemoveAll(dir)
	}()
	kill := func(m hypervisor.Machine) func() {
		return func() {
			kctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			m.Kill(kctx)
			m.Close()
		}
	}

	vms := make([]*vm, sc.Parallel)
	for i := range vms {
		v := &vm{}
		vms[i] = v
		vdir := filepath.Join(dir, fmt.Sprintf("vm%d", i))
		if err := os.Mkdir(vdir, 0o755); err != nil {
			return res, err
		}
		disk, img, stop, err := serveDisk(ctx, vdir, 64<<20)
		if err != nil {
			return res, err
		}
		cleanups = append(cleanups, stop)
		v.img = img
		v.spec = hypervisor.Spec{
			ID: fmt.Sprintf("migbench%d", i), VCPUs: 1, Memory: uint64(opts.MemoryMiB) << 20,
			Disks: []hypervisor.Disk{disk}, Firmware: hypervisor.FirmwareDirectKernel,
			Kernel: g.Kernel, Initrd: g.Initrd, RunDir: filepath.Join(vdir, "src"),
			Cmdline: g.Cmdline(fmt.Sprintf("basalt.memload=%d", opts.LoadMiB), fmt.Sprintf("basalt.memrate=%d", opts.DirtyMiBps)),
		}
		if v.src, err = d.Start(ctx, v.spec); err != nil {
			return res, err
		}
		cleanups = append(cleanups, kill(v.src))
		c, err := v.src.Console(ctx)
		if err != nil {
			return res, err
		}
		cleanups = append(cleanups, func() { c.Close() })
		v.conSrc = testguest.WatchConsole(c)
	}
	for _, v := range vms {
		wctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
		_, _, err := v.conSrc.Wait(wctx, 0, func(l testguest.Line) bool { return strings.Contains(l.Text, "BASALT load ") })
		cancel()
		if err != nil {
			return res, fmt.Errorf("guest %s never started its memory load: %w\n%s", v.spec.ID, err, v.conSrc.Tail(10))
		}
	}
	select {
	case <-time.After(opts.Warmup):
	case <-ctx.Done():
		return res, ctx.Err()
	}

	mopts := hypervisor.MigrateOptions{Compress: sc.Compress, MaxDowntime: opts.MaxDowntime, BandwidthBytes: opts.BandwidthBytes}
	for i, v := range vms {
		dspec := v.spec
		dspec.RunDir = filepath.Join(dir, fmt.Sprintf("vm%d", i), "dst")
		var uri string
		if v.dst, uri, err = d.StartIncomingWith(ctx, dspec, "127.0.0.1", mopts); err != nil {
			return res, err
		}
		cleanups = append(cleanups, kill(v.dst))
		c, err := v.dst.Console(ctx)
		if err != nil {
			return res, err
		}
		cleanups = append(cleanups, func() { c.Close() })
		v.conDst = testguest.WatchConsole(c)
		if v.relay, v.uri, err = newRelay(uri); err != nil {
			return res, err
		}
		cleanups = append(cleanups, v.relay.close)
	}

	var wg sync.WaitGroup
	for _, v := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v.start = time.Now()
			st, err := v.src.Migrate(ctx, v.uri, mopts, nil)
			v.result = Migration{Status: st, Total: time.Since(v.start), QEMUDowntime: st.Downtime, QEMUBytes: st.TransferredBytes}
			v.err = err
		}()
	}
	wg.Wait()
	for _, v := range vms {
		if v.err != nil {
			return res, fmt.Errorf("migrate %s: %w", v.spec.ID, v.err)
		}
	}

	// Let each guest count on at the destination, then read the counters.
	for _, v := range vms {
		last, _ := v.conSrc.LastRecord()
		wctx, cancel := context.WithTimeout(ctx, time.Minute)
		_, err := v.conDst.WaitRecord(wctx, last.Seq+25)
		cancel()
		if err != nil {
			return res, fmt.Errorf("guest %s did not go on after the migration: %w", v.spec.ID, err)
		}
		v.src.Kill(ctx)
		v.dst.Kill(ctx)
		<-v.conSrc.Done()
		<-v.conDst.Done()
		v.relay.close()
		v.result.WireBytes = v.relay.bytes.Load()
		if err := v.measure(); err != nil {
			v.result.Problem = err.Error()
		}
		res.Migrations = append(res.Migrations, v.result)
	}
	return res, nil
}

// measure reads the guest's counter across the migration from both consoles and the disk, and fails on any
// gap.
func (v *vm) measure() error {
	srcRecs, err := testguest.Records(v.conSrc.Lines())
	if err != nil {
		return err
	}
	recs, err := testguest.Records(testguest.Join(v.conSrc, v.conDst))
	if err != nil {
		return err
	}
	cont, err := testguest.CheckContinuity(recs)
	if err != nil {
		return fmt.Errorf("console: %w", err)
	}
	v.result.MaxGap = cont.MaxHostGap
	if len(srcRecs) == 0 {
		return errors.New("no records from the source")
	}
	lastSrc := srcRecs[len(srcRecs)-1]
	for i, r := range recs {
		if r.Seq == lastSrc.Seq && i+1 < len(recs) {
			// A stall of the guest before the migration began (the host is shared) is not the migration's.
			from := r.At
			if from.Before(v.start) {
				from = v.start
			}
			v.result.Switchover = recs[i+1].At.Sub(from)
		}
	}
	f, err := os.Open(v.img)
	if err != nil {
		return err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return err
	}
	s, err := testguest.VerifyDisk(f, info.Size())
	if err != nil {
		return fmt.Errorf("disk: %w", err)
	}
	return s.CheckAnnounced(recs)
}

// serveDisk serves a fresh raw image with qemu-nbd on a Unix socket (several connections: both QEMUs of a
// migration attach).
func serveDisk(ctx context.Context, dir string, size int64) (hypervisor.Disk, string, func(), error) {
	img := filepath.Join(dir, "disk.img")
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-f", "raw", img, fmt.Sprint(size)).CombinedOutput(); err != nil {
		return hypervisor.Disk{}, "", nil, fmt.Errorf("qemu-img: %v: %s", err, out)
	}
	sock := filepath.Join(dir, "nbd.sock")
	cmd := exec.Command("qemu-nbd", "--persistent", "--shared=8", "--socket="+sock, "--format=raw", "--export-name=vol", img)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return hypervisor.Disk{}, "", nil, fmt.Errorf("start qemu-nbd: %w", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stop := func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case <-exited:
			return hypervisor.Disk{}, "", nil, errors.New("qemu-nbd exited at start")
		default:
		}
		if time.Now().After(deadline) {
			stop()
			return hypervisor.Disk{}, "", nil, errors.New("qemu-nbd did not create its socket")
		}
	}
	return hypervisor.Disk{ID: "root", NBDSocket: sock, Export: "vol", BootIndex: 1}, img, stop, nil
}

// relay forwards a migration's connections (the main stream, multifd channels, the return path) from a
// loopback port to the destination and counts the bytes going to it. The copy is spliced in the kernel, so it
// costs little CPU next to the QEMUs.
type relay struct {
	ln     net.Listener
	target string
	bytes  atomic.Uint64
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []net.Conn
	once   sync.Once
}

// newRelay listens on loopback for uri's destination and returns the URI that goes through the relay.
func newRelay(uri string) (*relay, string, error) {
	target, frag, _ := strings.Cut(uri, "#")
	hostport, ok := strings.CutPrefix(target, "tcp:")
	if !ok {
		return nil, "", fmt.Errorf("relay: %s is not a tcp URI", uri)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, "", err
	}
	r := &relay{ln: ln, target: hostport}
	r.wg.Add(1)
	go r.accept()
	out := "tcp:" + ln.Addr().String()
	if frag != "" {
		out += "#" + frag
	}
	return r, out, nil
}

func (r *relay) accept() {
	defer r.wg.Done()
	for {
		in, err := r.ln.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", r.target)
		if err != nil {
			in.Close()
			continue
		}
		r.mu.Lock()
		r.conns = append(r.conns, in, out)
		r.mu.Unlock()
		r.wg.Add(2)
		go func() {
			defer r.wg.Done()
			n, _ := io.Copy(out, in)
			r.bytes.Add(uint64(n))
			out.(*net.TCPConn).CloseWrite()
		}()
		go func() {
			defer r.wg.Done()
			io.Copy(in, out) // the return path
			in.(*net.TCPConn).CloseWrite()
		}()
	}
}

// close stops the relay and waits for its copies to end.
func (r *relay) close() {
	r.once.Do(func() {
		r.ln.Close()
		r.mu.Lock()
		for _, c := range r.conns {
			c.Close()
		}
		r.mu.Unlock()
		r.wg.Wait()
	})
}

// Table renders a report as Markdown.
func Table(rep Report) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Live migration on loopback, accelerator %s (-cpu %s): guests of %d MiB dirtying %d MiB at %d MiB/s; "+
		"the guest counter ticks every %s. Times are mean / max over the migrations of a row.\n\n",
		rep.Accel, rep.CPU, rep.MemoryMiB, rep.LoadMiB, rep.DirtyMB, rep.Interval)
	b.WriteString("| scenario | total time | downtime (QEMU) | switchover silence (guest) | longest silence | MiB on the wire | MiB QEMU counted |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range rep.Results {
		var total, down, sw, gap []time.Duration
		var wire, counted []float64
		for _, m := range r.Migrations {
			total = append(total, m.Total)
			down = append(down, m.QEMUDowntime)
			sw = append(sw, m.Switchover)
			gap = append(gap, m.MaxGap)
			wire = append(wire, float64(m.WireBytes)/(1<<20))
			counted = append(counted, float64(m.QEMUBytes)/(1<<20))
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s |\n", r.Scenario, durs(total), durs(down), durs(sw), durs(gap),
			nums(wire), nums(counted))
	}
	for _, r := range rep.Results {
		for i, m := range r.Migrations {
			if m.Problem != "" {
				fmt.Fprintf(&b, "\n**%s, guest %d lost continuity:** %s\n", r.Scenario, i, m.Problem)
			}
		}
	}
	return b.String()
}

func durs(ds []time.Duration) string {
	if len(ds) == 0 {
		return "-"
	}
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	sorted := append([]time.Duration(nil), ds...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	round := func(d time.Duration) time.Duration {
		if d >= 10*time.Second {
			return d.Round(100 * time.Millisecond)
		}
		return d.Round(time.Millisecond)
	}
	return fmt.Sprintf("%s / %s", round(sum/time.Duration(len(ds))), round(sorted[len(sorted)-1]))
}

func nums(xs []float64) string {
	if len(xs) == 0 {
		return "-"
	}
	var sum, mx float64
	for _, x := range xs {
		sum += x
		mx = max(mx, x)
	}
	return fmt.Sprintf("%.0f / %.0f", sum/float64(len(xs)), mx)
}
