package cloudhv

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

// startQemuNBD serves file as export over a Unix socket with qemu-nbd (Debian qemu-utils), a real NBD server
// independent of Basalt's. It is stopped at the end of the test.
func startQemuNBD(t *testing.T, file, export string, readOnly bool) string {
	t.Helper()
	bin, err := exec.LookPath("qemu-nbd")
	if err != nil {
		t.Skip("qemu-nbd not on PATH (Debian package qemu-utils)")
	}
	sock := filepath.Join(shortTempDir(t), "nbd.sock")
	args := []string{"--persistent", "-k", sock, "-f", "raw", "-x", export}
	if readOnly {
		args = append(args, "-r")
	}
	cmd := exec.Command(bin, append(args, file)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		os.Remove(sock)
	})
	ctx := testContext(t)
	err = waitFor(ctx, 20*time.Millisecond, func() (bool, error) {
		select {
		case <-exited:
			return false, errors.New("qemu-nbd exited: " + stderr.String())
		default:
		}
		_, err := os.Stat(sock)
		return err == nil, nil
	})
	if err != nil {
		t.Fatalf("waiting for qemu-nbd: %v", err)
	}
	return sock
}

// testImage writes a file of size bytes of random content.
func testImage(t *testing.T, size int) (string, []byte) {
	t.Helper()
	data := make([]byte, size)
	r := rand.NewChaCha8([32]byte{1, 2, 3})
	r.Read(data)
	path := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, data
}

func dialNBD(t *testing.T, sock string) net.Conn {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// nbdRead sends NBD_CMD_READ and reads the simple reply: it proves the handshake left the connection in the
// transmission phase without structured replies, as the kernel expects it.
func nbdRead(conn net.Conn, offset uint64, length uint32) ([]byte, error) {
	req := binary.BigEndian.AppendUint32(nil, 0x25609513) // NBD_REQUEST_MAGIC
	req = binary.BigEndian.AppendUint16(req, 0)           // flags
	req = binary.BigEndian.AppendUint16(req, 0)           // NBD_CMD_READ
	req = binary.BigEndian.AppendUint64(req, 42)          // cookie
	req = binary.BigEndian.AppendUint64(req, offset)
	req = binary.BigEndian.AppendUint32(req, length)
	if _, err := conn.Write(req); err != nil {
		return nil, err
	}
	var hdr [16]byte
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		return nil, err
	}
	if magic := binary.BigEndian.Uint32(hdr[0:4]); magic != 0x67446698 { // NBD_SIMPLE_REPLY_MAGIC
		return nil, errors.New("not a simple reply")
	}
	if e := binary.BigEndian.Uint32(hdr[4:8]); e != 0 {
		return nil, errors.New("read failed")
	}
	buf := make([]byte, length)
	_, err := io.ReadFull(conn, buf)
	return buf, err
}

// nbdinfoFlags asks libnbd's nbdinfo (Debian libnbd-bin) what it sees, as a second opinion on the flags.
func nbdinfoFlags(t *testing.T, sock, export string) (uint64, uint16, bool) {
	t.Helper()
	bin, err := exec.LookPath("nbdinfo")
	if err != nil {
		return 0, 0, false
	}
	out, err := exec.Command(bin, "--json", "--no-content", "nbd+unix:///"+export+"?socket="+sock).Output()
	if err != nil {
		t.Fatalf("nbdinfo: %v", err)
	}
	var info struct {
		Exports []map[string]any `json:"exports"`
	}
	if err := json.Unmarshal(out, &info); err != nil || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo output %s: %v", out, err)
	}
	e := info.Exports[0]
	var flags uint16 = NBDFlagHasFlags
	for key, bit := range map[string]uint16{
		"is_read_only": NBDFlagReadOnly, "can_flush": NBDFlagSendFlush, "can_fua": NBDFlagSendFUA,
		"is_rotational": NBDFlagRotational, "can_trim": NBDFlagSendTrim, "can_zero": NBDFlagSendWriteZeroes,
		"can_multi_conn": NBDFlagCanMultiConn, "can_cache": NBDFlagSendCache, "can_fast_zero": NBDFlagSendFastZero,
	} {
		if v, _ := e[key].(bool); v {
			flags |= bit
		}
	}
	size, _ := e["export-size"].(float64)
	return uint64(size), flags, true
}

