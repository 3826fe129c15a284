package daemon

import "testing"

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"512": 512, "4K": 4 << 10, "16G": 16 << 30, "2t": 2 << 40, " 64M ": 64 << 20} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "G", "0", "-1G", "1.5G", "12X"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) accepted", in)
		}
	}
}

func TestHostMemory(t *testing.T) {
	n, err := hostMemory()
	if err != nil || n < 64<<20 {
		t.Fatalf("host memory %d, %v", n, err)
	}
}
