// Command agent is the test guest's init process (the initramfs's /init script execs it once the virtio modules
// are loaded). It makes a guest whose continuity can be proved from outside: every interval it writes the next
// record of a counter to the first disk (O_DIRECT|O_DSYNC, so a record is durable before it is announced) and
// then prints it on the serial console; on boot it resumes after the highest valid record on the disk, so the
// sequence continues across reboots, restarts and migrations. It also prints the guest's memory every second
// (to see a balloon change), the block and network devices whenever they change (to see hot-plug), powers off
// on the ACPI power button, and, when asked on the kernel command line, keeps dirtying memory (to load live
// migrations). Formats are in computed/testguest/record. It is built static (CGO_ENABLED=0) and depends on the
// standard library, golang.org/x/sys/unix and the record package.
//
// When the machine has an agent channel (a virtio-serial port named org.basalt.agent.0, which computed gives a
// VM with monitoring.heartbeat), the agent writes "BASALT beat seq=N boot=B" to it every second, the first at
// once, and obeys command lines from the host: "hang" stops the heartbeat and the counter until the next boot
// (a hung guest, for testing VM monitoring) and prints "BASALT hang". It prints "BASALT agent channel=<dev>" or
// "BASALT agent channel=none" (no such port within 30 s: everything else works as without it).
//
// Kernel command line options:
//
//	basalt.disk=/dev/vda     disk for the counter ring
//	basalt.interval=20ms     time between records
//	basalt.memload=0         MiB of memory to keep dirtying (0: off)
//	basalt.memrate=64        MiB per second to dirty in memload mode
//	basalt.ip=ADDR/PREFIX    give eth0 this address and bring it up (off when absent); the kernel then answers
//	                         pings by itself. Printed as "net dev=eth0 addr=ADDR/PREFIX state=up" once done.
//	basalt.gw=ADDR           with basalt.ip: default route through ADDR
package main

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/basalt-hv/basalt/computed/testguest/record"
)

type config struct {
	disk     string
	interval time.Duration
	memLoad  int // MiB
	memRate  int // MiB/s
	ip       netip.Prefix
	gw       netip.Addr
}

// console serialises lines so that goroutines' output never interleaves on the serial port.
type console struct{ mu sync.Mutex }

func (c *console) printf(format string, args ...any) {
	line := record.LinePrefix + fmt.Sprintf(format, args...) + "\n"
	c.mu.Lock()
	os.Stdout.WriteString(line)
	c.mu.Unlock()
}

func main() {
	con := &console{}
	cfg := parseCmdline(con)
	var idb [8]byte
	rand.Read(idb[:])
	boot := binary.LittleEndian.Uint64(idb[:])
	con.printf("boot id=%016x interval=%s memload=%d", boot, cfg.interval, cfg.memLoad)

	go powerButton(con)
	go watchDevices(con)
	go memInfo(con)
	if cfg.memLoad > 0 {
		go memLoad(con, cfg.memLoad, cfg.memRate)
	}
	if cfg.ip.IsValid() {
		go netUp(con, "eth0", cfg.ip, cfg.gw)
	}
	go agentChannel(con, boot)
	counter(con, cfg, boot)
	select {} // init must never exit: the kernel would panic
}

func parseCmdline(con *console) config {
	cfg := config{disk: "/dev/vda", interval: 20 * time.Millisecond, memRate: 64}
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		con.printf("error reading /proc/cmdline: %v", err)
		return cfg
	}
	for _, f := range strings.Fields(string(b)) {
		k, v, _ := strings.Cut(f, "=")
		var err error
		switch k {
		case "basalt.disk":
			cfg.disk = v
		case "basalt.interval":
			cfg.interval, err = time.ParseDuration(v)
		case "basalt.memload":
			cfg.memLoad, err = strconv.Atoi(v)
		case "basalt.memrate":
			cfg.memRate, err = strconv.Atoi(v)
		case "basalt.ip":
			cfg.ip, err = netip.ParsePrefix(v)
		case "basalt.gw":
			cfg.gw, err = netip.ParseAddr(v)
		}
		if err != nil {
			con.printf("error bad option %s: %v", f, err)
		}
	}
	if cfg.interval <= 0 {
		cfg.interval = 20 * time.Millisecond
	}
	return cfg
}

