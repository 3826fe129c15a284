// Command basalt-flowcount is an example netd extension (docs/netd.md, "Extensions"): placed in the path of a
// port, it passes every frame on unchanged and counts packets and bytes per flow (direction, protocol,
// addresses and ports; non-IP frames per EtherType). Every second, and when it stops, it writes the table to
// flows.json in its state directory. Configure it on netd with --extension flowcount=/path/to/basalt-flowcount
// and put it on a port with 'basalt port set NETWORK PORT --extension flowcount'.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/basalt-hv/basalt/netd/extension/filter"
)

// Flow identifies a flow in one direction.
type Flow struct {
	Dir   string `json:"dir"`
	Proto string `json:"proto"`
	Src   string `json:"src,omitempty"`
	Dst   string `json:"dst,omitempty"`
	Sport uint16 `json:"sport,omitempty"`
	Dport uint16 `json:"dport,omitempty"`
}

// Count is a flow's counters.
type Count struct {
	Flow
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// Report is the content of flows.json.
type Report struct {
	Port    string    `json:"port"`
	Updated time.Time `json:"updated"`
	Flows   []Count   `json:"flows"`
}

type table struct {
	mu    sync.Mutex
	flows map[Flow]*Count
}

func (t *table) add(f Flow, n int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := t.flows[f]
	if c == nil {
		c = &Count{Flow: f}
		t.flows[f] = c
	}
	c.Packets++
	c.Bytes += uint64(n)
}

func (t *table) report(port string) Report {
	t.mu.Lock()
	defer t.mu.Unlock()
	r := Report{Port: port, Updated: time.Now().UTC(), Flows: make([]Count, 0, len(t.flows))}
	for _, c := range t.flows {
		r.Flows = append(r.Flows, *c)
	}
	sort.Slice(r.Flows, func(i, j int) bool { return r.Flows[i].Bytes > r.Flows[j].Bytes })
	return r
}

var protoNames = map[byte]string{1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}

// classify reads a frame's flow. It never fails: what it cannot read is counted by EtherType.
func classify(dir filter.Direction, b []byte) Flow {
	f := Flow{Dir: dir.String(), Proto: "short"}
	if len(b) < 14 {
		return f
	}
	et := binary.BigEndian.Uint16(b[12:14])
	l3 := b[14:]
	var proto byte
	var l4 []byte
	switch {
	case et == 0x0800 && len(l3) >= 20:
		ihl := int(l3[0]&0x0f) * 4
		proto = l3[9]
		f.Src = netip.AddrFrom4([4]byte(l3[12:16])).String()
		f.Dst = netip.AddrFrom4([4]byte(l3[16:20])).String()
		if ihl >= 20 && len(l3) >= ihl {
			l4 = l3[ihl:]
		}
	case et == 0x86dd && len(l3) >= 40:
		proto = l3[6]
		f.Src = netip.AddrFrom16([16]byte(l3[8:24])).String()
		f.Dst = netip.AddrFrom16([16]byte(l3[24:40])).String()
		l4 = l3[40:]
	case et == 0x0806:
		f.Proto = "arp"
		return f
	default:
		f.Proto = fmt.Sprintf("ethertype-0x%04x", et)
		return f
	}
	f.Proto = protoNames[proto]
	if f.Proto == "" {
		f.Proto = fmt.Sprintf("ip-%d", proto)
	}
	if (proto == 6 || proto == 17) && len(l4) >= 4 {
		f.Sport, f.Dport = binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4])
	}
	return f
}

// write replaces flows.json atomically, so a reader never sees half a file.
func write(dir string, r Report) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, ".flows.json.tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, "flows.json"))
}

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	port, err := filter.Open()
	if err != nil {
		fmt.Fprintln(os.Stderr, "basalt-flowcount:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	t := &table{flows: map[Flow]*Count{}}
	go func() {
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				if err := write(port.StateDir, t.report(port.Name)); err != nil {
					log.Error("write flows", "err", err)
				}
			}
		}
	}()
	log.Info("counting flows", "port", port.Name)
	err = port.Run(ctx, func(dir filter.Direction, frame []byte) filter.Verdict {
		t.add(classify(dir, frame), len(frame))
		return filter.Pass
	})
	if werr := write(port.StateDir, t.report(port.Name)); werr != nil {
		log.Error("write flows", "err", werr)
	}
	if err != nil && ctx.Err() == nil {
		log.Error("port failed", "err", err)
		os.Exit(1)
	}
}
