package nbdclient

import "testing"

func TestParseURI(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want URI
	}{
		{"nbd://127.0.0.1:7411/disk0", URI{"tcp", "127.0.0.1:7411", "disk0"}},
		{"nbd://localhost/disk0@before-upgrade", URI{"tcp", "localhost:10809", "disk0@before-upgrade"}},
		{"nbd://[::1]:7000/", URI{"tcp", "[::1]:7000", ""}},
		{"nbd://host:1/a%20b", URI{"tcp", "host:1", "a b"}},
		{"nbd+unix:///disk0?socket=/run/basalt/blockd-1/nbd.sock", URI{"unix", "/run/basalt/blockd-1/nbd.sock", "disk0"}},
		// '+' stays a '+', and the escapes Basalt's API writes are undone.
		{"nbd+unix:///v?socket=/tmp/a+b%20c%26d%23e%25f.sock", URI{"unix", "/tmp/a+b c&d#e%f.sock", "v"}},
		{"nbd+unix:///?socket=/s&other=1", URI{"unix", "/s", ""}},
	} {
		got, err := ParseURI(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseURI(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
			continue
		}
		back, err := ParseURI(got.String())
		if err != nil || back != got {
			t.Errorf("ParseURI(%q.String() = %q) = %+v, %v; want %+v", tc.in, got.String(), back, err, got)
		}
	}
	for _, bad := range []string{"", "disk0", "/tmp/sock", "nbd:///disk0", "nbd+unix:///disk0", "nbd+unix://host/disk0?socket=/s",
		"nbds://host/disk0", "http://host/disk0", "nbd://host:port/x"} {
		if u, err := ParseURI(bad); err == nil {
			t.Errorf("ParseURI(%q) = %+v, want an error", bad, u)
		}
	}
}
