package dataplane

import (
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// snapshot is everything Apply manages in one host namespace, with kernel handles
// and interface indexes, so that any delete+recreate shows up as a difference.
type snapshot struct {
	Links    map[string]string
	Chains   map[string][]string // chain -> "handle comment"
	Elements map[string][]string
	Counters []string
	FDB      []string
	Neigh    []string
}

func (h *host) snapshot(t *testing.T) snapshot {
	t.Helper()
	s := snapshot{Links: map[string]string{}, Chains: map[string][]string{}, Elements: map[string][]string{}}
	links, err := h.h.LinkList()
	must(t, err, "link list")
	ours := map[int]bool{}
	for _, l := range links {
		a := l.Attrs()
		s.Links[a.Name] = fmt.Sprintf("idx=%d type=%s master=%d mtu=%d up=%v alias=%q", a.Index, l.Type(), a.MasterIndex, a.MTU, a.Flags&net.FlagUp != 0, a.Alias)
		if l.Type() == "bridge" || l.Type() == "vxlan" {
			ours[a.Index] = true
		}
	}
	st, err := h.plane.readNFT()
	must(t, err, "read nft")
	for name, rules := range st.rules {
		for _, r := range rules {
			s.Chains[name] = append(s.Chains[name], fmt.Sprintf("%d %s", r.Handle, ruleComment(r)))
		}
	}
	for name, els := range st.elems {
		for k := range els {
			s.Elements[name] = append(s.Elements[name], hex.EncodeToString([]byte(k)))
		}
		sort.Strings(s.Elements[name])
	}
	s.Counters = sortedKeys(st.counters)
	fdb, err := h.h.NeighList(0, unix.AF_BRIDGE)
	must(t, err, "fdb")
	for _, e := range fdb {
		if ours[e.LinkIndex] && e.State&(netlink.NUD_PERMANENT|netlink.NUD_NOARP) != 0 {
			s.FDB = append(s.FDB, fmt.Sprintf("%d %s %s f=%x s=%x", e.LinkIndex, e.HardwareAddr, e.IP, e.Flags, e.State))
		}
	}
	sort.Strings(s.FDB)
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		ns, err := h.h.NeighList(0, fam)
		must(t, err, "neigh")
		for _, e := range ns {
			if ours[e.LinkIndex] {
				s.Neigh = append(s.Neigh, fmt.Sprintf("%d %s %s s=%x", e.LinkIndex, e.IP, e.HardwareAddr, e.State))
			}
		}
	}
	sort.Strings(s.Neigh)
	return s
}

// watch records link, neighbour/FDB and nftables change notifications in h's
// namespace until the returned function is called; it returns what was seen.
func (h *host) watch(t *testing.T) func() []string {
	t.Helper()
	var mu sync.Mutex
	var events []string
	add := func(s string) { mu.Lock(); events = append(events, s); mu.Unlock() }
	done := make(chan struct{})
	lch := make(chan netlink.LinkUpdate, 64)
	nch := make(chan netlink.NeighUpdate, 64)
	must(t, netlink.LinkSubscribeAt(h.ns, lch, done), "link subscribe")
	must(t, netlink.NeighSubscribeAt(h.ns, nch, done), "neigh subscribe")
	conn, err := nftables.New(nftables.WithNetNSFd(int(h.ns)))
	must(t, err, "nft conn")
	mon := nftables.NewMonitor(nftables.WithMonitorEventBuffer(64))
	ech, err := conn.AddMonitor(mon)
	must(t, err, "nft monitor")
	var wg sync.WaitGroup
	wg.Add(3)
	go func() {
		defer wg.Done()
		for u := range lch {
			add(fmt.Sprintf("link %d %s flags=%v", u.Header.Type, u.Link.Attrs().Name, u.Link.Attrs().Flags))
		}
	}()
	go func() {
		defer wg.Done()
		for u := range nch {
			// Dynamic neighbour state machines (underlay ARP, learned MACs) are not ours.
			if u.State&(netlink.NUD_PERMANENT|netlink.NUD_NOARP) == 0 {
				continue
			}
			add(fmt.Sprintf("neigh %d if=%d %s %s", u.Type, u.LinkIndex, u.HardwareAddr, u.IP))
		}
	}()
	go func() {
		defer wg.Done()
		for e := range ech {
			add(fmt.Sprintf("nft %d %T", e.Type, e.Data))
		}
	}()
	return func() []string {
		time.Sleep(300 * time.Millisecond)
		close(done)
		mon.Close()
		// The netlink subscriptions close their channels once done is closed and
		// their socket wakes up; nudge them with a harmless query.
		_, _ = h.h.LinkByName("lo")
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		return events
	}
}

