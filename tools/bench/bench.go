// Package bench measures Basalt's block layer against its peers in one run, with one client: fio (its nbd
// engine for every NBD server, libaio with O_DIRECT for the raw file). Targets are the raw file itself (the
// physical limit), qemu-nbd and nbdkit serving a raw file on the same disk (single-node NBD servers: the ceiling
// for one copy), and Basalt volumes with 1 and 3 replicas on a local `basalt up` cluster. Results are reported as
// ratios to qemu-nbd, never as bare times alone, because these machines are shared and noisy. It runs real
// processes (fio, qemu-nbd, nbdkit, basalt) and depends only on the standard library.
package bench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"
)

// Job is one fio workload.
type Job struct {
	Name    string
	RW      string // fio --rw
	BS      string
	IODepth int
	// Metric is what the job is judged by: "iops", "mbps" or "lat" (mean completion latency, µs).
	Metric string
}

// Jobs are the workloads of the bars, in run order: the sequential write also fills the target so
// that reads find data.
func Jobs() []Job {
	return []Job{
		{Name: "1M seq write QD8", RW: "write", BS: "1M", IODepth: 8, Metric: "mbps"},
		{Name: "4K rand read QD32", RW: "randread", BS: "4k", IODepth: 32, Metric: "iops"},
		{Name: "4K rand write QD32", RW: "randwrite", BS: "4k", IODepth: 32, Metric: "iops"},
		{Name: "4K rand read QD1", RW: "randread", BS: "4k", IODepth: 1, Metric: "lat"},
		{Name: "4K rand write QD1", RW: "randwrite", BS: "4k", IODepth: 1, Metric: "lat"},
	}
}

// Result is one job's outcome on one target.
type Result struct {
	IOPS    float64
	MBps    float64
	LatUsec float64 // mean completion latency
}

// Value is the figure the job is judged by.
func (r Result) Value(metric string) float64 {
	switch metric {
	case "mbps":
		return r.MBps
	case "lat":
		return r.LatUsec
	}
	return r.IOPS
}

// ParseFio reads fio's --output-format=json and sums its jobs' read and write sides.
func ParseFio(r io.Reader) (Result, error) {
	var out struct {
		Jobs []struct {
			Error int  `json:"error"`
			Read  side `json:"read"`
			Write side `json:"write"`
		} `json:"jobs"`
	}
	raw, err := io.ReadAll(r)
	if err != nil {
		return Result{}, fmt.Errorf("read fio output: %w", err)
	}
	// Some engines print a line of their own before the JSON ("fio: connected to NBD server").
	if i := bytes.Index(raw, []byte("\n{")); i >= 0 && !bytes.HasPrefix(raw, []byte("{")) {
		raw = raw[i+1:]
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		return Result{}, fmt.Errorf("decode fio output: %w", err)
	}
	if len(out.Jobs) == 0 {
		return Result{}, fmt.Errorf("fio output has no jobs")
	}
	var res Result
	var latWeighted, ios float64
	for _, j := range out.Jobs {
		if j.Error != 0 {
			return Result{}, fmt.Errorf("fio job failed with error %d", j.Error)
		}
		for _, s := range []side{j.Read, j.Write} {
			res.IOPS += s.IOPS
			res.MBps += float64(s.BWBytes) / 1e6
			n := float64(s.TotalIOs)
			latWeighted += s.ClatNs.Mean / 1e3 * n
			ios += n
		}
	}
	if ios > 0 {
		res.LatUsec = latWeighted / ios
	}
	return res, nil
}

type side struct {
	IOPS     float64 `json:"iops"`
	BWBytes  int64   `json:"bw_bytes"`
	TotalIOs int64   `json:"total_ios"`
	ClatNs   struct {
		Mean float64 `json:"mean"`
	} `json:"clat_ns"`
}

// Table renders results (target → job name → result) as a Markdown table with ratios to the reference target.
func Table(targets []string, results map[string]map[string]Result, reference string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "| workload | %s |\n|---|%s\n", strings.Join(targets, " | "), strings.Repeat("---|", len(targets)))
	for _, j := range Jobs() {
		ref := results[reference][j.Name].Value(j.Metric)
		fmt.Fprintf(&b, "| %s (%s) |", j.Name, unit(j.Metric))
		for _, t := range targets {
			r, ok := results[t][j.Name]
			if !ok {
				b.WriteString(" – |")
				continue
			}
			v := r.Value(j.Metric)
			if ref > 0 && t != reference {
				fmt.Fprintf(&b, " %s (%.2f×) |", format(v, j.Metric), v/ref)
			} else {
				fmt.Fprintf(&b, " %s |", format(v, j.Metric))
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

func unit(metric string) string {
	switch metric {
	case "mbps":
		return "MB/s"
	case "lat":
		return "mean µs, lower is better"
	}
	return "IOPS"
}

func format(v float64, metric string) string {
	switch metric {
	case "mbps":
		return fmt.Sprintf("%.0f", v)
	case "lat":
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.0fk", v/1000)
}
