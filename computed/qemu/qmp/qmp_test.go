package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// startQEMU runs qemu-system-x86_64 with no machine at all (nothing to boot, starts in milliseconds) and a QMP
// socket, and kills its process group when the test ends.
func startQEMU(t *testing.T) (sock string, pid int) {
	t.Helper()
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86; make deps installs it)")
	}
	dir, err := os.MkdirTemp("", "qmp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock = filepath.Join(dir, "qmp.sock")
	cmd := exec.Command(bin, "-machine", "none", "-display", "none", "-nodefaults", "-no-user-config",
		"-qmp", "unix:"+sock+",server=on,wait=off")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case <-exited:
			t.Fatalf("qemu exited: %s", stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu did not create %s", sock)
		}
	}
	return sock, cmd.Process.Pid
}

func TestRealQEMU(t *testing.T) {
	sock, pid := startQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	if got, err := c.PeerPID(); err != nil || got != pid {
		t.Fatalf("PeerPID = %d, %v; want %d", got, err, pid)
	}
	var v struct {
		QEMU    struct{ Major, Minor, Micro int } `json:"qemu"`
		Package string
	}
	if err := c.Execute(ctx, "query-version", nil, &v); err != nil {
		t.Fatal(err)
	}
	if gv := c.Version(); gv.Major != v.QEMU.Major || gv.Minor != v.QEMU.Minor || gv.Micro != v.QEMU.Micro || gv.Package != v.Package || gv.Major < 2 {
		t.Fatalf("greeting version %+v, query-version %+v", gv, v)
	}

	// QEMU's own errors come back typed.
	err = c.Execute(ctx, "no-such-command", nil, nil)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" || qe.Command != "no-such-command" || qe.Desc == "" {
		t.Fatalf("unknown command: %#v", err)
	}
	err = c.Execute(ctx, "qom-get", map[string]any{"path": "/machine", "property": "no-such-property"}, nil)
	if !errors.As(err, &qe) || qe.Class != "GenericError" {
		t.Fatalf("bad property: %#v", err)
	}
	err = c.Execute(ctx, "query-status", map[string]any{"bogus": 1}, nil)
	if !errors.As(err, &qe) {
		t.Fatalf("unexpected argument accepted: %v", err)
	}
	// The connection survives errors.
	var st struct{ Status string }
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil || st.Status == "" {
		t.Fatalf("query-status after errors: %+v, %v", st, err)
	}
	// A nil map of arguments is no arguments, not "arguments": null.
	var noArgs map[string]any
	if err := c.Execute(ctx, "query-status", noArgs, &st); err != nil {
		t.Fatalf("query-status with a nil map: %v", err)
	}

	// Many callers at once each get their own answer: the two commands' results have different shapes, so a
	// reply delivered to the wrong caller fails to decode or misses its field.
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%2 == 0 {
				var got struct {
					QEMU struct{ Major int } `json:"qemu"`
				}
				if err := c.Execute(ctx, "query-version", nil, &got); err != nil || got.QEMU.Major != v.QEMU.Major {
					errs <- fmt.Errorf("caller %d: query-version = %+v, %v", i, got, err)
				}
				return
			}
			var list []struct{ Name, Type string }
			if err := c.Execute(ctx, "qom-list", map[string]any{"path": "/machine"}, &list); err != nil {
				errs <- fmt.Errorf("caller %d: %w", i, err)
				return
			}
			found := false
			for _, p := range list {
				found = found || p.Name == "type"
			}
			if !found {
				errs <- fmt.Errorf("caller %d: qom-list /machine = %+v", i, list)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	// Events reach subscribers that asked for them, in order, and not others.
	stops := c.Subscribe("STOP", "RESUME")
	defer stops.Close()
	others := c.Subscribe("SHUTDOWN")
	if err := c.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"STOP", "RESUME"} {
		ev, err := stops.Next(ctx)
		if err != nil || ev.Name != want || time.Since(ev.Time) > time.Minute || ev.Time.After(time.Now().Add(time.Second)) {
			t.Fatalf("event = %+v, %v; want %s now", ev, err, want)
		}
	}

	// quit: the SHUTDOWN event arrives, then the connection ends and everything says so.
	if err := c.Execute(ctx, "quit", nil, nil); err != nil && !errors.Is(err, ErrClosed) {
		t.Fatal(err)
	}
	if ev, err := others.Next(ctx); err != nil || ev.Name != "SHUTDOWN" {
		t.Fatalf("after quit: %+v, %v", ev, err)
	}
	if _, err := others.Next(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("subscription after the connection ended: %v", err)
	}
	select {
	case <-c.Done():
	case <-ctx.Done():
		t.Fatal("Done not closed after QEMU quit")
	}
	if err := c.Execute(ctx, "query-status", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Execute after quit: %v", err)
	}
	if late := c.Subscribe(); late != nil {
		if _, err := late.Next(ctx); !errors.Is(err, ErrClosed) {
			t.Fatalf("subscription made after the end: %v", err)
		}
	}
}

