package schema

import (
	"strings"
	"testing"
)

func TestValidateName(t *testing.T) {
	for _, ok := range []string{"a", "blockd-1", "n0.rack_2", strings.Repeat("x", MaxNameLen)} {
		if err := ValidateName("node", ok); err != nil {
			t.Errorf("ValidateName(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-a", ".a", "A", "a b", "a/b", "é", strings.Repeat("x", MaxNameLen+1)} {
		if err := ValidateName("node", bad); err == nil {
			t.Errorf("ValidateName(%q) accepted", bad)
		}
	}
}
