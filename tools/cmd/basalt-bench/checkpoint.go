package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/tools/bench"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// checkpointSuite measures the checkpoint bars of docs/benchmarks.md: the time to take a checkpoint of an empty
// 1 GiB volume, an empty 64 TiB one and a full one; 4K random writes at QD32 right after a checkpoint against the
// same volume without one; and fio's IOPS while a checkpoint holding a whole rewrite of the volume is deleted
// (merged), against fio undisturbed.
func checkpointSuite(ctx context.Context, endpoint, logDir string, basalt func(...string) error, fio func(...string) (bench.Result, error), sock, size string, runtime time.Duration) error {
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ck := basaltv1.NewCheckpointServiceClient(conn)
	for _, v := range []struct{ name, size string }{{"ck-1g", "1G"}, {"ck-64t", "64T"}, {"ck-full", size}, {"ck-plain", size}} {
		if err := basalt("volume", "create", v.name, "--size", v.size); err != nil {
			return err
		}
	}
	uri := func(vol string) string { return "--uri=nbd+unix:///" + vol + "?socket=" + sock }
	for _, v := range []string{"ck-full", "ck-plain"} {
		fmt.Fprintf(os.Stderr, "checkpoint suite: filling %s\n", v)
		if _, err := fio("--ioengine=nbd", uri(v), "--rw=write", "--bs=1M", "--iodepth=8", "--size="+size); err != nil {
			return err
		}
	}
	fmt.Printf("### Checkpoints (3 replicas)\n\n| measure | value |\n| --- | --- |\n")
	for _, v := range []string{"ck-1g", "ck-64t", "ck-full"} {
		var took []time.Duration
		for i := range 10 {
			start := time.Now()
			if _, err := ck.CreateCheckpoint(ctx, &basaltv1.CreateCheckpointRequest{Name: fmt.Sprintf("b%d", i), Volumes: []string{v}}); err != nil {
				return fmt.Errorf("checkpoint %s: %w", v, err)
			}
			took = append(took, time.Since(start))
		}
		slices.Sort(took)
		fmt.Printf("| checkpoint create, %s (median / max of 10, client-measured) | %s / %s |\n", v, took[5].Round(10*time.Microsecond), took[9].Round(10*time.Microsecond))
	}
	randwrite := func(vol string) (bench.Result, error) {
		return fio("--ioengine=nbd", uri(vol), "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size="+size,
			fmt.Sprintf("--runtime=%ds", int(runtime.Seconds())), "--time_based")
	}
	plain, err := randwrite("ck-plain")
	if err != nil {
		return err
	}
	if _, err := ck.CreateCheckpoint(ctx, &basaltv1.CreateCheckpointRequest{Name: "fresh", Volumes: []string{"ck-full"}}); err != nil {
		return err
	}
	after, err := randwrite("ck-full")
	if err != nil {
		return err
	}
	fmt.Printf("| 4K rand write QD32 IOPS: without a checkpoint / right after one | %.0f / %.0f (%.2f×; bar ≥ 0.8×) |\n", plain.IOPS, after.IOPS, after.IOPS/plain.IOPS)

	// Merge under load: ck-plain gets a checkpoint, then a full rewrite, so the checkpoint's layer holds the whole
	// volume shadowed; fio runs undisturbed, then again while the checkpoint is deleted.
	if _, err := ck.CreateCheckpoint(ctx, &basaltv1.CreateCheckpointRequest{Name: "m", Volumes: []string{"ck-plain"}}); err != nil {
		return err
	}
	if _, err := fio("--ioengine=nbd", uri("ck-plain"), "--rw=write", "--bs=1M", "--iodepth=8", "--size="+size); err != nil {
		return err
	}
	undisturbed, err := randwrite("ck-plain")
	if err != nil {
		return err
	}
	type res struct {
		r   bench.Result
		err error
	}
	during := make(chan res, 1)
	go func() { r, err := randwrite("ck-plain"); during <- res{r, err} }()
	time.Sleep(runtime / 4)
	start := time.Now()
	if _, err := ck.DeleteCheckpoint(ctx, &basaltv1.DeleteCheckpointRequest{Volume: "ck-plain", Name: "m"}); err != nil {
		return err
	}
	deleteTook := time.Since(start)
	d := <-during
	if d.err != nil {
		return d.err
	}
	fmt.Printf("| 4K rand write QD32 IOPS while a checkpoint shadowing %s is deleted / undisturbed | %.0f / %.0f (%.2f×; bar ≥ 0.7×) |\n",
		size, d.r.IOPS, undisturbed.IOPS, d.r.IOPS/undisturbed.IOPS)
	merge, err := mergeTimes(logDir)
	if err != nil {
		return err
	}
	bytes, err := parseBytes(size)
	if err != nil {
		return err
	}
	// Each blockd merges the layers of the objects it holds a copy of: with 3 replicas on 3 nodes, all of them.
	slowest := slices.Max(merge)
	fmt.Printf("| merge of the deleted checkpoint (%s of shadowed blocks per node): delete call / slowest node's merge | %s / %s (%.0f MB/s; bar ≥ 200 MB/s) |\n\n",
		size, deleteTook.Round(time.Millisecond), slowest.Round(time.Microsecond), float64(bytes)/slowest.Seconds()/1e6)
	return nil
}

// mergeTimes reads, from the blockd logs, how long each node's merge of a deleted checkpoint took.
func mergeTimes(logDir string) ([]time.Duration, error) {
	files, _ := filepath.Glob(filepath.Join(logDir, "blockd-*.log"))
	var out []time.Duration
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		out = out[:0]
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				return nil, err
			}
			for _, l := range strings.Split(string(b), "\n") {
				if !strings.Contains(l, "merged a deleted checkpoint") {
					continue
				}
				if i := strings.Index(l, "took="); i >= 0 {
					if d, err := time.ParseDuration(strings.Fields(l[i+5:])[0]); err == nil {
						out = append(out, d)
					}
				}
			}
		}
		if len(out) >= len(files) && len(files) > 0 {
			return out, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("only %d of %d storage nodes logged their merge within 30s", len(out), len(files))
		}
	}
}

// parseBytes reads a size such as 1G (binary units).
func parseBytes(s string) (int64, error) {
	mult := int64(1)
	if i := strings.IndexAny(s, "KMGT"); i >= 0 {
		mult = 1 << (10 * (strings.IndexByte("KMGT", s[i]) + 1))
		s = s[:i]
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	return n * mult, nil
}