// peer is a scripted QMP server on a real Unix socket, for the inputs QEMU never sends.
type peer struct {
	t    *testing.T
	ln   *net.UnixListener
	path string
}

func newPeer(t *testing.T) *peer {
	dir, err := os.MkdirTemp("", "qmp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &peer{t: t, ln: ln, path: path}
}

// serve accepts one connection and runs script on it in the background.
func (p *peer) serve(script func(conn net.Conn, r *bufio.Reader)) {
	go func() {
		conn, err := p.ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		script(conn, bufio.NewReader(conn))
	}()
}

const greeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "test"}, "capabilities": []}}` + "\n"

// handshake plays QEMU's side of the greeting and capabilities negotiation.
func handshake(conn net.Conn, r *bufio.Reader) bool {
	conn.Write([]byte(greeting))
	if _, err := r.ReadString('\n'); err != nil {
		return false
	}
	_, err := conn.Write([]byte(`{"return": {}, "id": 0}` + "\n"))
	return err == nil
}

// readID reads one request and returns its id.
func readID(r *bufio.Reader) (string, string, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return "", "", err
	}
	var req struct {
		Execute string
		ID      json.RawMessage
	}
	if err := json.Unmarshal([]byte(line), &req); err != nil {
		return "", "", err
	}
	return req.Execute, string(req.ID), nil
}

func TestBadPeers(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	t.Run("not a greeting", func(t *testing.T) {
		p := newPeer(t)
		p.serve(func(conn net.Conn, r *bufio.Reader) { conn.Write([]byte(`{"hello": 1}` + "\n")) })
		if _, err := Dial(ctx, p.path); err == nil || !strings.Contains(err.Error(), "QMP greeting") {
			t.Fatalf("Dial = %v", err)
		}
	})
	t.Run("garbage greeting", func(t *testing.T) {
		p := newPeer(t)
		p.serve(func(conn net.Conn, r *bufio.Reader) { conn.Write([]byte("SSH-2.0-OpenSSH\r\n")) })
		if _, err := Dial(ctx, p.path); err == nil {
			t.Fatal("Dial accepted a non-JSON greeting")
		}
	})
	t.Run("silent peer honours ctx", func(t *testing.T) {
		p := newPeer(t)
		hold := make(chan struct{})
		defer close(hold)
		p.serve(func(conn net.Conn, r *bufio.Reader) { <-hold })
		short, c := context.WithTimeout(ctx, 200*time.Millisecond)
		defer c()
		start := time.Now()
		if _, err := Dial(short, p.path); !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 5*time.Second {
			t.Fatalf("Dial = %v after %s", err, time.Since(start))
		}
		cancelled, c2 := context.WithCancel(ctx)
		p2 := newPeer(t)
		p2.serve(func(conn net.Conn, r *bufio.Reader) { <-hold })
		time.AfterFunc(100*time.Millisecond, c2)
		if _, err := Dial(cancelled, p2.path); !errors.Is(err, context.Canceled) {
			t.Fatalf("Dial with cancel = %v", err)
		}
	})
	t.Run("capabilities refused", func(t *testing.T) {
		p := newPeer(t)
		p.serve(func(conn net.Conn, r *bufio.Reader) {
			conn.Write([]byte(greeting))
			r.ReadString('\n')
			conn.Write([]byte(`{"error": {"class": "GenericError", "desc": "nope"}, "id": 0}` + "\n"))
		})
		_, err := Dial(ctx, p.path)
		var qe *Error
		if !errors.As(err, &qe) || qe.Command != "qmp_capabilities" || qe.Desc != "nope" {
			t.Fatalf("Dial = %v", err)
		}
	})
	t.Run("stray replies are ignored", func(t *testing.T) {
		p := newPeer(t)
		p.serve(func(conn net.Conn, r *bufio.Reader) {
			if !handshake(conn, r) {
				return
			}
			_, id, err := readID(r)
			if err != nil {
				return
			}
			// A reply to an id never sent, one with a non-numeric id and one with none, then the real one.
			conn.Write([]byte(`{"return": {"x": 1}, "id": 999}` + "\n" + `{"return": {}, "id": "abc"}` + "\n" +
				`{"return": {}}` + "\n" + `{"return": {"x": 2}, "id": ` + id + "}\n"))
			r.ReadString('\n')
		})
		c, err := Dial(ctx, p.path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		var out struct{ X int }
		if err := c.Execute(ctx, "anything", nil, &out); err != nil || out.X != 2 {
			t.Fatalf("Execute = %+v, %v", out, err)
		}
	})
	t.Run("garbage mid-stream fails every caller", func(t *testing.T) {
		p := newPeer(t)
		p.serve(func(conn net.Conn, r *bufio.Reader) {
			if !handshake(conn, r) {
				return
			}
			readID(r)
			conn.Write([]byte("{\"return\": \x00}\n"))
			r.ReadString('\n')
		})
		c, err := Dial(ctx, p.path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Execute(ctx, "x", nil, nil); !errors.Is(err, ErrClosed) {
			t.Fatalf("Execute = %v", err)
		}
		if c.Err() == nil {
			t.Fatal("Err() nil after a protocol error")
		}
	})
	t.Run("reply without return or error", func(t *testing.T) {
		p := newPeer(t)
		p.serve(func(conn net.Conn, r *bufio.Reader) {
			if !handshake(conn, r) {
				return
			}
			_, id, _ := readID(r)
			conn.Write([]byte(`{"id": ` + id + "}\n"))
			r.ReadString('\n')
		})
		c, err := Dial(ctx, p.path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Execute(ctx, "x", nil, nil); !errors.Is(err, ErrClosed) {
			t.Fatalf("Execute = %v", err)
		}
	})
	t.Run("peer hangs up mid-command", func(t *testing.T) {
		p := newPeer(t)
		p.serve(func(conn net.Conn, r *bufio.Reader) {
			if handshake(conn, r) {
				readID(r)
			}
		})
		c, err := Dial(ctx, p.path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Execute(ctx, "x", nil, nil); !errors.Is(err, ErrClosed) {
			t.Fatalf("Execute = %v", err)
		}
	})
	t.Run("cancelled command leaves the connection usable", func(t *testing.T) {
		p := newPeer(t)
		p.serve(func(conn net.Conn, r *bufio.Reader) {
			if !handshake(conn, r) {
				return
			}
			_, first, _ := readID(r)
			_, second, _ := readID(r)
			// The late answer to the cancelled command must not be taken for the second one's.
			conn.Write([]byte(`{"return": {"n": 1}, "id": ` + first + "}\n"))
			conn.Write([]byte(`{"return": {"n": 2}, "id": ` + second + "}\n"))
			r.ReadString('\n')
		})
		c, err := Dial(ctx, p.path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		short, cc := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cc()
		if err := c.Execute(short, "slow", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Execute = %v", err)
		}
		var out struct{ N int }
		if err := c.Execute(ctx, "next", nil, &out); err != nil || out.N != 2 {
			t.Fatalf("second Execute = %+v, %v", out, err)
		}
	})
	t.Run("slow subscriber is told it lost events", func(t *testing.T) {
		p := newPeer(t)
		sent := make(chan struct{})
		p.serve(func(conn net.Conn, r *bufio.Reader) {
			if !handshake(conn, r) {
				return
			}
			_, id, _ := readID(r)
			w := bufio.NewWriter(conn)
			for i := range maxQueuedEvents + 10 {
				fmt.Fprintf(w, `{"event": "E", "data": {"i": %d}, "timestamp": {"seconds": 1, "microseconds": 2}}`+"\n", i)
			}
			fmt.Fprintf(w, `{"return": {}, "id": %s}`+"\n", id)
			w.Flush()
			close(sent)
			r.ReadString('\n')
		})
		c, err := Dial(ctx, p.path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		s := c.Subscribe("E")
		// The reply follows every event on the stream, so once it is back all events were queued.
		if err := c.Execute(ctx, "go", nil, nil); err != nil {
			t.Fatal(err)
		}
		<-sent
		if _, err := s.Next(ctx); !errors.Is(err, ErrEventsDropped) {
			t.Fatalf("first Next = %v", err)
		}
		ev, err := s.Next(ctx)
		var d struct{ I int }
		json.Unmarshal(ev.Data, &d)
		if err != nil || d.I != 10 || !ev.Time.Equal(time.Unix(1, 2000)) {
			t.Fatalf("oldest kept event = %+v (%d), %v", ev, d.I, err)
		}
		s.Close()
		if _, err := s.Next(ctx); !errors.Is(err, ErrClosed) {
			t.Fatalf("Next after Close = %v", err)
		}
	})
}
