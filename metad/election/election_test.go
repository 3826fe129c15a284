package election_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/internal/node"
	"github.com/basalt-hv/basalt/metad/election"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
)

const ttl = 2 * time.Second

// TestMain doubles as the candidate process: with BASALT_ELECTION_CANDIDATE set, the test binary campaigns,
// prints "LEADER <id>" when it wins, and blocks until it is killed.
func TestMain(m *testing.M) {
	if id := os.Getenv("BASALT_ELECTION_CANDIDATE"); id != "" {
		os.Exit(candidate(id, os.Getenv("BASALT_ELECTION_ETCD")))
	}
	os.Exit(m.Run())
}

func candidate(id, endpoint string) int {
	ctx := context.Background()
	c, err := node.Dial(ctx, []string{endpoint}, 10*time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("CAMPAIGNING", id)
	l, err := election.Campaign(ctx, c, "test", id, ttl)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("LEADER", id)
	<-l.Done()
	fmt.Println("LOST", id)
	return 0
}

// startCandidate runs a candidate process and returns a channel of its output lines.
func startCandidate(t *testing.T, id, endpoint string) (*exec.Cmd, <-chan string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "BASALT_ELECTION_CANDIDATE="+id, "BASALT_ELECTION_ETCD="+endpoint)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	return cmd, lines
}

func expectLine(t *testing.T, lines <-chan string, want string, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	timeout := time.After(within)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("candidate exited before printing %q", want)
			}
			if l == want {
				return time.Since(start)
			}
		case <-timeout:
			t.Fatalf("no %q within %s", want, within)
		}
	}
}

func TestHandOverWhenTheLeaderProcessIsKilled(t *testing.T) {
	e := etcdtest.Start(t, "")
	c := e.Client(t)
	ep := e.Endpoints()[0]

	a, aLines := startCandidate(t, "a", ep)
	expectLine(t, aLines, "LEADER a", 15*time.Second)
	_, bLines := startCandidate(t, "b", ep)
	expectLine(t, bLines, "CAMPAIGNING b", 15*time.Second)
	// b must be waiting, not leading, while a lives.
	select {
	case l := <-bLines:
		t.Fatalf("b printed %q while a leads", l)
	case <-time.After(ttl + time.Second):
	}
	if l, err := election.Leader(context.Background(), c, "test"); err != nil || l != "a" {
		t.Fatalf("Leader = %q, %v; want a", l, err)
	}

	if err := a.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	took := expectLine(t, bLines, "LEADER b", ttl+5*time.Second)
	t.Logf("b took over %s after a was killed (session TTL %s)", took, ttl)
	if l, err := election.Leader(context.Background(), c, "test"); err != nil || l != "b" {
		t.Fatalf("Leader = %q, %v; want b", l, err)
	}
}

func TestResignHandsOverAtOnce(t *testing.T) {
	ctx := context.Background()
	e := etcdtest.Start(t, "")
	c1, c2 := e.Client(t), e.Client(t)
	if _, err := election.Leader(ctx, c1, "ctl"); !errors.Is(err, election.ErrNoLeader) {
		t.Fatalf("Leader of an empty election = %v, want ErrNoLeader", err)
	}
	l1, err := election.Campaign(ctx, c1, "ctl", "one", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	won := make(chan *election.Leadership, 1)
	go func() {
		l2, err := election.Campaign(ctx, c2, "ctl", "two", 30*time.Second)
		if err != nil {
			t.Error(err)
		}
		won <- l2
	}()
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	if err := l1.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case l2 := <-won:
		// With a 30 s TTL, taking over in well under that proves resignation, not expiry, handed over.
		if time.Since(start) > 10*time.Second {
			t.Fatalf("hand-over took %s", time.Since(start))
		}
		select {
		case <-l1.Done():
		default:
			t.Fatal("the resigned leadership is not Done")
		}
		if l, _ := election.Leader(ctx, c1, "ctl"); l != "two" {
			t.Fatalf("Leader = %q, want two", l)
		}
		l2.Resign(ctx)
	case <-time.After(15 * time.Second):
		t.Fatal("second candidate never won after the first resigned")
	}
}

func TestCampaignGivesUpWithItsContext(t *testing.T) {
	e := etcdtest.Start(t, "")
	c := e.Client(t)
	l, err := election.Campaign(context.Background(), c, "busy", "holder", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Resign(context.Background())
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := election.Campaign(ctx, c, "busy", "waiter", 30*time.Second); err == nil || !strings.Contains(err.Error(), "waiter") {
		t.Fatalf("Campaign past its deadline = %v", err)
	}
	if ld, _ := election.Leader(context.Background(), c, "busy"); ld != "holder" {
		t.Fatalf("Leader = %q after a failed campaign, want holder", ld)
	}
}