// Test 7: Apply is idempotent and does not flap; removing ports removes exactly their
// objects while traffic between other ports keeps flowing.
func TestApplyIdempotentNoFlap(t *testing.T) {
	l := newLab(t, 2)
	h1, h2 := l.hosts[0], l.hosts[1]
	a := l.addVM(h1, "a", "tpa", "52:54:00:00:00:01", "10.0.0.1")
	c := l.addVM(h1, "c", "tpc", "52:54:00:00:00:03", "10.0.0.3")
	b := l.addVM(h2, "b", "tpb", "52:54:00:00:00:02", "10.0.0.2")
	// x is a port whose tap the plane creates (no VM attached).
	x := Port{Network: "tenant-a", Name: "x", MAC: mustMAC("52:54:00:00:00:20"), IPs: []netip.Addr{netip.MustParseAddr("10.0.0.20")},
		Tap: "tpx0", Policy: PortPolicy{SpoofGuard: true, DHCPGuard: true, Isolated: true}}
	rx := RemotePort{Network: "tenant-a", MAC: x.MAC, IPs: x.IPs, HostVTEP: h1.ip, Isolated: true}
	polA := PortPolicy{SpoofGuard: true, DHCPGuard: true, ACL: []ACLRule{
		{ID: "icmp-out", Direction: Out, Protocol: ICMP, Action: Allow},
		{ID: "no-telnet", Direction: In, Protocol: TCP, PortMin: 23, PortMax: 23, Action: Deny},
	}}
	nets := []Network{netA, netB}
	full := func() HostState {
		return h1.state(nets, []Port{a.port("tenant-a", "a", polA), c.port("tenant-a", "c", guards), x},
			[]RemotePort{b.remote("tenant-a", h2)})
	}
	h1.apply(t, full())
	h2.apply(t, h2.state(nets, []Port{b.port("tenant-a", "b", guards)},
		[]RemotePort{a.remote("tenant-a", h1), c.remote("tenant-a", h1), rx}))
	l.mustPing(a, "10.0.0.2")
	l.mustPing(c, "10.0.0.2")

	tap, err := h1.h.LinkByName("tpx0")
	must(t, err, "created tap")
	if tap.Type() != "tuntap" || tap.Attrs().Alias != "basalt:bs:tap" {
		t.Fatalf("tpx0 is %s with alias %q, want a tuntap marked as ours", tap.Type(), tap.Attrs().Alias)
	}

	// Same state again: nothing may change, not even transiently.
	before := h1.snapshot(t)
	countersBefore := h1.counters(t)
	stop := h1.watch(t)
	start := time.Now()
	h1.apply(t, full())
	noop := time.Since(start)
	if ev := stop(); len(ev) != 0 {
		t.Fatalf("re-applying the same state caused %d change notifications: %v", len(ev), ev)
	}
	after := h1.snapshot(t)
	if !reflect.DeepEqual(before, after) {
		t.Fatalf("re-applying the same state changed the host:\nbefore %+v\nafter  %+v", before, after)
	}
	t.Logf("no-op Apply took %v", noop)

	// A restarted agent (a new Plane, no memory) applying the same state is a no-op too.
	p2, err := New(Options{NetNS: h1.ns})
	must(t, err, "second plane")
	defer p2.Close()
	stop = h1.watch(t)
	must(t, p2.Apply(context.Background(), full()), "apply from a fresh plane")
	if ev := stop(); len(ev) != 0 {
		t.Fatalf("a fresh plane re-applying the same state caused changes: %v", ev)
	}
	if again := h1.snapshot(t); !reflect.DeepEqual(before, again) {
		t.Fatalf("a fresh plane re-applying the same state changed the host")
	}

	// Remove c and x while a pings b across hosts every 50 ms.
	wait := a.pingLoss(t, "10.0.0.2", 40, "0.05")
	time.Sleep(700 * time.Millisecond)
	reduced := h1.state(nets, []Port{a.port("tenant-a", "a", polA)}, []RemotePort{b.remote("tenant-a", h2)})
	stop = h1.watch(t)
	h1.apply(t, reduced)
	// The watcher does see real changes (so the silence above means something).
	var nftEv, linkEv int
	for _, e := range stop() {
		switch e[:4] {
		case "nft ":
			nftEv++
		case "link":
			linkEv++
		}
	}
	if nftEv == 0 || linkEv == 0 {
		t.Fatalf("watcher saw %d nft and %d link events for a real change", nftEv, linkEv)
	}
	h2.apply(t, h2.state(nets, []Port{b.port("tenant-a", "b", guards)}, []RemotePort{a.remote("tenant-a", h1)}))
	l.mustPing(a, "10.0.0.2") // reachable right after the change
	sent, recv := wait()
	t.Logf("ping a->b across the removal of two ports: %d sent, %d received, %d lost", sent, recv, sent-recv)
	if recv != sent {
		t.Errorf("lost %d of %d pings across an unrelated port removal", sent-recv, sent)
	}

	if _, err := h1.h.LinkByName("tpx0"); err == nil {
		t.Errorf("created tap tpx0 still exists after its port was removed")
	}
	tpc, err := h1.h.LinkByName("tpc")
	must(t, err, "adopted veth must survive")
	if tpc.Attrs().MasterIndex != 0 {
		t.Errorf("tpc still attached to a bridge")
	}
	final := h1.snapshot(t)
	for _, ch := range []string{"from_tpc", "to_tpc", "from_tpx0", "to_tpx0"} {
		if _, ok := final.Chains[ch]; ok {
			t.Errorf("chain %s survived its port", ch)
		}
	}
	for _, cn := range final.Counters {
		if strings.HasPrefix(cn, "tpc.") || strings.HasPrefix(cn, "tpx0.") {
			t.Errorf("counter %s survived its port", cn)
		}
	}
	// a's chains, and the base chains, kept their rule handles; the shared objects
	// kept their interface indexes.
	for _, ch := range []string{"from_tpa", "to_tpa", "prerouting", "forward", "input", "output"} {
		if !reflect.DeepEqual(before.Chains[ch], final.Chains[ch]) {
			t.Errorf("chain %s changed: %v -> %v", ch, before.Chains[ch], final.Chains[ch])
		}
	}
	for _, ln := range []string{"tpa", "bsb100", "bsx100", "bsb200", "bsx200", "eth0"} {
		if before.Links[ln] != final.Links[ln] {
			t.Errorf("link %s changed: %s -> %s", ln, before.Links[ln], final.Links[ln])
		}
	}
	ca := h1.counters(t)["a"]
	for i, r := range ca.ACL {
		if r.Packets < countersBefore["a"].ACL[i].Packets {
			t.Errorf("ACL counter %s went backwards: %d -> %d", r.ID, countersBefore["a"].ACL[i].Packets, r.Packets)
		}
	}
	if ca.ACL[0].Packets == 0 {
		t.Errorf("icmp-out counter never moved")
	}
	fdb2 := h2.snapshot(t).FDB
	for _, e := range fdb2 {
		for _, gone := range []string{c.mac.String(), x.MAC.String()} {
			if strings.Contains(e, gone) {
				t.Errorf("host 2 kept an FDB entry for a removed port: %s", e)
			}
		}
	}
	l.mustNotPing(c, "10.0.0.2")

	// Changing one port's ACL rewrites only that port's chain, and counters of rules
	// that stay (same ID) keep counting.
	polA.ACL = append(polA.ACL, ACLRule{ID: "no-smtp", Direction: In, Protocol: TCP, PortMin: 25, PortMax: 25, Action: Deny})
	beforeACL := h1.counters(t)["a"].ACL[0]
	h1.apply(t, h1.state(nets, []Port{a.port("tenant-a", "a", polA)}, []RemotePort{b.remote("tenant-a", h2)}))
	changed := h1.snapshot(t)
	if reflect.DeepEqual(final.Chains["to_tpa"], changed.Chains["to_tpa"]) {
		t.Errorf("to_tpa did not change with a's inbound ACL")
	}
	for _, ch := range []string{"from_tpa", "prerouting", "forward"} {
		if !reflect.DeepEqual(final.Chains[ch], changed.Chains[ch]) {
			t.Errorf("chain %s changed although its rules did not", ch)
		}
	}
	if got := h1.counters(t)["a"].ACL; got[0].Packets < beforeACL.Packets || len(got) != 3 {
		t.Errorf("ACL counters after the change: %+v (icmp-out was %d)", got, beforeACL.Packets)
	}
}
