package engine

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The crash test re-executes the test binary as a child that writes to an
// engine from several goroutines and reports each operation on stdout as
// it is issued (I), completed (C) and acknowledged durable (F: a FUA
// write, S: a Sync covering every earlier operation of the goroutine). The
// parent SIGKILLs it at a random moment, reopens the engine and checks
// every sector: it must hold what the last completed operation on it
// wrote, or what an operation in flight at the kill wrote, and nothing may
// read back as corrupt. (After SIGKILL the page cache survives, so even
// completed writes that were not synced must survive; acknowledged ones
// are a subset.) Each sector carries the number of the operation that
// wrote it, so the parent can tell where it came from.

const (
	crashEnvDir  = "BASALT_ENGINE_CRASH_DIR"
	crashEnvMode = "BASALT_ENGINE_CRASH_MODE"
	crashEnvBase = "BASALT_ENGINE_CRASH_BASE"
	crashEnvTag  = "BASALT_ENGINE_CRASH_TAG" // layered modes: the newest checkpoint so far
	crashWorkers = 4
	crashObjs    = 2 // objects per worker
)

func TestMain(m *testing.M) {
	if dir := os.Getenv(crashEnvDir); dir != "" {
		base, _ := strconv.ParseUint(os.Getenv(crashEnvBase), 10, 64)
		tag, _ := strconv.ParseUint(os.Getenv(crashEnvTag), 10, 32)
		crashChild(dir, os.Getenv(crashEnvMode), base, uint32(tag))
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func crashOpts() Options {
	return Options{SegmentSize: 256 << 10, GCInterval: -1, GCThreshold: 0.6}
}

func crashObj(worker, i int) ObjectID {
	return ObjectID{Volume: 9, Index: uint64(worker*crashObjs + i)}
}

// sectorContent fills a sector written by operation w at sector s of
// object idx.
func sectorContent(p []byte, w uint64, idx uint64, s int64) {
	le := binary.LittleEndian
	le.PutUint64(p[0:], w)
	le.PutUint64(p[8:], idx<<32|uint64(s))
	x := w*0x9e3779b97f4a7c15 ^ (idx<<32 | uint64(s)) ^ 0xdeadbeef
	for i := 16; i < SectorSize; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		le.PutUint64(p[i:], x)
	}
}

// decodeSector returns the operation that wrote a sector (0: zeros).
func decodeSector(p []byte, idx uint64, s int64) (uint64, error) {
	if isZero(p) {
		return 0, nil
	}
	w := binary.LittleEndian.Uint64(p)
	var want [SectorSize]byte
	sectorContent(want[:], w, idx, s)
	if string(want[:]) != string(p) {
		return 0, fmt.Errorf("object %d sector %d: content matches no operation (tag %d)", idx, s, w)
	}
	return w, nil
}

type crashOp struct {
	w      uint64
	worker int
	trim   bool
	opaque bool // a trim with Opaque (layered modes)
	clear  bool // ClearObject (layered modes): every sector of every view becomes zeros
	obj    int
	off, n int64
	tag    uint32 // the layer (layered modes)
}

func (o crashOp) line() string {
	k := "W"
	switch {
	case o.clear:
		k = "C"
	case o.opaque:
		k = "O"
	case o.trim:
		k = "T"
	}
	return fmt.Sprintf("I %d %d %s %d %d %d %d\n", o.worker, o.w, k, o.obj, o.off, o.n, o.tag)
}

// value is what the operation leaves in the sectors it covers.
func (o crashOp) value() uint64 {
	if o.trim || o.clear {
		return 0
	}
	return o.w
}

// crashChild runs the child. In the layered modes ("layers-" followed by
// the kill event, or "write") every operation carries the newest
// checkpoint as its layer tag, a goroutine creates checkpoints and deletes
// older ones (reported as DI, issued, and DC, completed), trims are
// sometimes opaque and ClearObject is sometimes called.
func crashChild(dir, mode string, base uint64, newestTag uint32) {
	layered := strings.HasPrefix(mode, "layers-")
	mode = strings.TrimPrefix(mode, "layers-")
	e, err := Open(dir, crashOpts())
	if err != nil {
		fmt.Fprintf(os.Stderr, "child open: %v\n", err)
		os.Exit(2)
	}
	var outMu sync.Mutex
	say := func(s string) {
		outMu.Lock()
		os.Stdout.WriteString(s)
		outMu.Unlock()
	}
	ctx := context.Background()
	if mode != "write" || layered {
		testHook = func(event string) {
			if event == mode {
				say("H " + event + "\n")
				time.Sleep(20 * time.Millisecond)
			}
		}
		go func() {
			for {
				if err := e.Compact(ctx); err != nil {
					fmt.Fprintf(os.Stderr, "child compact: %v\n", err)
					os.Exit(2)
				}
			}
		}()
	}
	var newest atomic.Uint32
	newest.Store(newestTag)
	if layered {
		go func() {
			r := rand.New(rand.NewPCG(base, 99))
			for {
				time.Sleep(time.Duration(10+r.IntN(30)) * time.Millisecond)
				c := newest.Add(1)
				say(fmt.Sprintf("K %d\n", c))
				if r.IntN(3) == 0 {
					continue
				}
				d := 1 + uint32(r.IntN(int(c)))
				say(fmt.Sprintf("DI %d\n", d))
				if err := e.DeleteCheckpoint(ctx, crashObj(0, 0).Volume, d); err != nil {
					fmt.Fprintf(os.Stderr, "child delete checkpoint: %v\n", err)
					os.Exit(2)
				}
				say(fmt.Sprintf("DC %d\n", d))
			}
		}()
	}
	say("READY\n")
	for g := range crashWorkers {
		go func() {
			r := rand.New(rand.NewPCG(base, uint64(g)))
			buf := make([]byte, 64<<10)
			for n := uint64(1); ; n++ {
				o := crashOp{w: base + uint64(g)*1_000_000 + n, worker: g, obj: r.IntN(crashObjs)}
				o.n = int64(1+r.IntN(len(buf)/SectorSize)) * SectorSize
				if r.IntN(3) == 0 {
					o.n = int64(1+r.IntN(4)) * SectorSize
				}
				o.off = min(int64(r.IntN(ObjectSize/SectorSize))*SectorSize, ObjectSize-o.n)
				o.trim = r.IntN(8) == 0
				if layered {
					o.tag = newest.Load()
					o.opaque = o.trim && r.IntN(3) == 0
					o.clear = r.IntN(60) == 0
				}
				fua := r.IntN(3) == 0
				id := crashObj(g, o.obj)
				say(o.line())
				wo := WriteOptions{Version: o.w, Sync: fua, Layer: o.tag, Opaque: o.opaque}
				if o.clear {
					err = e.ClearObject(ctx, id, wo)
				} else if o.trim {
					err = e.Trim(ctx, id, o.off, o.n, wo)
				} else {
					p := buf[:o.n]
					for s := int64(0); s < o.n/SectorSize; s++ {
						sectorContent(p[s*SectorSize:], o.w, id.Index, o.off/SectorSize+s)
					}
					err = e.Write(ctx, id, o.off, p, wo)
				}
				if err != nil {
					fmt.Fprintf(os.Stderr, "child op %d: %v\n", o.w, err)
					os.Exit(2)
				}
				say(fmt.Sprintf("C %d %d\n", g, o.w))
				if fua {
					say(fmt.Sprintf("F %d %d\n", g, o.w))
				} else if r.IntN(6) == 0 {
					if err := e.Sync(ctx); err != nil {
						fmt.Fprintf(os.Stderr, "child sync: %v\n", err)
						os.Exit(2)
					}
					say(fmt.Sprintf("S %d %d\n", g, o.w))
				}
			}
		}()
	}
	select {}
}

// crashReport is what a child reported before it was killed.
type crashReport struct {
	issued    map[uint64]crashOp
	completed map[uint64]bool
	acked     []uint64 // per worker: every op up to this is durable (Sync)
	fua       map[uint64]bool
	// Layered modes: the highest checkpoint seen, and the checkpoint
	// deletions issued and completed.
	newest             uint32
	delIssued, delDone map[uint32]bool
}

// crashRound runs one child until it is killed and returns its report.
func crashRound(t *testing.T, dir, mode string, base uint64, r *rand.Rand, newest uint32) crashReport {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashEnvDir+"="+dir, crashEnvMode+"="+mode, crashEnvBase+"="+strconv.FormatUint(base, 10),
		crashEnvTag+"="+strconv.FormatUint(uint64(newest), 10))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1<<16)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	rep := crashReport{issued: map[uint64]crashOp{}, completed: map[uint64]bool{}, fua: map[uint64]bool{},
		acked: make([]uint64, crashWorkers), newest: newest, delIssued: map[uint32]bool{}, delDone: map[uint32]bool{}}
	parse := func(l string) {
		f := strings.Fields(l)
		num := func(i int) uint64 {
			v, err := strconv.ParseUint(f[i], 10, 64)
			if err != nil {
				t.Fatalf("bad line %q", l)
			}
			return v
		}
		switch f[0] {
		case "I":
			o := crashOp{worker: int(num(1)), w: num(2), trim: f[3] == "T" || f[3] == "O", opaque: f[3] == "O", clear: f[3] == "C",
				obj: int(num(4)), off: int64(num(5)), n: int64(num(6)), tag: uint32(num(7))}
			rep.issued[o.w] = o
			rep.newest = max(rep.newest, o.tag)
		case "C":
			rep.completed[num(2)] = true
		case "F":
			rep.fua[num(2)] = true
		case "S":
			rep.acked[num(1)] = max(rep.acked[num(1)], num(2))
		case "K":
			rep.newest = max(rep.newest, uint32(num(1)))
		case "DI":
			rep.delIssued[uint32(num(1))] = true
			rep.newest = max(rep.newest, uint32(num(1)))
		case "DC":
			rep.delDone[uint32(num(1))] = true
		}
	}
	var deadline <-chan time.Time
	killed := false
	hooks := 1 + r.IntN(6) // kill at this hook event
	kill := func() {
		if !killed {
			killed = true
			cmd.Process.Signal(syscall.SIGKILL)
		}
	}
	timeout := time.After(20 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				err := cmd.Wait()
				if !killed {
					t.Fatalf("child exited by itself: %v\n%s", err, stderr.String())
				}
				return rep
			}
			switch {
			case l == "READY":
				if strings.HasSuffix(mode, "write") {
					deadline = time.After(time.Duration(30+r.IntN(250)) * time.Millisecond)
				}
			case strings.HasPrefix(l, "H "):
				// The collector is inside the window we want: kill it there.
				if hooks--; hooks == 0 {
					time.Sleep(time.Duration(r.IntN(5)) * time.Millisecond)
					kill()
				}
			default:
				parse(l)
			}
		case <-deadline:
			kill()
		case <-timeout:
			kill()
			t.Fatalf("child did not reach the kill point in time\n%s", stderr.String())
		}
	}
}

func TestCrashRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("re-executes the test binary; skipped in -short")
	}
	dir := t.TempDir()
	// Timing makes every run different anyway; the seed varies the kill
	// points too, and is logged.
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("BASALT_ENGINE_CRASH_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (set BASALT_ENGINE_CRASH_SEED to repeat the kill points)", seed)
	r := rand.New(rand.NewPCG(seed, 7))
	// baseline[idx][sector] = operation that last wrote it, as verified.
	baseline := map[uint64][]uint64{}
	for g := range crashWorkers {
		for i := range crashObjs {
			baseline[crashObj(g, i).Index] = make([]uint64, ObjectSize/SectorSize)
		}
	}
	modes := []string{"write", "write", "write", "write", "gc-copied", "gc-synced"}
	ctx := context.Background()
	for round, mode := range modes {
		base := uint64(round+1) * 10_000_000
		rep := crashRound(t, dir, mode, base, r, 0)
		issued, completed, synced, fua := rep.issued, rep.completed, rep.acked, rep.fua
		// Expected per sector: the last completed op on it (completed ops of
		// a worker are a prefix of its issued ops), or the one in flight.
		type cand struct{ last, inflight uint64 }
		exp := map[uint64][]cand{}
		for idx, b := range baseline {
			c := make([]cand, len(b))
			for s := range c {
				c[s] = cand{last: b[s], inflight: ^uint64(0)}
			}
			exp[idx] = c
		}
		ws := make([]uint64, 0, len(issued))
		for w := range issued {
			ws = append(ws, w)
		}
		sortU64(ws)
		nacked := 0
		for _, w := range ws {
			o := issued[w]
			idx := crashObj(o.worker, o.obj).Index
			tag := w
			if o.trim {
				tag = 0
			}
			if w <= synced[o.worker] || fua[w] {
				nacked++
			}
			for s := o.off / SectorSize; s < (o.off+o.n)/SectorSize; s++ {
				if completed[w] {
					exp[idx][s].last = tag
				} else {
					exp[idx][s].inflight = tag
				}
			}
		}
		e, err := Open(dir, crashOpts())
		if err != nil {
			t.Fatalf("round %d (%s): reopen after kill: %v", round, mode, err)
		}
		buf := make([]byte, ObjectSize)
		for idx, c := range exp {
			if err := e.Read(ctx, ObjectID{9, idx}, 0, buf); err != nil {
				t.Fatalf("round %d (%s): read object %d: %v", round, mode, idx, err)
			}
			for s := range c {
				got, err := decodeSector(buf[int64(s)*SectorSize:][:SectorSize], idx, int64(s))
				if err != nil {
					t.Fatalf("round %d (%s): %v", round, mode, err)
				}
				if got != c[s].last && got != c[s].inflight {
					o := issued[c[s].last]
					t.Fatalf("round %d (%s): object %d sector %d holds op %d, want op %d (%+v, synced %v) or in-flight %d",
						round, mode, idx, s, got, c[s].last, o, c[s].last <= synced[o.worker] || fua[c[s].last], c[s].inflight)
				}
				baseline[idx][s] = got
			}
		}
		st, err := e.Scrub(ctx, func(id ObjectID, off, n int64, err error) {
			t.Errorf("round %d: scrub: %v", round, err)
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
		t.Logf("round %d (%s): %d ops issued, %d completed, %d acknowledged durable; %d blocks scrubbed",
			round, mode, len(issued), len(completed), nacked, st.Blocks)
		if len(completed) == 0 {
			t.Errorf("round %d: the child completed no operation before the kill", round)
		}
	}
}

// TestCrashLayers is TestCrashRecovery with layers: the child tags every
// operation with the newest checkpoint, creates checkpoints, deletes older
// ones, clears objects and compacts continuously, and is killed at random
// moments, inside DeleteCheckpoint (after the deletion is durable, before
// the merge in memory), after a ClearObject, and inside collections. After
// each kill, every view (the head and each checkpoint not being deleted)
// of every object must hold, in each sector, what the last completed
// operation that the view sees wrote there, or what the one in flight
// wrote; nothing may read back corrupt, and scrub must be clean.
func TestCrashLayers(t *testing.T) {
	if testing.Short() {
		t.Skip("re-executes the test binary; skipped in -short")
	}
	dir := t.TempDir()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("BASALT_ENGINE_CRASH_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (set BASALT_ENGINE_CRASH_SEED to repeat the kill points)", seed)
	r := rand.New(rand.NewPCG(seed, 8))
	const sectors = ObjectSize / SectorSize
	// baseline[view][idx][sector] = operation whose content the sector
	// holds in that view, as verified after the previous round.
	baseline := map[uint32]map[uint64][]uint64{0: {}}
	for g := range crashWorkers {
		for i := range crashObjs {
			baseline[0][crashObj(g, i).Index] = make([]uint64, sectors)
		}
	}
	var newest uint32
	deleting := map[uint32]bool{} // checkpoints whose deletion was issued: no longer checked
	deleted := map[uint32]bool{}  // checkpoints whose deletion completed
	modes := []string{"layers-write", "layers-write", "layers-checkpoint-durable", "layers-checkpoint-durable",
		"layers-clear-appended", "layers-gc-copied", "layers-gc-synced"}
	ctx := context.Background()
	for round, mode := range modes {
		base := uint64(round+1) * 10_000_000
		rep := crashRound(t, dir, mode, base, r, newest)
		// Checkpoints created in this round saw every earlier operation:
		// their content at the start of the round is the head's.
		for c := newest + 1; c <= rep.newest; c++ {
			b := map[uint64][]uint64{}
			for idx, s := range baseline[0] {
				b[idx] = slices.Clone(s)
			}
			baseline[c] = b
		}
		newest = rep.newest
		for c := range rep.delIssued {
			deleting[c] = true
			delete(baseline, c)
		}
		ws := make([]uint64, 0, len(rep.issued))
		for w := range rep.issued {
			ws = append(ws, w)
		}
		sortU64(ws)
		e, err := Open(dir, crashOpts())
		if err != nil {
			t.Fatalf("round %d (%s): reopen after kill: %v", round, mode, err)
		}
		buf := make([]byte, ObjectSize)
		views := 0
		for v, objs := range baseline {
			views++
			type cand struct{ last, inflight uint64 }
			exp := map[uint64][]cand{}
			for idx, b := range objs {
				c := make([]cand, len(b))
				for s := range c {
					c[s] = cand{last: b[s], inflight: ^uint64(0)}
				}
				exp[idx] = c
			}
			for _, w := range ws {
				o := rep.issued[w]
				if !(v == 0 || o.clear || o.tag < v) {
					continue // the view does not see it
				}
				c := exp[crashObj(o.worker, o.obj).Index]
				s0, s1 := o.off/SectorSize, (o.off+o.n)/SectorSize
				if o.clear {
					s0, s1 = 0, sectors
				}
				for s := s0; s < s1; s++ {
					if rep.completed[w] {
						c[s].last = o.value()
					} else {
						c[s].inflight = o.value()
					}
				}
			}
			for idx, c := range exp {
				if err := e.ReadView(ctx, ObjectID{9, idx}, v, 0, buf); err != nil {
					t.Fatalf("round %d (%s): read object %d view %d: %v", round, mode, idx, v, err)
				}
				for s := range c {
					got, err := decodeSector(buf[int64(s)*SectorSize:][:SectorSize], idx, int64(s))
					if err != nil {
						t.Fatalf("round %d (%s): view %d: %v", round, mode, v, err)
					}
					if got != c[s].last && got != c[s].inflight {
						t.Fatalf("round %d (%s): object %d view %d sector %d holds op %d, want op %d or in-flight %d",
							round, mode, idx, v, s, got, c[s].last, c[s].inflight)
					}
					objs[idx][s] = got
				}
			}
		}
		// A completed deletion is durable: no layer has that tag any more.
		for c := range rep.delDone {
			deleted[c] = true
		}
		for idx := range baseline[0] {
			ls, err := e.Layers(ctx, ObjectID{9, idx})
			if err != nil {
				t.Fatal(err)
			}
			for _, l := range ls {
				if deleted[l.Tag] {
					t.Fatalf("round %d (%s): object %d has a layer %d after that checkpoint's deletion completed", round, mode, idx, l.Tag)
				}
			}
		}
		st, err := e.Scrub(ctx, func(id ObjectID, off, n int64, err error) {
			t.Errorf("round %d: scrub: %v", round, err)
		})
		if err != nil {
			t.Fatal(err)
		}
		es := e.Stats()
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
		t.Logf("round %d (%s): %d ops issued, %d completed; checkpoints up to %d, %d deletions issued, %d completed; %d views checked; %d blocks scrubbed; %d segments, %d MiB on disk, %d MiB live",
			round, mode, len(rep.issued), len(rep.completed), newest, len(rep.delIssued), len(rep.delDone), views, st.Blocks,
			es.Segments, es.DiskBytes>>20, es.LiveBytes>>20)
		if len(rep.completed) == 0 {
			t.Errorf("round %d: the child completed no operation before the kill", round)
		}
	}
}

func sortU64(s []uint64) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}
