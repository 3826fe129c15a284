package engine

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
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
	crashWorkers = 4
	crashObjs    = 2 // objects per worker
)

func TestMain(m *testing.M) {
	if dir := os.Getenv(crashEnvDir); dir != "" {
		base, _ := strconv.ParseUint(os.Getenv(crashEnvBase), 10, 64)
		crashChild(dir, os.Getenv(crashEnvMode), base)
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
	obj    int
	off, n int64
}

func (o crashOp) line() string {
	k := "W"
	if o.trim {
		k = "T"
	}
	return fmt.Sprintf("I %d %d %s %d %d %d\n", o.worker, o.w, k, o.obj, o.off, o.n)
}

func crashChild(dir, mode string, base uint64) {
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
	if mode != "write" {
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
				fua := r.IntN(3) == 0
				id := crashObj(g, o.obj)
				say(o.line())
				if o.trim {
					err = e.Trim(ctx, id, o.off, o.n, WriteOptions{Version: o.w, Sync: fua})
				} else {
					p := buf[:o.n]
					for s := int64(0); s < o.n/SectorSize; s++ {
						sectorContent(p[s*SectorSize:], o.w, id.Index, o.off/SectorSize+s)
					}
					err = e.Write(ctx, id, o.off, p, WriteOptions{Version: o.w, Sync: fua})
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

// crashRound runs one child until it is killed and returns its report.
func crashRound(t *testing.T, dir, mode string, base uint64, r *rand.Rand) (issued map[uint64]crashOp, completed map[uint64]bool, acked []uint64, fua map[uint64]bool) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashEnvDir+"="+dir, crashEnvMode+"="+mode, crashEnvBase+"="+strconv.FormatUint(base, 10))
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
	issued = map[uint64]crashOp{}
	completed = map[uint64]bool{}
	fua = map[uint64]bool{}
	acked = make([]uint64, crashWorkers) // per worker: every op up to this is durable (Sync)
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
			o := crashOp{worker: int(num(1)), w: num(2), trim: f[3] == "T", obj: int(num(4)), off: int64(num(5)), n: int64(num(6))}
			issued[o.w] = o
		case "C":
			completed[num(2)] = true
		case "F":
			fua[num(2)] = true
		case "S":
			acked[num(1)] = max(acked[num(1)], num(2))
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
				return
			}
			switch {
			case l == "READY":
				if mode == "write" {
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
		issued, completed, synced, fua := crashRound(t, dir, mode, base, r)
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

func sortU64(s []uint64) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}
