package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// qemuIO is an interactive qemu-io session on one NBD export: one connection, commands one at a time.
type qemuIO struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

func needTool(t *testing.T, name, pkg string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("%s not installed (Debian package %s; make test installs it)", name, pkg)
	}
}

func startQemuIO(t *testing.T, uri string) *qemuIO {
	t.Helper()
	cmd := exec.Command("qemu-io", "-f", "raw", uri)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close(); cmd.Process.Kill() })
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	return &qemuIO{cmd: cmd, in: in, out: sc}
}

// run sends one command and returns its first meaningful output line: qemu-io answers every write or read
// with "wrote ..."/"read ..." or a line naming the failure.
func (q *qemuIO) run(command string) (string, error) {
	if _, err := fmt.Fprintln(q.in, command); err != nil {
		return "", err
	}
	for q.out.Scan() {
		l := strings.TrimSpace(strings.TrimPrefix(q.out.Text(), "qemu-io> "))
		switch {
		case l == "", strings.Contains(l, "ops;"):
			continue
		}
		return l, nil
	}
	return "", fmt.Errorf("qemu-io exited: %v", q.out.Err())
}

// close ends the session: qemu-io flushes the export on exit.
func (q *qemuIO) close(within time.Duration) error {
	q.in.Close()
	for q.out.Scan() {
	}
	done := make(chan error, 1)
	go func() { done <- q.cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(within):
		q.cmd.Process.Kill()
		return fmt.Errorf("still running after %s", within)
	}
}

// blockService dials a blockd's BlockService.
func blockService(t *testing.T, addr string) basaltv1.BlockServiceClient {
	t.Helper()
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return basaltv1.NewBlockServiceClient(c)
}

// TestReplicatedWritesSurviveKills writes distinct patterns through one gateway while a replica and then a
// primary are SIGKILLed and restarted, then proves every acknowledged write reads back (through two gateways)
// and that all replicas converge to identical content.
func TestReplicatedWritesSurviveKills(t *testing.T) {
	if testing.Short() {
		t.Skip("kills and restarts nodes; slow")
	}
	needTool(t, "qemu-io", "qemu-utils")
	e := newEnv(t)
	base := freeBase(t, 3)
	c := e.up(t.TempDir(), "--base-port", itoa(base), "--lease-ttl", "2s", "--restart-delay", "3s")
	e.waitNodes("every node up", 10*time.Second, allUp(fullCluster...))
	if _, errOut, code := e.basalt(nil, "volume", "create", "data", "--size", "64M"); code != 0 {
		t.Fatalf("volume create: %s", errOut)
	}
	st := c.state(t)
	nbdURI := func(node string) string {
		for i, p := range st.Processes {
			if p.ID == node {
				return fmt.Sprintf("nbd://127.0.0.1:%d/data", base+10*i+1)
			}
		}
		t.Fatalf("no %s", node)
		return ""
	}

	// 64 KiB regions, each written once with its own pattern, so every acknowledged write is checkable.
	const region = 64 << 10
	const regions = (64 << 20) / region
	q := startQemuIO(t, nbdURI("blockd-1"))
	acked := map[int]int{}
	write := func(i int) {
		t.Helper()
		pattern := i%250 + 1
		flag := ""
		if i%7 == 0 {
			flag = "-f " // FUA
		}
		line, err := q.run(fmt.Sprintf("write %s-P %d %d %d", flag, pattern, i*region, region))
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(line, "wrote ") {
			acked[i] = pattern
		} else {
			t.Logf("write %d not acknowledged: %s", i, line)
		}
	}
	kill := func(node string) {
		t.Helper()
		if err := syscall.Kill(c.pid(t, node), syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		t.Logf("SIGKILL %s", node)
	}
	start := time.Now()
	for i := range regions {
		switch i {
		case regions / 4:
			kill("blockd-3") // a replica (and primary of some PGs) dies mid-stream
		case regions/4 + 8:
			// While blockd-3 is down, discard the first object whole: when it returns it must not bring the
			// old data back (a trim is a versioned write like any other).
			line, err := q.run(fmt.Sprintf("discard 0 %d", 4<<20))
			if err != nil || !strings.HasPrefix(line, "discard ") {
				t.Fatalf("discard: %s %v", line, err)
			}
			for r := range (4 << 20) / region {
				acked[r] = 0
			}
		case regions / 2:
			e.waitNodes("blockd-3 back", 30*time.Second, allUp(fullCluster...))
			kill("blockd-2") // then a primary of other PGs
		case 3 * regions / 4:
			e.waitNodes("blockd-2 back", 30*time.Second, allUp(fullCluster...))
		}
		write(i)
	}
	// Closing qemu-io's input makes it flush the export and exit; a clean exit is the flush's acknowledgement.
	if err := q.close(60 * time.Second); err != nil {
		t.Fatalf("qemu-io did not flush and exit cleanly: %v", err)
	}
	t.Logf("%d of %d writes acknowledged in %s across two kills", len(acked), regions, time.Since(start).Round(time.Millisecond))
	if len(acked) < regions*9/10 {
		t.Fatalf("only %d of %d writes were acknowledged", len(acked), regions)
	}

	// Every acknowledged write reads back, through the same gateway and through another one.
	for _, gw := range []string{"blockd-1", "blockd-3"} {
		r := startQemuIO(t, nbdURI(gw))
		for i, pattern := range acked {
			line, err := r.run(fmt.Sprintf("read -P %d %d %d", pattern, i*region, region))
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(line, "read ") {
				t.Fatalf("via %s: region %d (pattern %d) does not read back: %s", gw, i, pattern, line)
			}
		}
	}

	// Replicas converge: every member of every PG holds the same objects with the same content.
	clients := map[string]basaltv1.BlockServiceClient{}
	for _, p := range st.Processes {
		if p.Kind == "blockd" {
			clients[p.ID] = blockService(t, p.GRPC)
		}
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		diff, objects, err := divergence(clients)
		if err == nil && diff == "" {
			// 16 objects of the 64 MiB volume were written and the first was discarded whole; an empty
			// listing would agree vacuously.
			if objects != 15 {
				t.Fatalf("replicas agree on %d objects with data, want 15", objects)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replicas did not converge within 60s: %v %s", err, diff)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// divergence compares, PG by PG of the default pool, the objects and checksums each node holds. With three
// nodes and three replicas every node is a member of every PG, so all three must agree exactly.
func divergence(clients map[string]basaltv1.BlockServiceClient) (diff string, objects int, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for pg := range uint32(64) {
		var ref []byte
		var refNode string
		for id, c := range clients {
			resp, err := c.PGObjects(ctx, &basaltv1.PGObjectsRequest{Pool: 1, Pg: pg, Checksums: true})
			if err != nil {
				return "", 0, fmt.Errorf("%s: %w", id, err)
			}
			var b bytes.Buffer
			n := 0
			for _, o := range resp.GetObjects() {
				if o.GetEmpty() {
					continue // trimmed whole: the same as never written
				}
				n++
				fmt.Fprintf(&b, "%d.%d=%x;", o.GetObject().GetVolume(), o.GetObject().GetIndex(), o.GetChecksum())
			}
			if ref == nil {
				ref, refNode = b.Bytes(), id
				objects += n
			} else if !bytes.Equal(ref, b.Bytes()) {
				return fmt.Sprintf("PG 1.%d: %s has %s, %s has %s", pg, refNode, ref, id, b.Bytes()), 0, nil
			}
		}
	}
	return "", objects, nil
}
