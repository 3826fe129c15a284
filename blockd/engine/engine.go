package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Options configure an Engine. The zero value is usable.
type Options struct {
	// SegmentSize is the size at which the head segment is sealed and a
	// new one started. Default 256 MiB; at least 64 KiB, at most 4 GiB.
	// It may change between runs.
	SegmentSize int64
	// GCThreshold: a sealed segment whose live ratio (live bytes / size)
	// is below it is compacted. Default 0.5, which bounds space
	// amplification at 2x and write amplification at 1 copied byte per
	// freed byte. Must be in (0, 1].
	GCThreshold float64
	// GCInterval is how often the background collector looks for work
	// (it also wakes when a segment is sealed). Default 30 s; negative
	// disables background collection (Compact still works).
	GCInterval time.Duration
	// GCRate limits the bytes per second the background collector copies,
	// so client I/O keeps the device. Default 64 MiB/s; negative means
	// unlimited. Compact ignores it.
	GCRate int64
	// Logger receives recovery, collection and corruption reports, never
	// one line per request. Default: discard.
	Logger *slog.Logger
}

func (o *Options) setDefaults() error {
	if o.SegmentSize == 0 {
		o.SegmentSize = 256 << 20
	}
	if o.SegmentSize < 64<<10 || o.SegmentSize > 4<<30 {
		return fmt.Errorf("engine: segment size %d out of [64 KiB, 4 GiB]: %w", o.SegmentSize, ErrInvalid)
	}
	if o.GCThreshold == 0 {
		o.GCThreshold = 0.5
	}
	if !(o.GCThreshold > 0 && o.GCThreshold <= 1) {
		return fmt.Errorf("engine: GC threshold %v out of (0, 1]: %w", o.GCThreshold, ErrInvalid)
	}
	if o.GCInterval == 0 {
		o.GCInterval = 30 * time.Second
	}
	if o.GCRate == 0 {
		o.GCRate = 64 << 20
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return nil
}

// WriteOptions qualify a Write or Trim.
type WriteOptions struct {
	// Version is the object's version after this write, assigned by the
	// replication layer's primary; the object's version becomes the
	// maximum of the versions written to it.
	Version uint64
	// Sync (FUA) makes the call return only once the write is durable.
	Sync bool
	// Layer is the write's layer tag: the id of the volume's newest
	// checkpoint when the write was made, 0 if none (see docs/engine.md,
	// Layers). Writes to an object normally come with non-decreasing tags,
	// but the engine does not rely on it: a write with tag t goes into the
	// effective layer of t whatever the object's other layers are, and
	// within a layer the record with the higher (tag, sequence number)
	// wins.
	Layer uint32
	// Opaque (Trim only): the trimmed range must read as zeros even over
	// what lies beneath this object (a linked clone's parent), so the trim
	// records zero extents even in layer 0 and even if the engine holds
	// nothing of the object (the trim then creates the object and records
	// its version).
	Opaque bool
}

// Extent is a run of an object's address space that holds data, is a zero
// extent (Zero: explicit zeros recorded by a trim, which hide lower layers
// and whatever lies beneath the object) or is a hole (Hole: absent from
// every layer of the view; reads as zeros, takes no space, and may be
// filled by the caller from elsewhere, such as a linked clone's parent).
type Extent struct {
	Offset, Length int64
	Hole, Zero     bool
}

// Stats is a snapshot of the engine's counters.
type Stats struct {
	Segments  int   // segment files
	DiskBytes int64 // bytes of all segments
	LiveBytes int64 // bytes of data blocks reachable through the index, all layers
	Objects   int   // objects holding data or zero extents
	Extents   int   // index entries (data and zero extents, all layers)
	LastSeq   uint64

	SyncRequests uint64 // Sync calls and FUA writes that needed a sync
	Syncs        uint64 // fdatasync calls made for them (group commit)

	GCSegments uint64 // segments removed by the collector
	GCBytes    uint64 // bytes of live data the collector copied
}

// Engine is the local storage engine of one blockd node. It is safe for
// concurrent use.
type Engine struct {
	dir  string
	opts Options
	log  *slog.Logger
	lock *os.File // flock on dir/LOCK

	maxRecBlocks uint32

	// closeMu is held for reading by every call for its duration, and for
	// writing by Close.
	closeMu sync.RWMutex
	closed  bool

	// appendMu serialises appends: it owns the head segment, the append
	// offset, the sequence counter and the failure state, and every change
	// of the index happens under it (and under idx).
	appendMu   sync.Mutex
	head       *segment
	headOff    int64
	headDirty  bool // a failed write may have left bytes past headOff
	nextSeq    uint64
	nextSegID  uint32
	appendLSN  uint64 // bytes appended by this process, sync markers excluded
	markerOff  int64  // durable offset recorded by the last sync marker in head
	failed     error
	hdrBuf     []byte
	iov        [][]byte
	crcScratch []uint32

	// idx guards the index and segment accounting; readers hold it for
	// reading only while they look up extents, never during I/O.
	idx sync.RWMutex
	ix  *index
	// deleted maps a deleted volume to the sequence number of its
	// deletion: records of it with lower numbers are dead. Guarded by idx.
	deleted map[uint64]uint64
	tableMu sync.Mutex // serialises writes of the deleted-volumes file

	gs groupSync

	gcMu     sync.Mutex // one collection at a time
	gcBuf    []byte     // copy buffer, under gcMu
	gcKick   chan struct{}
	gcUrgent atomic.Int32 // an explicit Compact is waiting: ignore the rate limit
	bgCtx    context.Context
	bgCancel context.CancelFunc
	bgWG     sync.WaitGroup

	readPool  sync.Pool
	writePool sync.Pool

	statSyncReqs, statSyncs, statGCSegs, statGCBytes atomic.Uint64
}

// Open opens the engine stored in dir, creating it if needed, and recovers
// its state from the log: see docs/engine.md for the procedure.
func Open(dir string, opts Options) (*Engine, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, ioErr("creating directory", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, ioErr("opening lock file", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("engine: %s is in use by another engine: %w", dir, err)
	}
	n := (opts.SegmentSize - segHeaderSize - 2*recHeaderSize - 8) / (BlockSize + 4)
	e := &Engine{
		dir:          dir,
		opts:         opts,
		log:          opts.Logger,
		lock:         lock,
		maxRecBlocks: uint32(min(n, maxRecordBlocks)),
		ix:           newIndex(),
		deleted:      make(map[uint64]uint64),
		nextSeq:      1,
		gcKick:       make(chan struct{}, 1),
	}
	e.hdrBuf = make([]byte, recHeaderSize+4*maxRecordBlocks+8)
	e.readPool.New = func() any { return newReadState() }
	e.writePool.New = func() any { return new(writeState) }
	if err := e.recover(); err != nil {
		e.closeFiles()
		return nil, err
	}
	e.bgCtx, e.bgCancel = context.WithCancel(context.Background())
	if opts.GCInterval > 0 {
		e.bgWG.Add(1)
		go e.gcLoop()
	}
	return e, nil
}

// enter is called at the start of every public call; leave at the end.
func (e *Engine) enter() bool {
	e.closeMu.RLock()
	if e.closed {
		e.closeMu.RUnlock()
		return false
	}
	return true
}

func (e *Engine) leave() { e.closeMu.RUnlock() }

// Close makes everything written durable, stops the collector and closes
// the files. Calls in progress finish first; later calls fail with
// ErrClosed.
func (e *Engine) Close() error {
	e.bgCancel()
	e.bgWG.Wait()
	e.closeMu.Lock()
	defer e.closeMu.Unlock()
	if e.closed {
		return ErrClosed
	}
	e.closed = true
	var err error
	if e.failed == nil {
		// Sync, which appends a sync marker, then sync the marker too so
		// that the next Open verifies no data.
		if _, err = e.doSync(); err == nil {
			if serr := fdatasync(e.head.fd); serr != nil {
				err = ioErr("syncing head segment on close", serr)
			}
		}
	}
	e.closeFiles()
	return err
}

func (e *Engine) closeFiles() {
	e.idx.Lock()
	for _, s := range e.ix.segs {
		s.release()
	}
	e.ix.segs = map[uint32]*segment{}
	e.idx.Unlock()
	if e.lock != nil {
		e.lock.Close() // releases the flock
	}
}

// ObjectVersion returns the version of an object: the highest version
// written or trimmed into it, 0 for an object the engine holds nothing of.
func (e *Engine) ObjectVersion(id ObjectID) uint64 {
	e.idx.RLock()
	defer e.idx.RUnlock()
	if o := e.ix.lookup(id); o != nil {
		return o.version
	}
	return 0
}

// Objects returns the objects of a volume that hold data or zero extents
// in any layer, sorted by index.
func (e *Engine) Objects(volume uint64) []ObjectID {
	e.idx.RLock()
	var ids []ObjectID
	for i, o := range e.ix.vols[volume] {
		if o.held() {
			ids = append(ids, ObjectID{volume, i})
		}
	}
	e.idx.RUnlock()
	slices.SortFunc(ids, func(a, b ObjectID) int { return cmpID(a, b) })
	return ids
}

// AllObjects returns every object that holds data or zero extents in any
// layer, sorted by volume and index.
func (e *Engine) AllObjects() []ObjectID {
	e.idx.RLock()
	var ids []ObjectID
	for v, objs := range e.ix.vols {
		for i, o := range objs {
			if o.held() {
				ids = append(ids, ObjectID{v, i})
			}
		}
	}
	e.idx.RUnlock()
	slices.SortFunc(ids, func(a, b ObjectID) int { return cmpID(a, b) })
	return ids
}

// KnownObjects returns every object the engine holds a version for, sorted: those holding data and those
// trimmed whole, which hold nothing but keep their version so that replicas can tell a trim from a write they
// missed. (A version kept only in memory for an object trimmed whole is lost on restart if the collector has
// dropped the trim record; see docs/engine.md.)
func (e *Engine) KnownObjects() []ObjectID {
	e.idx.RLock()
	var ids []ObjectID
	for v, objs := range e.ix.vols {
		for i, o := range objs {
			if o.held() || o.version > 0 {
				ids = append(ids, ObjectID{v, i})
			}
		}
	}
	e.idx.RUnlock()
	slices.SortFunc(ids, func(a, b ObjectID) int { return cmpID(a, b) })
	return ids
}

func cmpID(a, b ObjectID) int {
	switch {
	case a.less(b):
		return -1
	case b.less(a):
		return 1
	}
	return 0
}

// Stats returns a snapshot of the engine's counters.
func (e *Engine) Stats() Stats {
	e.idx.RLock()
	st := Stats{
		Segments: len(e.ix.segs),
		Objects:  e.ix.nobjs,
		Extents:  e.ix.nextents,
	}
	for _, s := range e.ix.segs {
		st.DiskBytes += s.size.Load()
		st.LiveBytes += s.liveBlocks * BlockSize
	}
	e.idx.RUnlock()
	e.appendMu.Lock()
	st.LastSeq = e.nextSeq - 1
	e.appendMu.Unlock()
	st.SyncRequests = e.statSyncReqs.Load()
	st.Syncs = e.statSyncs.Load()
	st.GCSegments = e.statGCSegs.Load()
	st.GCBytes = e.statGCBytes.Load()
	return st
}

// checkRange validates an offset and length within an object.
func checkRange(off, n int64) error {
	if off < 0 || n < 0 || off%SectorSize != 0 || n%SectorSize != 0 || off+n > ObjectSize {
		return ErrInvalid
	}
	return nil
}

func ctxErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return context.Cause(ctx)
	}
	return nil
}

var errNoRoom = errors.New("no room in head segment")
