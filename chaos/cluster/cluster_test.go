package cluster_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	nbdclient "github.com/basalt-hv/basalt/blockd/nbd/client"
	"github.com/basalt-hv/basalt/chaos/cluster"
)

// binDir and etcdBin are the programs under test (cluster.TestBinaries); setupErr says why there are none.
var (
	binDir, etcdBin string
	setupErr        error
)

func TestMain(m *testing.M) {
	if setupErr = cluster.Check(); setupErr != nil {
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "bch-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	binDir, etcdBin, setupErr = cluster.TestBinaries(ctx, dir)
	cancel()
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// start starts a cluster for the test and stops it at the end, printing every daemon's log tail on failure.
func start(t *testing.T, o cluster.Options) *cluster.Cluster {
	t.Helper()
	if setupErr != nil {
		t.Skipf("chaos harness unavailable: %v", setupErr)
	}
	o.Dir, o.BinDir, o.EtcdBin = t.TempDir(), binDir, etcdBin
	o.Log = slog.New(slog.NewTextHandler(testWriter{t}, nil))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := cluster.Start(ctx, o)
	if err != nil {
		t.Fatalf("start the chaos cluster: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon logs:\n%s", c.LogTails(25))
		}
		if err := c.Close(); err != nil {
			t.Errorf("close the chaos cluster: %v", err)
		}
	})
	return c
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(b, "\n")))
	return len(b), nil
}

// reach reports whether a TCP connection from namespace ns ("" for the root namespace) to addr succeeds.
func reach(ctx context.Context, ns, addr string) error {
	return cluster.DialFrom(ctx, ns, addr, time.Second)
}

// ping reports whether one ICMP echo from namespace ns to ip is answered (busybox's ping: iputils' is not
// installed on our machines).
func ping(ctx context.Context, ns, ip string) bool {
	return exec.CommandContext(ctx, "ip", "netns", "exec", ns, "busybox", "ping", "-c", "1", "-W", "1", ip).Run() == nil
}

func hostPort(ip string, port int) string { return net.JoinHostPort(ip, strconv.Itoa(port)) }

