package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"strings"
	"testing"

	"github.com/basalt-hv/basalt/metad/api"
	"github.com/basalt-hv/basalt/metad/etcdserver/etcdtest"
	"github.com/basalt-hv/basalt/metad/registry"
	"github.com/basalt-hv/basalt/metad/store"
	"google.golang.org/grpc"
)

func TestParseACL(t *testing.T) {
	for in, want := range map[string]string{
		"in,allow,tcp,10.0.0.0/24,22":         "in,allow,tcp,10.0.0.0/24,22",
		"ssh=in,allow,tcp,10.0.0.0/24,22":     "ssh=in,allow,tcp,10.0.0.0/24,22",
		" OUT , Deny , ICMP , 10.0.0.3 ":      "out,deny,icmp,10.0.0.3/32",
		"in,allow,udp,any,1024-65535":         "in,allow,udp,any,1024-65535",
		"in,deny,any":                         "in,deny,any",
		"v6=out,allow,tcp,fd00::/64,443":      "v6=out,allow,tcp,fd00::/64,443",
		"in,allow,tcp,,80":                    "in,allow,tcp,any,80",
		"web.1:a=in,allow,tcp,192.0.2.0/24,8": "web.1:a=in,allow,tcp,192.0.2.0/24,8",
	} {
		r, err := parseACL(in)
		if err != nil {
			t.Errorf("parseACL(%q): %v", in, err)
			continue
		}
		if got := formatACL(r); got != want {
			t.Errorf("parseACL(%q) formats as %q, want %q", in, got, want)
		}
		if again, err := parseACL(formatACL(r)); err != nil || formatACL(again) != want {
			t.Errorf("%q does not read back: %v", want, err)
		}
	}
	for in, want := range map[string]string{
		"in,allow":                     `has 2 fields`,
		"in,allow,tcp,any,22,x":        `has 6 fields`,
		"up,allow,tcp":                 `field 1 "up": the direction must be in or out`,
		"in,accept,tcp":                `field 2 "accept": the action must be allow or deny`,
		"in,allow,tcpp":                `field 3 "tcpp": the protocol must be any, tcp, udp or icmp`,
		"in,allow,tcp,10.0.0.1/24":     `field 4 "10.0.0.1/24": host bits are set: did you mean 10.0.0.0/24?`,
		"in,allow,tcp,10.0.0/24":       `field 4 "10.0.0/24": not a CIDR prefix`,
		"in,allow,icmp,any,22":         `field 5 "22": ports need protocol tcp or udp`,
		"in,allow,tcp,any,90-80":       `field 5 "90-80": want a port (22) or a range`,
		"in,allow,tcp,any,0":           `field 5 "0"`,
		"in,allow,tcp,any,70000":       `field 5 "70000"`,
		"bad id!=in,allow,tcp":         `ID "bad id!" must be`,
		"=in,allow,tcp":                `ID "" must be`,
		"in,allow,tcp,any,ssh":         `field 5 "ssh"`,
		"in,allow,tcp,10.0.0.0/24,22-": `field 5 "22-"`,
	} {
		_, err := parseACL(in)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("parseACL(%q) = %v; want an error containing %q", in, err, want)
		}
	}
}

