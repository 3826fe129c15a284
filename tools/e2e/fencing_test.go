package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os/exec"
	"strings"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/internal/blockrpc"
	"github.com/basalt-hv/basalt/internal/node"
	"github.com/basalt-hv/basalt/metad/attach"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// qemuIOFails runs one qemu-io command that must fail, with output mentioning want.
func qemuIOFails(t *testing.T, uri, command, want string) {
	t.Helper()
	out, err := exec.Command("qemu-io", "-f", "raw", "-c", command, uri).CombinedOutput()
	if !strings.Contains(string(out), want) {
		t.Fatalf("qemu-io %s %q: %v\n%s\nwant a failure mentioning %q", uri, command, err, out, want)
	}
}

// runOK and runFails send one command to a held-open qemu-io session (one NBD connection, kept across the
// attachment changes) and check the outcome.
func runOK(t *testing.T, q *qemuIO, command string) {
	t.Helper()
	line, err := q.run(command)
	if err != nil || !(strings.HasPrefix(line, "wrote ") || strings.HasPrefix(line, "read ")) {
		t.Fatalf("held-open session, %s: %q %v", command, line, err)
	}
}

func runFails(t *testing.T, q *qemuIO, command, want string) {
	t.Helper()
	line, err := q.run(command)
	if err != nil || !strings.Contains(line, want) {
		t.Fatalf("held-open session, %s: %q %v; want a failure mentioning %q", command, line, err, want)
	}
}

const eperm = "Operation not permitted"