// TestNBDHandshakeQemuNBD negotiates with a real NBD server and checks the export's size and flags, against
// what the server was told and against nbdinfo, then reads through the connection.
func TestNBDHandshakeQemuNBD(t *testing.T) {
	// Not a multiple of 4096, so that a size rounded anywhere shows.
	const size = 5<<20 + 3*512
	for _, readOnly := range []bool{false, true} {
		name := "writable"
		if readOnly {
			name = "read-only"
		}
		t.Run(name, func(t *testing.T) {
			ctx := testContext(t)
			file, data := testImage(t, size)
			sock := startQemuNBD(t, file, "basalt-vol", readOnly)

			// qemu-nbd serves one client at a time (--shared=1): each connection is closed before the next.
			unknown := dialNBD(t, sock)
			exp, err := NBDHandshake(ctx, unknown, "no-such-export")
			var nbdErr *NBDError
			if !errors.As(err, &nbdErr) || nbdReplyName(nbdErr.Type) != "NBD_REP_ERR_UNKNOWN" {
				t.Fatalf("unknown export: %+v, %v; want NBD_REP_ERR_UNKNOWN", exp, err)
			}
			unknown.Close()

			conn := dialNBD(t, sock)
			exp, err = NBDHandshake(ctx, conn, "basalt-vol")
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("export: %+v (flags %#x)", exp, exp.Flags)
			if exp.Size != size {
				t.Errorf("size %d, want %d", exp.Size, size)
			}
			if exp.Flags&NBDFlagHasFlags == 0 || exp.Flags&NBDFlagSendFlush == 0 {
				t.Errorf("flags %#x lack HAS_FLAGS or SEND_FLUSH", exp.Flags)
			}
			if got := exp.Flags&NBDFlagReadOnly != 0; got != readOnly {
				t.Errorf("READ_ONLY is %v, want %v", got, readOnly)
			}
			if exp.Flags&NBDFlagSendDF != 0 {
				t.Errorf("flags %#x have SEND_DF without structured replies", exp.Flags)
			}
			if exp.PreferredBlockSize == 0 || exp.MaxBlockSize < exp.PreferredBlockSize {
				t.Errorf("block sizes %d/%d/%d", exp.MinBlockSize, exp.PreferredBlockSize, exp.MaxBlockSize)
			}
			if bs, err := kernelBlockSize(exp); err != nil || bs != 512 {
				t.Errorf("kernel block size %d, %v", bs, err)
			}
			got, err := nbdRead(conn, 4096, 8192)
			if err != nil || !bytes.Equal(got, data[4096:4096+8192]) {
				t.Fatalf("read after the handshake: %v", err)
			}
			conn.Close()

			if infoSize, infoFlags, ok := nbdinfoFlags(t, sock, "basalt-vol"); ok {
				if infoSize != exp.Size {
					t.Errorf("nbdinfo says size %d, we read %d", infoSize, exp.Size)
				}
				if infoFlags != exp.Flags {
					t.Errorf("nbdinfo says flags %#x, we read %#x", infoFlags, exp.Flags)
				}
			} else {
				t.Log("nbdinfo not on PATH: flags not cross-checked")
			}
		})
	}
}