func TestParseRate(t *testing.T) {
	for in, want := range map[string]uint64{"500000": 500000, "800k": 800e3, "100M": 100e6, "1.5G": 1.5e9, "10Gbit": 10e9, "10gbps": 10e9, "2Mbit/s": 2e6} {
		if got, err := parseRate(in); err != nil || got != want {
			t.Errorf("parseRate(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "M", "-1M", "0", "1.5", "fast", "1.0000001k"} {
		if got, err := parseRate(bad); err == nil {
			t.Errorf("parseRate(%q) = %d; want an error", bad, got)
		}
	}
	for v, want := range map[uint64]string{100e6: "100Mbit/s", 1500e6: "1500Mbit/s", 8000: "8kbit/s", 1234: "1234bit/s"} {
		if got := rateString(v); got != want {
			t.Errorf("rateString(%d) = %q, want %q", v, got, want)
		}
	}
}

// cliAgainstAPI serves the real API on a real embedded etcd and returns a function running the CLI against it.
func cliAgainstAPI(t *testing.T) func(args ...string) (string, string, int) {
	t.Helper()
	e := etcdtest.Start(t, "")
	s := store.New(e.Client(t))
	if _, err := registry.InitCluster(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(api.UnimplementedInterceptor))
	api.Register(srv, &api.ClusterServer{Store: s})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	return func(args ...string) (string, string, int) {
		var out, errOut bytes.Buffer
		code := Execute(context.Background(), append([]string{"--endpoint", l.Addr().String()}, args...), &out, &errOut)
		return out.String(), errOut.String(), code
	}
}

func TestNetAndPortCommands(t *testing.T) {
	run := cliAgainstAPI(t)
	mustRun := func(args ...string) string {
		t.Helper()
		out, errOut, code := run(args...)
		if code != 0 {
			t.Fatalf("basalt %s: exit %d: %s", strings.Join(args, " "), code, errOut)
		}
		return out
	}
	out := mustRun("net", "create", "red", "--tenant", "acme", "--subnet", "10.0.0.0/24", "--nat")
	if !strings.Contains(out, "network red created: tenant acme, VNI 1, subnets 10.0.0.0/24, gateway 10.0.0.1 (nat)") {
		t.Fatalf("net create printed %q", out)
	}
	out = mustRun("port", "create", "red", "web1", "--ip", "10.0.0.5", "--host", "netd-h1", "--mac", "52:54:00:00:00:05",
		"--acl", "ssh=in,allow,tcp,10.0.0.0/24,22", "--acl", "in,deny,tcp", "--max-bandwidth", "100M", "--no-dhcp-guard")
	if !strings.Contains(out, "port red/web1 created: MAC 52:54:00:00:00:05, addresses 10.0.0.5, tap bt") {
		t.Fatalf("port create printed %q", out)
	}
	var js struct {
		Tap    string `json:"tap"`
		Policy struct {
			SpoofGuard bool              `json:"spoof_guard"`
			DhcpGuard  bool              `json:"dhcp_guard"`
			ACL        []json.RawMessage `json:"acl"`
			Max        string            `json:"bandwidth_max_bps"`
		} `json:"policy"`
	}
	if err := json.Unmarshal([]byte(mustRun("port", "get", "red", "web1", "-o", "json")), &js); err != nil {
		t.Fatalf("port get -o json is not JSON: %v", err)
	}
	if !js.Policy.SpoofGuard || js.Policy.DhcpGuard || len(js.Policy.ACL) != 2 || js.Policy.Max != "100000000" || js.Tap == "" {
		t.Fatalf("port get -o json = %+v", js)
	}
	get := mustRun("port", "get", "red", "web1")
	for _, want := range []string{"Spoofing guard:  on", "DHCP guard:      off", "ssh=in,allow,tcp,10.0.0.0/24,22", "  in,deny,tcp\n", "max 100Mbit/s, min none"} {
		if !strings.Contains(get, want) {
			t.Errorf("port get lacks %q:\n%s", want, get)
		}
	}
	// set changes only what it names.
	mustRun("port", "set", "red", "web1", "--host", "netd-h2", "--isolated")
	get = mustRun("port", "get", "red", "web1")
	for _, want := range []string{"Host:            netd-h2", "Isolation:       isolated", "ssh=in,allow,tcp,10.0.0.0/24,22", "DHCP guard:      off", "max 100Mbit/s"} {
		if !strings.Contains(get, want) {
			t.Errorf("after set, port get lacks %q:\n%s", want, get)
		}
	}
	if list := mustRun("port", "list", "--host", "netd-h2"); !strings.Contains(list, "web1") || !strings.Contains(list, "isolated,acl:2,max:100Mbit/s") {
		t.Errorf("port list --host netd-h2:\n%s", list)
	}

	// Bad input: precise errors, exit codes, and nothing written.
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"port", "create", "red", "web2", "--acl", "in,alow,tcp"}, 2, `--acl: rule "in,alow,tcp", field 2 "alow": the action must be allow or deny`},
		{[]string{"port", "create", "red", "web2", "--ip", "10.0.0.5"}, 1, `address 10.0.0.5 is already used by port "web1" in network "red"`},
		{[]string{"port", "create", "red", "web2", "--mac", "52:54:00:00:00:05"}, 1, `MAC 52:54:00:00:00:05 is already used by port "web1"`},
		{[]string{"port", "create", "red", "web2", "--max-bandwidth", "fast"}, 2, `--max-bandwidth: "fast" is not a positive bit rate`},
		{[]string{"net", "create", "blue", "--tenant", "x", "--vni", "1"}, 1, `VNI 1 is already used by network "red"`},
		{[]string{"net", "create", "blue", "--tenant", "x", "--subnet", "10.0.0.0/16", "--subnet", "10.0.1.0/24"}, 1, "subnets 10.0.0.0/16 and 10.0.1.0/24 overlap"},
		{[]string{"net", "delete", "red"}, 1, `network "red" still has ports (web1)`},
		{[]string{"port", "counters", "red", "web1"}, 1, `bound to host "netd-h2", where no netd is registered`},
		{[]string{"port", "set", "red", "web1"}, 2, "nothing to change"},
	} {
		_, errOut, code := run(tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.want) {
			t.Errorf("basalt %s: exit %d, %q; want exit %d and %q", strings.Join(tc.args, " "), code, errOut, tc.code, tc.want)
		}
	}
	if list := mustRun("port", "list"); strings.Contains(list, "web2") {
		t.Fatalf("a refused create left a port behind:\n%s", list)
	}
	mustRun("port", "delete", "red", "web1")
	mustRun("net", "delete", "red")
	if list := mustRun("net", "list"); strings.Contains(list, "red") {
		t.Fatalf("net list after delete:\n%s", list)
	}
}