// TestFencingThroughNBD: attachments with generations, enforced by the storage nodes on real NBD sessions
// (qemu-io through three different gateways). An attached volume accepts writes only from its attachment's
// generation; a fence, a takeover and a migration's switchover each cut off the previous holder's sessions —
// including one held open across the change, which is the real fencing case — with EPERM, while reads go on
// and the data written before stays. A generation a gateway sees before its node's view does (view lag) is
// decided once the view catches up.
func TestFencingThroughNBD(t *testing.T) {
	needTool(t, "qemu-io", "qemu-utils")
	e := newEnv(t)
	base := freeBase(t, 3)
	c := e.up(t.TempDir(), "--base-port", itoa(base), "--lease-ttl", "2s")
	e.waitNodes("every node up", 10*time.Second, allUp(fullCluster...))
	basalt := func(args ...string) string {
		t.Helper()
		out, errOut, code := e.basalt(nil, args...)
		if code != 0 {
			t.Fatalf("basalt %s: %s", strings.Join(args, " "), errOut)
		}
		return out
	}
	conn, err := grpc.NewClient(c.state(t).Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	api := basaltv1.NewAttachmentServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	attach := func(host string) uint64 {
		t.Helper()
		a, err := api.Attach(ctx, &basaltv1.AttachRequest{Volume: "fv", Host: host})
		if err != nil {
			t.Fatalf("attach fv to %s: %v", host, err)
		}
		return a.GetGeneration()
	}
	// uri is the export of the volume opened with generation gen (0: plain) through blockd-n's gateway. The
	// '?' of the export name is escaped, or it would start the URI's query.
	uri := func(n int, gen uint64) string {
		return fmt.Sprintf("nbd://127.0.0.1:%d/%s", base+10*n+1, url.PathEscape(basaltv1.AttachedExport("fv", gen)))
	}

	basalt("volume", "create", "fv", "--size", "64M")
	// Unattached: a plain client writes as it always did.
	qemuIOAll(t, uri(1, 0), false, "write -P 1 0 64M")

	g1 := attach("h1")
	qemuIOAll(t, uri(1, g1), false, "write -P 2 0 4M")
	// A stray client without the generation cannot scribble on an attached disk, but it can read.
	qemuIOFails(t, uri(2, 0), "write -P 9 0 4k", eperm)
	qemuIOAll(t, uri(2, 0), true, "read -P 2 0 4M", "read -P 1 4M 60M")
	// A checkpoint export is read-only: a generation on it is refused, saying why.
	basalt("checkpoint", "create", "c1", "fv")
	qemuIOFails(t, fmt.Sprintf("nbd://127.0.0.1:%d/%s", base+11, url.PathEscape("fv@c1?generation=1")), "read 0 4k", "read-only")

	// h1 keeps a session open, writing, across its fence.
	s1 := startQemuIO(t, uri(1, g1))
	runOK(t, s1, "write -P 3 4M 1M")
	out := basalt("host", "fence", "h1")
	if !strings.Contains(out, "volumes fv") {
		t.Fatalf("basalt host fence h1: %s", out)
	}
	t.Logf("%s", strings.TrimSpace(out))
	runFails(t, s1, "write -P 9 4M 1M", eperm)
	runFails(t, s1, "write -P 9 32M 4k", eperm)
	runOK(t, s1, "read -P 3 4M 1M") // reads are never refused
	// A new session of the fenced generation fares no better; what it wrote before the fence is intact.
	qemuIOFails(t, uri(3, g1), "write -P 9 0 4k", eperm)
	qemuIOAll(t, uri(3, g1), true, "read -P 2 0 4M", "read -P 3 4M 1M", "read -P 1 5M 59M")

	// The VM restarts on h2: a newer generation, which writes.
	g2 := attach("h2")
	if g2 <= g1 {
		t.Fatalf("generation after the fence %d, not above %d", g2, g1)
	}
	s2 := startQemuIO(t, uri(2, g2))
	runOK(t, s2, "write -P 4 8M 1M")
	runFails(t, s1, "write -P 9 8M 4k", eperm)

	// Live migration to h3: its attachment is incoming (no writes) until the switchover; h2 writes meanwhile.
	in, err := api.ListAttachments(ctx, &basaltv1.ListAttachmentsRequest{Volume: "fv"})
	if err != nil || len(in.GetAttachments()) != 1 || in.GetAttachments()[0].GetHost() != "h2" {
		t.Fatalf("attachments before the migration: %v, %v", in, err)
	}
	g3 := prepareIncoming(t, ctx, c, "h3")
	qemuIOFails(t, uri(3, g3), "write -P 9 0 4k", eperm)
	runOK(t, s2, "write -P 5 9M 1M")
	switchover(t, ctx, c, "h3")
	qemuIOAll(t, uri(3, g3), false, "write -P 6 10M 1M")
	runFails(t, s2, "write -P 9 9M 4k", eperm) // the source's held-open session is cut off
	var listed struct {
		Attachments []struct {
			Host       string      `json:"host"`
			Generation json.Number `json:"generation"`
		} `json:"attachments"`
	}
	if err := json.Unmarshal([]byte(basalt("volume", "attachments", "fv", "-o", "json")), &listed); err != nil {
		t.Fatal(err)
	}
	if len(listed.Attachments) != 1 || listed.Attachments[0].Host != "h3" || num(listed.Attachments[0].Generation) != int64(g3) {
		t.Fatalf("basalt volume attachments fv after the switchover: %+v, want h3 at %d", listed, g3)
	}

	// Detached: plain clients write again, the last holder's generation does not.
	if _, err := api.Detach(ctx, &basaltv1.DetachRequest{Volume: "fv", Host: "h3"}); err != nil {
		t.Fatal(err)
	}
	qemuIOAll(t, uri(1, 0), false, "write -P 7 11M 1M")
	qemuIOFails(t, uri(1, g3), "write -P 9 0 4k", eperm)

	// View lag: a session with a generation not issued yet (as a gateway whose node saw an attach before the
	// primary did) is not refused; its write waits and lands once the generation exists.
	next := g3 + 1
	lagged := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 8 12M 1M", uri(2, next))
	lagOut := make(chan string, 1)
	go func() { b, _ := lagged.CombinedOutput(); lagOut <- string(b) }()
	select {
	case o := <-lagOut:
		t.Fatalf("a write with generation %d returned before it was issued:\n%s", next, o)
	case <-time.After(2 * time.Second):
	}
	if g := attach("h4"); g != next {
		t.Fatalf("next attach got generation %d, want %d", g, next)
	}
	select {
	case o := <-lagOut:
		if !strings.Contains(o, "wrote 1048576/1048576") {
			t.Fatalf("the waiting write once its generation was issued:\n%s", o)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the waiting write was not decided once its generation was issued")
	}

	// Everything acknowledged is there, nothing refused is.
	if err := s1.close(30 * time.Second); err == nil {
		t.Log("the fenced session closed cleanly")
	}
	s2.close(30 * time.Second)
	qemuIOAll(t, uri(1, 0), true, "read -P 2 0 4M", "read -P 3 4M 1M", "read -P 1 5M 3M", "read -P 4 8M 1M",
		"read -P 5 9M 1M", "read -P 6 10M 1M", "read -P 7 11M 1M", "read -P 8 12M 1M", "read -P 1 13M 51M")
	// The checkpoint taken while attached kept its content.
	qemuIOAll(t, fmt.Sprintf("nbd://127.0.0.1:%d/fv@c1", base+21), true, "read -P 2 0 4M", "read -P 1 4M 60M")
}

// prepareIncoming and switchover are a migration's steps. AttachmentService does not expose them (computed's
// migration calls metad/attach itself), so the test takes them through a metad/attach client of the cluster's
// etcd and blockds, as computed does.
func prepareIncoming(t *testing.T, ctx context.Context, c *cluster, host string) uint64 {
	t.Helper()
	a, err := attachClient(t, c).PrepareIncoming(ctx, "fv", host, true)
	if err != nil {
		t.Fatalf("prepare fv for %s: %v", host, err)
	}
	if !a.GetIncoming() {
		t.Fatalf("prepared %v, want incoming", a)
	}
	return a.GetGeneration()
}

func switchover(t *testing.T, ctx context.Context, c *cluster, host string) {
	t.Helper()
	cl := attachClient(t, c)
	if err := cl.Switchover(ctx, []string{"fv"}, host); err != nil {
		t.Fatalf("switch fv over to %s: %v", host, err)
	}
	// Idempotent.
	if err := cl.Switchover(ctx, []string{"fv"}, host); err != nil {
		t.Fatalf("second switchover: %v", err)
	}
}

// attachClient is a metad/attach client on the cluster's etcd, reaching its blockds for the barrier.
func attachClient(t *testing.T, c *cluster) *attach.Client {
	t.Helper()
	etcd, err := node.Dial(context.Background(), []string{c.state(t).EtcdURL}, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { etcd.Close() })
	peers := blockrpc.NewPeers()
	t.Cleanup(peers.Close)
	return &attach.Client{Store: store.New(etcd), Peers: peers}
}