// fakeNBDServer runs handler on one accepted connection.
func fakeNBDServer(t *testing.T, handler func(net.Conn)) string {
	t.Helper()
	sock := filepath.Join(shortTempDir(t), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		handler(conn)
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return sock
}

func newstyleGreeting(flags uint16) []byte {
	b := binary.BigEndian.AppendUint64(nil, nbdMagic)
	b = binary.BigEndian.AppendUint64(b, nbdIHaveOpt)
	return binary.BigEndian.AppendUint16(b, flags)
}

func optReply(typ uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, nbdReplyMagic)
	b = binary.BigEndian.AppendUint32(b, nbdOptGo)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// TestNBDHandshakeErrors covers servers that break or refuse the handshake.
func TestNBDHandshakeErrors(t *testing.T) {
	// The client's flags and its NBD_OPT_GO for export "vol": 4 + (8+4+4) + (4+3+2+2) bytes.
	drain := func(c net.Conn) { io.ReadFull(c, make([]byte, 31)) }
	cases := map[string]struct {
		server func(net.Conn)
		want   string
	}{
		"not nbd": {func(c net.Conn) { c.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n")) }, "not an NBD server"},
		"oldstyle": {func(c net.Conn) {
			b := binary.BigEndian.AppendUint64(nil, nbdMagic)
			c.Write(binary.BigEndian.AppendUint64(b, nbdOldstyleMagic))
		}, "oldstyle"},
		"not fixed newstyle": {func(c net.Conn) { c.Write(newstyleGreeting(0)) }, "fixed newstyle"},
		"ack without export info": {func(c net.Conn) {
			c.Write(newstyleGreeting(nbdFlagFixedNewstyle | nbdFlagNoZeroes))
			drain(c)
			c.Write(optReply(nbdRepAck, nil))
		}, "without sending NBD_INFO_EXPORT"},
		"refused": {func(c net.Conn) {
			c.Write(newstyleGreeting(nbdFlagFixedNewstyle))
			drain(c)
			c.Write(optReply(nbdRepFlagError|5, []byte("TLS required")))
		}, "NBD_REP_ERR_TLS_REQD: TLS required"},
		"short export info": {func(c net.Conn) {
			c.Write(newstyleGreeting(nbdFlagFixedNewstyle))
			drain(c)
			c.Write(optReply(nbdRepInfo, []byte{0, 0, 1}))
		}, "NBD_INFO_EXPORT of 3 bytes"},
		"hangs up": {func(c net.Conn) { c.Write(newstyleGreeting(nbdFlagFixedNewstyle)[:10]) }, "reading server greeting"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			sock := fakeNBDServer(t, tc.server)
			_, err := NBDHandshake(testContext(t), dialNBD(t, sock), "vol")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}

	t.Run("silent server honours the context", func(t *testing.T) {
		sock := fakeNBDServer(t, func(c net.Conn) { io.Copy(io.Discard, c) })
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := NBDHandshake(ctx, dialNBD(t, sock), "vol")
		if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 5*time.Second {
			t.Fatalf("got %v after %s", err, time.Since(start))
		}
	})
}

func TestKernelBlockSize(t *testing.T) {
	for _, tc := range []struct {
		min  uint32
		want int
		ok   bool
	}{{0, 512, true}, {1, 512, true}, {512, 512, true}, {4096, 4096, true}, {3000, 0, false}, {1 << 20, 0, false}} {
		got, err := kernelBlockSize(NBDExport{MinBlockSize: tc.min})
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("min %d: %d, %v", tc.min, got, err)
		}
	}
}

// TestKernelNBDAttach attaches a qemu-nbd export as /dev/nbdN and reads it back through the block device. It
// needs the nbd kernel module and root; the machines this project runs on have no nbd module, so it is
// skipped there.
func TestKernelNBDAttach(t *testing.T) {
	if _, err := os.Stat("/dev/nbd0"); err != nil {
		t.Skip("no /dev/nbd0: the nbd kernel module is not loaded (it is not available on this machine)")
	}
	ctx := testContext(t)
	file, data := testImage(t, 4<<20)
	sock := startQemuNBD(t, file, "basalt-vol", false)
	k := &KernelNBD{}
	a, err := k.Attach(ctx, hypervisor.Disk{ID: "d", NBDSocket: sock, Export: "basalt-vol"})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Detach(ctx)
	dev, err := os.Open(a.Path())
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	_, err = dev.ReadAt(got, 1<<20)
	dev.Close()
	if err != nil || !bytes.Equal(got, data[1<<20:2<<20]) {
		t.Fatalf("reading %s: %v", a.Path(), err)
	}
	if err := a.Detach(ctx); err != nil {
		t.Fatal(err)
	}
}
