package schema

import (
	"net/netip"
	"strings"
	"testing"
)

func TestNetworkKeys(t *testing.T) {
	k := PortKey("red", "vm-1")
	if !strings.HasPrefix(k, NetworkPortsPrefix("red")) || !strings.HasPrefix(k, PortsPrefix) {
		t.Fatalf("port key %q is not under its network's prefix", k)
	}
	if n, p, ok := PortFromKey(k); !ok || n != "red" || p != "vm-1" {
		t.Fatalf("PortFromKey(%q) = %q, %q, %v", k, n, p, ok)
	}
	// A network's prefix must not cover another network whose name extends it.
	if strings.HasPrefix(PortKey("red2", "a"), NetworkPortsPrefix("red")) {
		t.Fatal("ports of network red2 fall under network red's prefix")
	}
	// Claims use canonical addresses, so two spellings of one address are one claim.
	if IPClaimKey("n", netip.MustParseAddr("fd00:0::0a")) != IPClaimKey("n", netip.MustParseAddr("fd00::a")) {
		t.Fatal("two spellings of one IPv6 address give two claim keys")
	}
	if !strings.HasPrefix(IPClaimKey("n", netip.MustParseAddr("10.0.0.1")), IPClaimPrefix("n")) ||
		!strings.HasPrefix(MACClaimKey("n", "52:54:00:00:00:01"), MACClaimPrefix("n")) {
		t.Fatal("claim keys are not under their network's claim prefix")
	}
	if VNIClaimKey(42) != VNIClaimsPrefix+"42" || TapClaimKey("bt1") != TapClaimsPrefix+"bt1" || NetdHostKey("h1") != NetdHostsPrefix+"h1" {
		t.Fatal("unexpected key spelling")
	}
	for _, p := range []string{NetworksPrefix, PortsPrefix, NetClaimsPrefix, NetdHostsPrefix} {
		if !strings.HasPrefix(p, Root) || !strings.HasSuffix(p, "/") {
			t.Fatalf("prefix %q must be under Root and end with /", p)
		}
	}
}
