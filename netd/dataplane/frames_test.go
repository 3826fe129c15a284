package dataplane

// Raw Ethernet frames for the tests: a sender and a capture on AF_PACKET sockets
// created inside a VM's namespace.

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func htons(v uint16) uint16 { return v<<8 | v>>8 }

var broadcast = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

func ethHeader(dst, src net.HardwareAddr, typ uint16) []byte {
	b := make([]byte, 0, 14)
	b = append(b, dst...)
	b = append(b, src...)
	return binary.BigEndian.AppendUint16(b, typ)
}

// arpFrame is an ARP packet (op 1 request, 2 reply) in an Ethernet frame.
func arpFrame(src net.HardwareAddr, op uint16, sha net.HardwareAddr, spa netip.Addr, tha net.HardwareAddr, tpa netip.Addr) []byte {
	b := ethHeader(broadcast, src, etherARP)
	b = append(b, 0, 1, 8, 0, 6, 4)
	b = binary.BigEndian.AppendUint16(b, op)
	b = append(b, sha...)
	b = append(b, spa.AsSlice()...)
	b = append(b, tha...)
	b = append(b, tpa.AsSlice()...)
	return b
}

func csum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}

// udpFrame is an IPv4/UDP datagram in an Ethernet frame.
func udpFrame(dstMAC, srcMAC net.HardwareAddr, src, dst netip.Addr, sport, dport uint16, payload []byte) []byte {
	udp := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], sport)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	udp = append(udp, payload...)
	ip := make([]byte, 20)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(udp)))
	ip[8] = 64
	ip[9] = ipprotoUDP
	copy(ip[12:], src.AsSlice())
	copy(ip[16:], dst.AsSlice())
	binary.BigEndian.PutUint16(ip[10:], csum(ip))
	pseudo := append(append(append([]byte{}, ip[12:20]...), 0, ipprotoUDP), byte(len(udp)>>8), byte(len(udp)))
	binary.BigEndian.PutUint16(udp[6:], csum(append(pseudo, udp...)))
	return append(append(ethHeader(dstMAC, srcMAC, etherIPv4), ip...), udp...)
}

// dhcpOffer is a minimal BOOTREPLY (op 2) such as a DHCP server sends to a client.
func dhcpOffer(server net.HardwareAddr, serverIP netip.Addr) []byte {
	p := make([]byte, 240)
	p[0], p[1], p[2] = 2, 1, 6 // BOOTREPLY, Ethernet, hlen 6
	copy(p[16:], []byte{10, 0, 0, 77})
	copy(p[20:], serverIP.AsSlice())
	copy(p[28:], []byte{0x52, 0x54, 0, 0xee, 0xee, 0xee})
	copy(p[236:], []byte{99, 130, 83, 99}) // magic cookie
	p = append(p, 53, 1, 2, 255)           // DHCPOFFER, end
	return udpFrame(broadcast, server, serverIP, netip.MustParseAddr("255.255.255.255"), 67, 68, p)
}

func (v *vm) ifindex(t *testing.T) int {
	t.Helper()
	l, err := v.h.LinkByName("eth0")
	must(t, err, "vm eth0")
	return l.Attrs().Index
}

func (v *vm) packetSocket(t *testing.T) int {
	t.Helper()
	var fd int
	var err error
	v.withNS(t, func() {
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	})
	must(t, err, "packet socket")
	return fd
}

// send transmits a raw frame on the VM's eth0.
func (v *vm) send(t *testing.T, frame []byte) {
	t.Helper()
	fd := v.packetSocket(t)
	defer unix.Close(fd)
	sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: v.ifindex(t), Halen: 6}
	copy(sa.Addr[:], frame[:6])
	must(t, unix.Sendto(fd, frame, 0, sa), "send frame")
}

type capture struct {
	fd     int
	stop   atomic.Bool
	wg     sync.WaitGroup
	mu     sync.Mutex
	frames [][]byte
}

// startCapture records every frame the VM's eth0 receives until stop.
func (v *vm) startCapture(t *testing.T) *capture {
	t.Helper()
	fd := v.packetSocket(t)
	sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: v.ifindex(t)}
	must(t, unix.Bind(fd, sa), "bind packet socket")
	must(t, unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 50000}), "rcvtimeo")
	c := &capture{fd: fd}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		buf := make([]byte, 65536)
		for !c.stop.Load() {
			n, from, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
					continue
				}
				return
			}
			if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
				continue
			}
			c.mu.Lock()
			c.frames = append(c.frames, append([]byte(nil), buf[:n]...))
			c.mu.Unlock()
		}
	}()
	t.Cleanup(func() { c.close() })
	return c
}

func (c *capture) close() {
	if c.stop.Swap(true) {
		return
	}
	c.wg.Wait()
	unix.Close(c.fd)
}

// count stops the capture (after a grace period for frames in flight) and returns
// how many frames matched.
func (c *capture) count(match func([]byte) bool) int {
	time.Sleep(200 * time.Millisecond)
	c.close()
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, f := range c.frames {
		if match(f) {
			n++
		}
	}
	return n
}

func isARPFrom(spa netip.Addr) func([]byte) bool {
	return func(f []byte) bool {
		return len(f) >= 42 && binary.BigEndian.Uint16(f[12:]) == etherARP && netip.AddrFrom4([4]byte(f[28:32])) == spa
	}
}

func isIPv4From(src netip.Addr) func([]byte) bool {
	return func(f []byte) bool {
		return len(f) >= 34 && binary.BigEndian.Uint16(f[12:]) == etherIPv4 && netip.AddrFrom4([4]byte(f[26:30])) == src
	}
}

func isUDPPorts(sport, dport uint16) func([]byte) bool {
	return func(f []byte) bool {
		if len(f) < 42 || binary.BigEndian.Uint16(f[12:]) != etherIPv4 || f[23] != ipprotoUDP {
			return false
		}
		ihl := int(f[14]&0xf) * 4
		return len(f) >= 14+ihl+4 && binary.BigEndian.Uint16(f[14+ihl:]) == sport && binary.BigEndian.Uint16(f[14+ihl+2:]) == dport
	}
}

func isFromMAC(mac net.HardwareAddr) func([]byte) bool {
	return func(f []byte) bool { return len(f) >= 14 && net.HardwareAddr(f[6:12]).String() == mac.String() }
}