// waitState waits until every node in ids is in state want as metad reports it.
func waitState(t *testing.T, c *cluster.Cluster, ids []string, want basaltv1.NodeState, within time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		states, err := c.NodeStates(ctx)
		cancel()
		ok := err == nil
		for _, id := range ids {
			ok = ok && states[id] == want
		}
		if ok {
			return
		}
		if time.Since(start) > within {
			t.Fatalf("nodes %v not %s within %s: %v (%v)", ids, want, within, states, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestHarness checks the harness on one 3-host cluster without VMs: every host in its own namespace reaching
// metad and its peers, both kinds of partition cutting a host off (and the cluster seeing it) until healed, a
// full disk on one blockd losing no acknowledged write, and a host kill leaving a 3-replica volume readable
// and writable through the others.
func TestHarness(t *testing.T) {
	c := start(t, cluster.Options{Hosts: 3})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	t.Run("every host reaches metad and its peers", func(t *testing.T) {
		for _, h := range c.Hosts {
			ps, err := h.Procs()
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, p := range ps {
				names = append(names, p.Exe())
			}
			pids := map[int]bool{}
			for _, p := range ps {
				pids[p.PID] = true
			}
			if len(ps) != 2 || !pids[h.Blockd.PID()] || !pids[h.Computed.PID()] {
				t.Fatalf("host %s: processes %v, want its blockd (pid %d) and computed (pid %d)", h.Name, names, h.Blockd.PID(), h.Computed.PID())
			}
			if err := reach(ctx, h.NS, c.Endpoint()); err != nil {
				t.Fatalf("host %s cannot reach metad: %v", h.Name, err)
			}
			for _, p := range c.Hosts {
				if err := reach(ctx, h.NS, hostPort(p.IP.String(), cluster.BlockdPort)); err != nil {
					t.Fatalf("host %s cannot reach %s's blockd: %v", h.Name, p.Name, err)
				}
				if !ping(ctx, h.NS, p.IP.String()) {
					t.Fatalf("host %s cannot ping %s", h.Name, p.Name)
				}
			}
		}
		// A host's daemons listen on its own address only: not on the root namespace's loopback.
		if err := reach(ctx, "", hostPort("127.0.0.1", cluster.BlockdPort)); err == nil {
			t.Fatal("a blockd answers on the root namespace's loopback: it does not run in its namespace")
		}
	})

	for _, mode := range []cluster.PartitionMode{cluster.LinkDown, cluster.Firewall} {
		t.Run("partition by "+mode.String(), func(t *testing.T) {
			h := c.Hosts[2]
			peer := c.Hosts[0]
			t0 := time.Now()
			if err := h.Partition(mode); err != nil {
				t.Fatal(err)
			}
			healed := false
			defer func() {
				if !healed {
					h.Heal()
				}
			}()
			if err := reach(ctx, h.NS, c.Endpoint()); err == nil {
				t.Fatalf("partitioned host %s still reaches metad", h.Name)
			}
			if err := reach(ctx, peer.NS, hostPort(h.IP.String(), cluster.BlockdPort)); err == nil {
				t.Fatalf("%s still reaches partitioned %s", peer.Name, h.Name)
			}
			if err := reach(ctx, "", hostPort(h.IP.String(), cluster.NBDPort)); err == nil {
				t.Fatalf("the root namespace still reaches partitioned %s", h.Name)
			}
			if ping(ctx, h.NS, peer.IP.String()) {
				t.Fatalf("partitioned %s still pings %s", h.Name, peer.Name)
			}
			waitState(t, c, []string{h.Blockd.ID, h.Computed.ID}, basaltv1.NodeState_NODE_STATE_DOWN, 15*time.Second)
			t.Logf("%s cut off by %s: its nodes reported down %s after the cut", h.Name, mode, time.Since(t0).Round(100*time.Millisecond))
			if err := h.Heal(); err != nil {
				t.Fatal(err)
			}
			healed = true
			if err := reach(ctx, h.NS, c.Endpoint()); err != nil {
				t.Fatalf("healed host %s cannot reach metad: %v", h.Name, err)
			}
			if !ping(ctx, h.NS, peer.IP.String()) {
				t.Fatalf("healed %s cannot ping %s", h.Name, peer.Name)
			}
			if err := c.WaitUp(ctx, h.Daemons(), 30*time.Second); err != nil {
				t.Fatalf("after healing: %v", err)
			}
		})
	}

	t.Run("full disk on one blockd loses no acknowledged write", func(t *testing.T) {
		v := newVolume(t, c, "full0")
		w := v.connect(t, c.Hosts[0])
		const blocks = 256
		for b := range int64(blocks) {
			if err := w.write(ctx, b, 1); err != nil {
				t.Fatalf("write before the disk is full: %v", err)
			}
		}
		full := c.Hosts[1]
		n, err := full.FillDisk()
		if err != nil {
			t.Fatal(err)
		}
		defer full.FreeDisk()
		free, _ := full.DiskFree()
		t.Logf("filled %s's disk with %d MiB (%d bytes left)", full.Name, n>>20, free)
		// Overwrite the first half while the disk is full: each write succeeds (through the other replicas) or
		// fails cleanly, within blockd's operation timeout.
		deadline := time.Now().Add(8 * time.Second)
		var ok, failed int
		var firstErr error
		for b := int64(0); b < blocks/2 && time.Now().Before(deadline); b++ {
			if err := w.write(ctx, b, 2); err != nil {
				failed++
				firstErr = cmp(firstErr, err)
				if w.broken() {
					w = v.reconnect(t, w, c.Hosts[0])
				}
				continue
			}
			ok++
		}
		t.Logf("while %s's disk was full: %d writes acknowledged, %d failed (first: %v)", full.Name, ok, failed, firstErr)
		if err := full.FreeDisk(); err != nil {
			t.Fatal(err)
		}
		// Space is back: writes go on (possibly after the node catches up).
		start := time.Now()
		for b := int64(blocks / 4); b < blocks*3/4; b++ {
			for {
				err := w.write(ctx, b, 3)
				if err == nil {
					break
				}
				if time.Since(start) > time.Minute {
					t.Fatalf("writes still fail a minute after the disk was freed: %v", err)
				}
				if w.broken() {
					w = v.reconnect(t, w, c.Hosts[0])
				}
				time.Sleep(200 * time.Millisecond)
			}
		}
		for _, h := range c.Hosts {
			v.verify(t, ctx, h)
		}
	})

	t.Run("host kill leaves a 3-replica volume readable and writable through the others", func(t *testing.T) {
		v := newVolume(t, c, "kill0")
		w := v.connect(t, c.Hosts[0])
		const blocks = 256
		for b := range int64(blocks) {
			if err := w.write(ctx, b, 1); err != nil {
				t.Fatal(err)
			}
		}
		w.conn.Close()
		dead := c.Hosts[0]
		t0 := time.Now()
		if err := dead.Kill(ctx); err != nil {
			t.Fatal(err)
		}
		w2 := v.connect(t, c.Hosts[1])
		for b := int64(0); b < blocks; b += 2 {
			if err := w2.write(ctx, b, 2); err != nil {
				t.Fatalf("write through %s after %s died: %v", c.Hosts[1].Name, dead.Name, err)
			}
			if b == 0 {
				t.Logf("first write through %s acknowledged %s after %s was killed", c.Hosts[1].Name, time.Since(t0).Round(time.Millisecond), dead.Name)
			}
		}
		if d := time.Since(t0); d > 30*time.Second {
			t.Fatalf("writes through the survivors took %s", d)
		}
		v.verify(t, ctx, c.Hosts[2])
		if err := dead.Revive(ctx); err != nil {
			t.Fatal(err)
		}
		v.verify(t, ctx, dead)
	})
}

func cmp(first, err error) error {
	if first != nil {
		return first
	}
	return err
}

// volume is a test volume whose expected content is tracked block by block: for each 4 KiB block, the
// generations a read may return (the last acknowledged one, plus any later write that failed: its data may or
// may not have landed).
type volume struct {
	name string
	may  map[int64][]int
}

const blockSize = 4096

func newVolume(t *testing.T, c *cluster.Cluster, name string) *volume {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Volumes.CreateVolume(ctx, &basaltv1.CreateVolumeRequest{Name: name, SizeBytes: 64 << 20, Replicas: 3}); err != nil {
		t.Fatalf("create volume %s: %v", name, err)
	}
	return &volume{name: name, may: map[int64][]int{}}
}

type writer struct {
	v    *volume
	conn *nbdclient.Conn
	err  error
}

func (v *volume) connect(t *testing.T, h *cluster.Host) *writer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := nbdclient.Dial(ctx, "nbd://"+h.NBDAddr()+"/"+v.name)
	if err != nil {
		t.Fatalf("connect to %s through %s: %v", v.name, h.Name, err)
	}
	t.Cleanup(func() { conn.Close() })
	return &writer{v: v, conn: conn}
}

func (v *volume) reconnect(t *testing.T, w *writer, h *cluster.Host) *writer {
	w.conn.Close()
	return v.connect(t, h)
}

// broken reports whether the last error ended the connection (as opposed to an NBD error reply on it).
func (w *writer) broken() bool {
	var nerr *nbdclient.Error
	return w.err != nil && !errors.As(w.err, &nerr)
}

// block is the content of block b at generation gen: it names both, so a misplaced or stale block shows.
func block(vol string, b int64, gen int) []byte {
	p := make([]byte, blockSize)
	for i := 0; i < blockSize; i += 32 {
		copy(p[i:], vol)
		binary.LittleEndian.PutUint64(p[i+16:], uint64(b))
		binary.LittleEndian.PutUint64(p[i+24:], uint64(gen))
	}
	return p
}

// write writes generation gen of block b with FUA and records the outcome.
func (w *writer) write(ctx context.Context, b int64, gen int) error {
	ctx, cancel := context.WithTimeout(ctx, 70*time.Second)
	defer cancel()
	err := w.conn.WriteAt(ctx, block(w.v.name, b, gen), b*blockSize, true)
	w.err = err
	if err == nil {
		w.v.may[b] = []int{gen}
	} else {
		w.v.may[b] = append(w.v.may[b], gen)
	}
	return err
}

// verify reads every written block through host h and checks it holds an allowed generation.
func (v *volume) verify(t *testing.T, ctx context.Context, h *cluster.Host) {
	t.Helper()
	conn, err := nbdclient.Dial(ctx, "nbd://"+h.NBDAddr()+"/"+v.name)
	if err != nil {
		t.Fatalf("connect to %s through %s: %v", v.name, h.Name, err)
	}
	defer conn.Close()
	buf := make([]byte, blockSize)
	for b, gens := range v.may {
		rctx, cancel := context.WithTimeout(ctx, time.Minute)
		err := conn.ReadAt(rctx, buf, b*blockSize)
		cancel()
		if err != nil {
			t.Fatalf("read block %d of %s through %s: %v", b, v.name, h.Name, err)
		}
		found := false
		for _, g := range gens {
			found = found || bytes.Equal(buf, block(v.name, b, g))
		}
		if !found {
			got := "unrecognised data"
			if bytes.HasPrefix(buf, []byte(v.name)) {
				got = fmt.Sprintf("block %d generation %d", binary.LittleEndian.Uint64(buf[16:]), binary.LittleEndian.Uint64(buf[24:]))
			}
			t.Fatalf("block %d of %s through %s holds %s; acknowledged: generation %d (possible: %v)", b, v.name, h.Name, got, gens[0], gens)
		}
	}
}
