package scenario

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/chaos/check"
)

// Move is one VM's way through a failover, each step as an absolute time (zero: not seen).
type Move struct {
	VM       string
	Priority basaltv1.VMPriority
	From, To string
	// Detected, Fenced and Placed come from the HA controller's record on the VM (VM.failover).
	Detected, Fenced, Placed time.Time
	// Running is when the new host reported the VM running (its status's started_at).
	Running time.Time
	// Booted is when the guest agent's boot line of the new boot was read (kernel and initramfs up).
	Booted time.Time
	// Beating is when the first record of the VM's new boot was read from the new host's console.
	Beating time.Time
	// Error is the HA controller's error for this VM, if it recorded one.
	Error string
}

// Event is a step of a scenario outside the per-VM moves (a host thawed, a member back).
type Event struct {
	What string
	At   time.Time
}

// Bar is a measured figure against its limit.
type Bar struct {
	Name  string
	Limit time.Duration
	// Got is the measured figure; Missing says it could not be measured (the step never happened).
	Got     time.Duration
	Missing bool
	// Detail breaks the figure down.
	Detail string
	// Failed overrides the comparison for bars that are not a duration (an order).
	Failed bool
}

// Pass reports whether the bar was met.
func (b Bar) Pass() bool { return !b.Missing && !b.Failed && b.Got <= b.Limit }

func (b Bar) String() string {
	verdict := "PASS"
	if !b.Pass() {
		verdict = "FAIL"
	}
	got := "not reached"
	if !b.Missing {
		got = fmtDur(b.Got)
	}
	s := fmt.Sprintf("%-4s %s: %s (bar %s)", verdict, b.Name, got, fmtDur(b.Limit))
	if b.Limit == 0 {
		s = fmt.Sprintf("%-4s %s", verdict, b.Name)
	}
	if b.Detail != "" {
		s += "; " + b.Detail
	}
	return s
}

// Check is the outcome of one invariant checker.
type Check struct {
	Name string
	Err  error
}

// Report is what a scenario or a round found.
type Report struct {
	Scenario string
	// Fault describes what was injected at T0.
	Fault  string
	T0     time.Time
	Moves  []*Move
	Events []Event
	Bars   []Bar
	Checks []Check
	Notes  []string
	// Err is a failure that ended the scenario early (the cluster could not be set up, ...).
	Err error
	// Logs are the tails of every daemon's log, taken when something failed (Print leaves them out).
	Logs string
}

func (r *Report) event(what string, at time.Time) { r.Events = append(r.Events, Event{what, at}) }

func (r *Report) note(format string, args ...any) {
	r.Notes = append(r.Notes, fmt.Sprintf(format, args...))
}

func (r *Report) check(name string, err error) { r.Checks = append(r.Checks, Check{name, err}) }

// Failures returns everything that failed: the scenario's error, failed checks and missed bars.
func (r *Report) Failures() error {
	var errs []error
	if r.Err != nil {
		errs = append(errs, r.Err)
	}
	for _, c := range r.Checks {
		if c.Err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", c.Name, c.Err))
		}
	}
	for _, b := range r.Bars {
		if !b.Pass() {
			errs = append(errs, fmt.Errorf("bar missed: %s", b))
		}
	}
	return errors.Join(errs...)
}

// Failed reports whether anything failed.
func (r *Report) Failed() bool { return r.Failures() != nil }

// fmtDur prints durations as the timeline does: seconds with millisecond precision.
func fmtDur(d time.Duration) string { return fmt.Sprintf("%.3fs", d.Seconds()) }

// since prints t as an offset from t0, or "-" when t is unset.
func since(t0, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return "+" + fmtDur(t.Sub(t0))
}

// Print writes the report: the fault, the timeline (each VM's failover steps and the scenario's events as
// offsets from T0), the bars and the checks.
func (r *Report) Print(w io.Writer) {
	fmt.Fprintf(w, "\n=== %s\n", r.Scenario)
	if !r.T0.IsZero() {
		fmt.Fprintf(w, "T0 %s: %s\n", r.T0.Format("15:04:05.000"), r.Fault)
	}
	if len(r.Moves) > 0 {
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  VM\tPRIO\tFROM\tTO\tDETECTED\tFENCED\tPLACED\tRUNNING\tBOOTED\tBEATING\t")
		for _, m := range r.Moves {
			to := m.To
			if to == "" {
				to = "-"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t", m.VM, check.PriorityName(m.Priority), m.From, to,
				since(r.T0, m.Detected), since(r.T0, m.Fenced), since(r.T0, m.Placed), since(r.T0, m.Running),
				since(r.T0, m.Booted), since(r.T0, m.Beating))
			if m.Error != "" {
				fmt.Fprintf(tw, " HA error: %s", m.Error)
			}
			fmt.Fprintln(tw)
		}
		tw.Flush()
	}
	for _, e := range r.Events {
		fmt.Fprintf(w, "  %-9s %s\n", since(r.T0, e.At), e.What)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "  note: %s\n", n)
	}
	for _, b := range r.Bars {
		fmt.Fprintf(w, "  bar   %s\n", b)
	}
	for _, c := range r.Checks {
		if c.Err == nil {
			fmt.Fprintf(w, "  check PASS %s\n", c.Name)
			continue
		}
		fmt.Fprintf(w, "  check FAIL %s: %s\n", c.Name, strings.ReplaceAll(c.Err.Error(), "\n", "\n             "))
	}
	if r.Err != nil {
		fmt.Fprintf(w, "  ERROR %v\n", r.Err)
	}
	verdict := "PASS"
	if r.Failed() {
		verdict = "FAIL"
	}
	fmt.Fprintf(w, "--- %s %s\n", verdict, r.Scenario)
}

// failoverBar is the host-failure bar for one VM: failure to guest beating on another host, with
// detection, fencing, restart and boot reported separately.
func failoverBar(t0 time.Time, m *Move, limit time.Duration) Bar {
	b := Bar{Name: fmt.Sprintf("failover of %s (failure -> guest beating on another host)", m.VM), Limit: limit}
	if m.Beating.IsZero() {
		b.Missing = true
	} else {
		b.Got = m.Beating.Sub(t0)
	}
	step := func(from, to time.Time) string {
		if from.IsZero() || to.IsZero() {
			return "-"
		}
		return fmtDur(to.Sub(from))
	}
	b.Detail = fmt.Sprintf("detection %s, fencing %s, restart %s, boot %s (kernel %s, agent's disk scan and first write %s)",
		step(t0, m.Detected), step(m.Detected, m.Fenced), step(m.Fenced, m.Running), step(m.Running, m.Beating),
		step(m.Running, m.Booted), step(m.Booted, m.Beating))
	return b
}
