package dataplane

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// iperf runs an iperf3 server in dst (one test, on port) and a client in src for secs seconds, and returns
// the TCP goodput in bit/s measured by the receiver. reverse makes dst send to src.
func iperf(t *testing.T, src, dst *vm, port int, secs int, reverse bool) float64 {
	t.Helper()
	if _, err := exec.LookPath("iperf3"); err != nil {
		t.Skip("needs iperf3 (Debian package iperf3)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs+20)*time.Second)
	defer cancel()
	srv := exec.CommandContext(ctx, "ip", "netns", "exec", dst.name, "iperf3", "-s", "-1", "-p", fmt.Sprint(port), "-B", dst.ip.String())
	var srvOut strings.Builder
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	must(t, srv.Start(), "start iperf3 server")
	defer srv.Wait()
	defer srv.Process.Kill()
	args := []string{"netns", "exec", src.name, "iperf3", "-c", dst.ip.String(), "-p", fmt.Sprint(port), "-t", fmt.Sprint(secs), "-J", "--connect-timeout", "2000"}
	if reverse {
		args = append(args, "-R")
	}
	var res struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	for try := 0; ; try++ {
		res.Error = ""
		out, err := exec.CommandContext(ctx, "ip", args...).Output()
		if jerr := json.Unmarshal(out, &res); jerr != nil {
			t.Fatalf("iperf3 client: %v, %v: %s", err, jerr, out)
		}
		// The server may not listen yet.
		if !strings.Contains(res.Error, "unable to connect") || try == 50 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if res.Error != "" {
		srv.Process.Kill()
		srv.Wait()
		t.Fatalf("iperf3 from %s to %s: %s (server: %s)", src.name, dst.name, res.Error, srvOut.String())
	}
	return res.End.SumReceived.BitsPerSecond
}

// Mirroring: every frame a port sends and receives is copied to the mirror port, across hosts too (the
// mirrored port talks to a VM on another host).
func TestMirror(t *testing.T) {
	l := newLab(t, 2)
	h1, h2 := l.hosts[0], l.hosts[1]
	a := l.addVM(h1, "a", "tpa", "52:54:00:00:00:01", "10.0.0.1")
	m := l.addVM(h1, "m", "tpm", "52:54:00:00:00:0e", "10.0.0.14")
	b := l.addVM(h2, "b", "tpb", "52:54:00:00:00:02", "10.0.0.2")
	pa := a.port("tenant-a", "a", guards)
	pa.Policy.MirrorTo = "m"
	s1 := h1.state([]Network{netA}, []Port{pa, m.port("tenant-a", "m", PortPolicy{})}, []RemotePort{b.remote("tenant-a", h2)})
	h1.apply(t, s1)
	h2.apply(t, h2.state([]Network{netA}, []Port{b.port("tenant-a", "b", guards)}, []RemotePort{a.remote("tenant-a", h1), m.remote("tenant-a", h1)}))
	l.mustPing(a, "10.0.0.2")

	capture := m.startCapture(t)
	l.mustPing(a, "10.0.0.2")
	isICMP := func(src, dst netip.Addr, typ byte) func([]byte) bool {
		return func(f []byte) bool {
			return len(f) >= 35 && binary.BigEndian.Uint16(f[12:]) == etherIPv4 && f[23] == ipprotoICMP &&
				netip.AddrFrom4([4]byte(f[26:30])) == src && netip.AddrFrom4([4]byte(f[30:34])) == dst && f[34] == typ
		}
	}
	req := capture.count(isICMP(a.ip, b.ip, 8))
	rep := countFrames(capture, isICMP(b.ip, a.ip, 0))
	if req < 3 || rep < 3 {
		t.Fatalf("the mirror port saw %d echo requests and %d replies of a's 3 pings; want both directions", req, rep)
	}
	// Without mirroring, the mirror port hears nothing of a's unicast traffic.
	pa.Policy.MirrorTo = ""
	s1.Ports[0] = pa
	h1.apply(t, s1)
	capture = m.startCapture(t)
	l.mustPing(a, "10.0.0.2")
	if n := capture.count(isICMP(a.ip, b.ip, 8)) + countFrames(capture, isICMP(b.ip, a.ip, 0)); n != 0 {
		t.Fatalf("the mirror port still saw %d frames after mirroring was turned off", n)
	}
}

// Bandwidth: a port capped at 50 Mbit/s stays under it in both directions across hosts (measured with
// iperf3, 10% tolerance), while an uncapped port on the same path goes much faster; the cap's removal lifts
// it.
func TestBandwidthMax(t *testing.T) {
	l := newLab(t, 2)
	h1, h2 := l.hosts[0], l.hosts[1]
	a := l.addVM(h1, "a", "tpa", "52:54:00:00:00:01", "10.0.0.1")
	c := l.addVM(h1, "c", "tpc", "52:54:00:00:00:03", "10.0.0.3")
	b := l.addVM(h2, "b", "tpb", "52:54:00:00:00:02", "10.0.0.2")
	const limit = 50e6
	pa := a.port("tenant-a", "a", guards)
	pa.Policy.MaxBps = limit
	s1 := h1.state([]Network{netA}, []Port{pa, c.port("tenant-a", "c", guards)}, []RemotePort{b.remote("tenant-a", h2)})
	h1.apply(t, s1)
	h2.apply(t, h2.state([]Network{netA}, []Port{b.port("tenant-a", "b", guards)}, []RemotePort{a.remote("tenant-a", h1), c.remote("tenant-a", h1)}))
	l.mustPing(a, "10.0.0.2")

	up := iperf(t, a, b, 5201, 3, false)
	down := iperf(t, a, b, 5202, 3, true)
	free := iperf(t, c, b, 5203, 2, false)
	t.Logf("capped at %.0f Mbit/s: sends %.1f Mbit/s, receives %.1f Mbit/s; uncapped port sends %.1f Mbit/s", limit/1e6, up/1e6, down/1e6, free/1e6)
	for what, v := range map[string]float64{"sending": up, "receiving": down} {
		if v > limit*1.1 {
			t.Errorf("%s at %.1f Mbit/s, above the %.0f Mbit/s cap", what, v/1e6, limit/1e6)
		}
		if v < limit*0.5 {
			t.Errorf("%s at only %.1f Mbit/s under a %.0f Mbit/s cap", what, v/1e6, limit/1e6)
		}
	}
	if free < 3*limit {
		t.Fatalf("the uncapped port reaches only %.1f Mbit/s: the test cannot tell the cap from a slow machine", free/1e6)
	}
	pa.Policy.MaxBps = 0
	s1.Ports[0] = pa
	h1.apply(t, s1)
	if v := iperf(t, a, b, 5204, 2, false); v < 2*limit {
		t.Fatalf("after the cap was removed the port sends at %.1f Mbit/s", v/1e6)
	}
	if _, err := h1.h.LinkByName(ifbName("bs")); err == nil {
		t.Fatal("the bandwidth scheduler survived the last port with bandwidth settings")
	}
}

// Minimum bandwidth: two ports of one host share an uplink of 200 Mbit/s; the one guaranteed 150 Mbit/s
// gets at least that while the other (guaranteed 10 Mbit/s) sends flat out at the same time.
func TestBandwidthMin(t *testing.T) {
	l := newLab(t, 2)
	h1, h2 := l.hosts[0], l.hosts[1]
	a := l.addVM(h1, "a", "tpa", "52:54:00:00:00:01", "10.0.0.1")
	c := l.addVM(h1, "c", "tpc", "52:54:00:00:00:03", "10.0.0.3")
	b := l.addVM(h2, "b", "tpb", "52:54:00:00:00:02", "10.0.0.2")
	d := l.addVM(h2, "d", "tpd", "52:54:00:00:00:04", "10.0.0.4")
	pa, pc := a.port("tenant-a", "a", guards), c.port("tenant-a", "c", guards)
	pa.Policy.MinBps, pc.Policy.MinBps = 150e6, 10e6
	s1 := h1.state([]Network{netA}, []Port{pa, pc}, []RemotePort{b.remote("tenant-a", h2), d.remote("tenant-a", h2)})
	s1.UplinkBps = 200e6
	h1.apply(t, s1)
	h2.apply(t, h2.state([]Network{netA}, []Port{b.port("tenant-a", "b", guards), d.port("tenant-a", "d", guards)},
		[]RemotePort{a.remote("tenant-a", h1), c.remote("tenant-a", h1)}))
	l.mustPing(a, "10.0.0.2")
	l.mustPing(c, "10.0.0.4")

	var ra, rc float64
	done := make(chan struct{})
	go func() { defer close(done); rc = iperf(t, c, d, 5301, 4, false) }()
	ra = iperf(t, a, b, 5302, 4, false)
	<-done
	t.Logf("uplink 200 Mbit/s: port guaranteed 150 got %.1f Mbit/s, port guaranteed 10 got %.1f Mbit/s", ra/1e6, rc/1e6)
	if ra < 135e6 {
		t.Fatalf("the port guaranteed 150 Mbit/s got %.1f Mbit/s", ra/1e6)
	}
	if ra+rc > 220e6 {
		t.Fatalf("the two ports sent %.1f Mbit/s together over a 200 Mbit/s uplink", (ra+rc)/1e6)
	}
	// A restart (a fresh plane applying the same state) keeps every class where it is.
	before, err := exec.Command("ip", "netns", "exec", h1.name, "tc", "filter", "show", "dev", ifbName("bs")).CombinedOutput()
	must(t, err, "tc filter show: "+string(before))
	p2, err := New(Options{NetNS: h1.ns, GatewayNetNS: h1.plane.gwNS})
	must(t, err, "New")
	defer p2.Close()
	must(t, p2.Apply(context.Background(), s1), "Apply from a fresh plane")
	after, err := exec.Command("ip", "netns", "exec", h1.name, "tc", "filter", "show", "dev", ifbName("bs")).CombinedOutput()
	must(t, err, "tc filter show")
	if string(before) != string(after) {
		t.Fatalf("a fresh plane changed the classification:\nbefore %s\nafter  %s", before, after)
	}
}
