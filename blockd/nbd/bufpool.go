package nbd

import (
	"math/bits"
	"sync"
)

// hdrRoom is the space kept in front of every pooled buffer so that a read
// reply's header can be written in front of the data and the whole reply
// sent with one write call, without copying the data.
const hdrRoom = 32

const (
	minPoolShift   = 12 // 4 KiB
	numPoolClasses = 14 // 4 KiB .. 32 MiB (DefaultMaxBlockSize)
)

// bufPool recycles request and reply buffers by power-of-two size class, so
// that a steady stream of I/O allocates nothing. The zero value is ready to
// use.
type bufPool struct {
	classes [numPoolClasses]sync.Pool
}

func poolClass(n int) int {
	if n <= 1<<minPoolShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minPoolShift
}

// get returns a buffer whose length is at least hdrRoom+n.
func (p *bufPool) get(n int) *[]byte {
	c := poolClass(n)
	if c >= numPoolClasses {
		b := make([]byte, hdrRoom+n)
		return &b
	}
	if b, ok := p.classes[c].Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, hdrRoom+1<<(minPoolShift+c))
	return &b
}

// put recycles a buffer obtained from get.
func (p *bufPool) put(b *[]byte) {
	n := cap(*b) - hdrRoom
	c := poolClass(n)
	if c >= numPoolClasses || n != 1<<(minPoolShift+c) {
		return
	}
	*b = (*b)[:cap(*b)]
	p.classes[c].Put(b)
}
