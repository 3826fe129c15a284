package agent

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/schema"
	"github.com/basalt-hv/basalt/metad/store"
	"github.com/basalt-hv/basalt/netd/netlab"
	"github.com/vishvananda/netlink"
)

// The incoming placement of a live migration (Port.incoming_host): the destination's netd creates the port's
// tap, with its policy, on its bridge, while every host, the destination included, keeps sending the port's
// traffic to its current host; the source is not touched at all. Clearing the placement (an aborted
// migration) removes the destination's tap and, with no other port there, the network. computed writes the
// placement straight to etcd (the API refuses it), and so does this test.
func TestIncomingPlacement(t *testing.T) {
	e := newEnv(t, 3)
	h1, h2, h3 := e.lab.Hosts[0], e.lab.Hosts[1], e.lab.Hosts[2]
	n1, n2, n3 := e.start(h1), e.start(h2), e.start(h3)
	e.network("red", "acme", 100, "10.0.0.0/24")
	m := e.vm(h1, "red", "m", "52:54:00:00:00:0a", "10.0.0.10", &basaltv1.PortPolicy{
		Acl: []*basaltv1.AclRule{{Id: "web", Direction: in, Protocol: basaltv1.AclProtocol_ACL_PROTOCOL_TCP, PortMin: 80, PortMax: 80, Action: allow}},
	})
	q := e.vm(h3, "red", "q", "52:54:00:00:00:0b", "10.0.0.11", nil)
	e.waitPorts(n1, "red/m")
	e.waitPorts(n3, "red/q")
	e.mustPing(q, "10.0.0.10")
	before := snapshot(t, h1)

	setIncoming := func(node string) {
		t.Helper()
		for {
			rec, err := store.Get[basaltv1.Port](e.ctx, e.store, schema.PortKey("red", "m"))
			if err != nil {
				t.Fatal(err)
			}
			rec.Value.IncomingHost = node
			_, err = e.store.Update(e.ctx, rec.Key, rec.Value, rec.ModRevision)
			if err == nil {
				return
			}
			if !errors.Is(err, store.ErrConflict) {
				t.Fatal(err)
			}
		}
	}

	start := time.Now()
	setIncoming(n2.id)
	e.waitPorts(n2, "red/m")
	took := time.Since(start)
	st, _, _ := n2.agent.Applied()
	if len(st.Ports) != 1 || !st.Ports[0].Incoming || len(st.Remote) != 2 {
		t.Fatalf("h2 applied %s; want m incoming, and m and q remote", describe(st))
	}
	l, err := h2.NL.LinkByName(m.Tap)
	if err != nil {
		t.Fatalf("h2 has no tap for the incoming port: %v", err)
	}
	if tt, ok := l.(*netlink.Tuntap); !ok || tt.Mode != netlink.TUNTAP_MODE_TAP || masterOf(h2, m.Tap) != "bsb100" {
		t.Fatalf("h2's %s is a %s on %q; want a tap netd created on bsb100", m.Tap, l.Type(), masterOf(h2, m.Tap))
	}
	if rules := strings.Join(snapshot(t, h2).Rules, "\n"); !strings.Contains(rules, "from_"+m.Tap) || !strings.Contains(rules, "to_"+m.Tap) {
		t.Fatalf("h2 has no policy chains for %s:\n%s", m.Tap, rules)
	}
	// The traffic still goes to h1, from h3 and from h2 itself.
	for _, h := range []*netlab.Host{h2, h3} {
		if dst := fdbDst(t, h, "bsx100", m.MAC); dst != h1.IP {
			t.Fatalf("%s sends m's MAC to %v; want h1 (%v) until the switchover", h.Name, dst, h1.IP)
		}
	}
	e.mustPing(q, "10.0.0.10")
	if after := snapshot(t, h1); !reflect.DeepEqual(before, after) {
		t.Fatalf("the source host changed for an incoming placement elsewhere:\nbefore %v\nafter  %v", before, after)
	}
	t.Logf("incoming placement on h2 ready (tap, policy, remote entries kept) %s after the etcd update", took.Round(time.Millisecond))

	// The migration is aborted: the destination lets go of the tap and, with nothing else there, the network.
	setIncoming("")
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, errTap := h2.NL.LinkByName(m.Tap)
		_, errBr := h2.NL.LinkByName("bsb100")
		if errTap != nil && errBr != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("h2 kept the tap (%v) or the network's bridge (%v) after the incoming placement was cleared", errTap, errBr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.mustPing(q, "10.0.0.10")
	if after := snapshot(t, h1); !reflect.DeepEqual(before, after) {
		t.Fatalf("the source host changed when the incoming placement was cleared:\nbefore %v\nafter  %v", before, after)
	}
}