// counter runs the record ring on the disk forever.
func counter(con *console, cfg config, boot uint64) {
	fd, slots, err := openDisk(cfg.disk)
	if err != nil {
		con.printf("error counter disabled: %v", err)
		return
	}
	last, torn, err := scan(fd, slots)
	if err != nil {
		con.printf("error scanning %s: %v", cfg.disk, err)
		return
	}
	con.printf("resume seq=%d slots=%d torn=%d", last, slots, torn)

	buf, err := unix.Mmap(-1, 0, record.Size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		con.printf("error buffer: %v", err)
		return
	}
	tick := time.NewTicker(cfg.interval)
	defer tick.Stop()
	seq := last + 1
	for range tick.C {
		if hung.Load() {
			return // checked before the write: every record written is announced
		}
		r := record.Encode(buf, record.Record{Seq: seq, Time: time.Now(), Boot: boot})
		off := int64(seq%uint64(slots)) * record.Size
		if _, err := unix.Pwrite(fd, buf, off); err != nil {
			// Retry the same record: until a write succeeds, nothing was announced for it.
			con.printf("error write seq=%d: %v", seq, err)
			continue
		}
		con.printf("%s", strings.TrimPrefix(record.Line(r), record.LinePrefix))
		seq++
	}
}

// openDisk waits for the disk to appear (the virtio modules probe asynchronously) and opens it so that every
// write is durable when it returns.
func openDisk(path string) (int, int64, error) {
	deadline := time.Now().Add(60 * time.Second)
	for {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_DSYNC|unix.O_CLOEXEC, 0)
		if err == nil {
			size, err := unix.IoctlGetInt(fd, unix.BLKGETSIZE64)
			if err != nil {
				unix.Close(fd)
				return -1, 0, fmt.Errorf("size of %s: %w", path, err)
			}
			slots := int64(size) / record.Size
			if slots < 2 {
				unix.Close(fd)
				return -1, 0, fmt.Errorf("%s is too small (%d bytes)", path, size)
			}
			return fd, slots, nil
		}
		if !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENXIO) || time.Now().After(deadline) {
			return -1, 0, fmt.Errorf("open %s: %w", path, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// scan reads the whole ring and returns the highest valid sequence number and how many blocks started a
// record but failed their CRC.
func scan(fd int, slots int64) (last uint64, torn int, err error) {
	const chunk = 1 << 20
	buf, err := unix.Mmap(-1, 0, chunk, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return 0, 0, err
	}
	defer unix.Munmap(buf)
	total := slots * record.Size
	for off := int64(0); off < total; off += chunk {
		n := min(int64(chunk), total-off)
		if _, err := unix.Pread(fd, buf[:n], off); err != nil {
			return 0, 0, fmt.Errorf("read at %d: %w", off, err)
		}
		for i := int64(0); i < n; i += record.Size {
			r, err := record.Decode(buf[i : i+record.Size])
			switch {
			case errors.Is(err, record.ErrEmpty):
			case err != nil:
				torn++
			case r.Seq > last:
				last = r.Seq
			}
		}
	}
	return last, torn, nil
}

// netUp waits for dev to appear (virtio_net probes asynchronously), gives it addr, brings it up and adds a
// default route through gw if one is given, with the initramfs's busybox ip.
func netUp(con *console, dev string, addr netip.Prefix, gw netip.Addr) {
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := os.Stat("/sys/class/net/" + dev); err == nil {
			break
		}
		if time.Now().After(deadline) {
			con.printf("error net dev=%s: no such interface", dev)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	cmds := [][]string{
		{"link", "set", "lo", "up"},
		{"addr", "add", addr.String(), "dev", dev},
		{"link", "set", dev, "up"},
	}
	if gw.IsValid() {
		cmds = append(cmds, []string{"route", "add", "default", "via", gw.String(), "dev", dev})
	}
	for _, c := range cmds {
		if out, err := exec.Command("/bin/busybox", append([]string{"ip"}, c...)...).CombinedOutput(); err != nil {
			con.printf("error net %s: ip %s: %v: %s", dev, strings.Join(c, " "), err, strings.TrimSpace(string(out)))
			return
		}
	}
	con.printf("net dev=%s addr=%s state=up", dev, addr)
}

// memInfo prints the guest's memory every second, so that a balloon change shows on the console.
func memInfo(con *console) {
	for {
		b, err := os.ReadFile("/proc/meminfo")
		if err == nil {
			var total, avail string
			for _, l := range strings.Split(string(b), "\n") {
				f := strings.Fields(l)
				if len(f) >= 2 && f[0] == "MemTotal:" {
					total = f[1]
				}
				if len(f) >= 2 && f[0] == "MemAvailable:" {
					avail = f[1]
				}
			}
			con.printf("mem total=%s avail=%s", total, avail)
		}
		time.Sleep(time.Second)
	}
}

// watchDevices prints the block and network devices whenever the set changes (hot-plug).
func watchDevices(con *console) {
	prev := ""
	for {
		var blk, net []string
		if ents, err := os.ReadDir("/sys/block"); err == nil {
			for _, e := range ents {
				if !strings.HasPrefix(e.Name(), "vd") {
					continue
				}
				sz, _ := os.ReadFile(filepath.Join("/sys/block", e.Name(), "size"))
				blk = append(blk, e.Name()+":"+strings.TrimSpace(string(sz)))
			}
		}
		if ents, err := os.ReadDir("/sys/class/net"); err == nil {
			for _, e := range ents {
				if e.Name() == "lo" {
					continue
				}
				mac, _ := os.ReadFile(filepath.Join("/sys/class/net", e.Name(), "address"))
				net = append(net, e.Name()+"/"+strings.TrimSpace(string(mac)))
			}
		}
		sort.Strings(blk)
		sort.Strings(net)
		cur := "blk=" + strings.Join(blk, ",") + " net=" + strings.Join(net, ",")
		if cur != prev {
			con.printf("dev %s", cur)
			prev = cur
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// powerButton powers the guest off when the ACPI power button is pressed (QEMU's system_powerdown): init has
// to, there is no acpid.
func powerButton(con *console) {
	var dev string
	for range 100 {
		ms, _ := filepath.Glob("/sys/class/input/event*/device/name")
		for _, m := range ms {
			if b, _ := os.ReadFile(m); strings.TrimSpace(string(b)) == "Power Button" {
				dev = "/dev/input/" + filepath.Base(filepath.Dir(filepath.Dir(m)))
			}
		}
		if dev != "" {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if dev == "" {
		con.printf("error no power button: Shutdown will not work")
		return
	}
	f, err := os.Open(dev)
	if err != nil {
		con.printf("error power button: %v", err)
		return
	}
	const evKey, keyPower = 1, 116
	var ev [24]byte // struct input_event on amd64: timeval (16), type (2), code (2), value (4)
	for {
		if _, err := f.Read(ev[:]); err != nil {
			con.printf("error power button: %v", err)
			return
		}
		typ := binary.LittleEndian.Uint16(ev[16:])
		code := binary.LittleEndian.Uint16(ev[18:])
		val := int32(binary.LittleEndian.Uint32(ev[20:]))
		if typ == evKey && code == keyPower && val == 1 {
			con.printf("poweroff")
			unix.Sync()
			unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
		}
	}
}

// memLoad keeps mib MiB of memory changing at rate MiB/s, so that a live migration has pages to re-send. Each
// page is half pseudo-random and half zero: compression has work to do but cannot make the data vanish.
func memLoad(con *console, mib, rate int) {
	size := mib << 20
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		con.printf("error memload: %v", err)
		return
	}
	const page = 4096
	pages := size / page
	x := uint64(time.Now().UnixNano()) | 1
	next := func() uint64 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		return x
	}
	for p := 0; p < pages; p++ {
		words := unsafe.Slice((*uint64)(unsafe.Pointer(&mem[p*page])), page/16)
		for i := range words {
			words[i] = next()
		}
	}
	con.printf("load mib=%d rate=%d", mib, rate)
	const step = 10 * time.Millisecond
	perStep := max(1, rate<<20/page/int(time.Second/step))
	p := 0
	t := time.NewTicker(step)
	for range t.C {
		for range perStep {
			// One word per page is enough to make the whole page dirty for migration.
			off := p*page + int(next()%(page/16))*8
			*(*uint64)(unsafe.Pointer(&mem[off])) = next()
			p = (p + 1) % pages
		}
	}
}
