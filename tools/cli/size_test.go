package cli

import "testing"

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{
		"4096": 4096, "512K": 512 << 10, "20G": 20 << 30, "20GiB": 20 << 30, "20gb": 20 << 30, "1.5T": 3 << 39, "1P": 1 << 50,
	} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "G", "-1G", "0", "1.5", "1GG", "10X", "1K2", "9E"} {
		if got, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", bad, got)
		}
	}
	for n, want := range map[uint64]string{4096: "4KiB", 1 << 50: "1PiB", 3 << 29: "1536MiB", 1000: "1000 B"} {
		if got := sizeString(n); got != want {
			t.Errorf("sizeString(%d) = %q, want %q", n, got, want)
		}
	}
}
