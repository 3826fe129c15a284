package testguest

import (
	"testing"

	"github.com/basalt-hv/basalt/computed/hypervisor"
	"github.com/basalt-hv/basalt/computed/testguest/record"
)

// TestBeatFormat: a heartbeat line parses back to its fields, other lines do not parse, and the agent looks for
// the port name the drivers give the channel.
func TestBeatFormat(t *testing.T) {
	line := record.BeatLine(7, 0x0123456789abcdef)
	if line != "BASALT beat seq=7 boot=0123456789abcdef\n" {
		t.Fatalf("BeatLine = %q", line)
	}
	seq, boot, err := record.ParseBeat(line)
	if err != nil || seq != 7 || boot != 0x0123456789abcdef {
		t.Fatalf("ParseBeat(%q) = %d, %x, %v", line, seq, boot, err)
	}
	for _, bad := range []string{"", "BASALT rec seq=1 boot=1", "BASALT beat seq=x boot=1", "BASALT beat seq=1 boot=zz", "BASALT beat seq=1"} {
		if _, _, err := record.ParseBeat(bad); err == nil {
			t.Errorf("ParseBeat(%q) accepted", bad)
		}
	}
	if record.AgentPort != hypervisor.AgentPort {
		t.Fatalf("the agent looks for port %q, the drivers name it %q", record.AgentPort, hypervisor.AgentPort)
	}
}
