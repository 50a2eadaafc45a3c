//go:build linux

package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// figure is one row of the results: a quantity measured on both paths
// (or on tungate only), one value per round.
type figure struct {
	Key  string `json:"key"`
	Name string `json:"name"`
	Unit string `json:"unit"`
	// Kernel and Tungate hold the values of the rounds that succeeded and
	// their median; Kernel is nil when KernelNA says why the kernel path
	// has no such figure.
	Kernel   *series `json:"kernel,omitempty"`
	KernelNA string  `json:"kernel_na,omitempty"`
	Tungate  *series `json:"tungate,omitempty"`
	// Ratio is tungate's median over the kernel's, when both exist and
	// the kernel's is not zero.
	Ratio *float64 `json:"ratio,omitempty"`
	// NotMeasured says why the row has no number by design (a part of
	// tungate that does not exist yet). It is not a failure.
	NotMeasured string `json:"not_measured,omitempty"`
	// Errors are the measurements that failed; any makes the run fail.
	Errors []string `json:"errors,omitempty"`
	Note   string   `json:"note,omitempty"`

	digits  int  // decimals shown in the Markdown table
	noRatio bool // a ratio means nothing here (loss: usually 0 on the kernel path)
}

type series struct {
	Rounds []float64 `json:"rounds"`
	Median *float64  `json:"median"` // nil: no round succeeded
}

func (s *series) add(v float64) { s.Rounds = append(s.Rounds, v) }

func (s *series) finish() {
	if len(s.Rounds) == 0 {
		return
	}
	m := median(s.Rounds)
	s.Median = &m
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// figures is the result table, in the order rows were declared.
type figures struct {
	order []*figure
	byKey map[string]*figure
}

func newFigures() *figures { return &figures{byKey: map[string]*figure{}} }

// both declares a figure measured on both paths.
func (fs *figures) both(key, name, unit string, digits int) *figure {
	return fs.declare(&figure{Key: key, Name: name, Unit: unit, Kernel: &series{}, Tungate: &series{}, digits: digits})
}

// tungateOnly declares a figure the kernel path has no counterpart of.
func (fs *figures) tungateOnly(key, name, unit string, digits int, kernelNA string) *figure {
	return fs.declare(&figure{Key: key, Name: name, Unit: unit, KernelNA: kernelNA, Tungate: &series{}, digits: digits})
}

func (fs *figures) declare(f *figure) *figure {
	if fs.byKey[f.Key] != nil {
		panic("bench: figure " + f.Key + " declared twice")
	}
	fs.order = append(fs.order, f)
	fs.byKey[f.Key] = f
	return f
}

func (fs *figures) get(key string) *figure {
	f := fs.byKey[key]
	if f == nil {
		panic("bench: no figure " + key)
	}
	return f
}

// add records one round's value for the path.
func (fs *figures) add(key string, p path, v float64) {
	f := fs.get(key)
	if p == kernelPath {
		f.Kernel.add(v)
	} else {
		f.Tungate.add(v)
	}
}

// fail records a failed measurement.
func (fs *figures) fail(key string, what string, err error) {
	f := fs.get(key)
	f.Errors = append(f.Errors, fmt.Sprintf("%s: %v", what, err))
}

// finish computes medians and ratios.
func (fs *figures) finish() {
	for _, f := range fs.order {
		if f.Kernel != nil {
			f.Kernel.finish()
		}
		if f.Tungate != nil {
			f.Tungate.finish()
		}
		if !f.noRatio && f.Kernel != nil && f.Tungate != nil && f.Kernel.Median != nil && f.Tungate.Median != nil && *f.Kernel.Median != 0 {
			r := *f.Tungate.Median / *f.Kernel.Median
			f.Ratio = &r
		}
	}
}

// failures lists the figures that could not be (fully) measured.
func (fs *figures) failures() []string {
	var out []string
	for _, f := range fs.order {
		for _, e := range f.Errors {
			out = append(out, fmt.Sprintf("%s: %s", f.Name, e))
		}
	}
	return out
}

// machine describes where and on what the figures were taken.
type machine struct {
	NProc          int    `json:"nproc"`
	CPUModel       string `json:"cpu_model"`
	Kernel         string `json:"kernel"`
	GoVersion      string `json:"go_version"`
	Date           string `json:"date"`
	TungateVersion string `json:"tungate_version"`
	TungateCommit  string `json:"tungate_commit"`
	Offload        string `json:"tun_offload"`
	Rounds         int    `json:"rounds"`
	LoadAvgStart   string `json:"loadavg_start"`
	LoadAvgEnd     string `json:"loadavg_end"`
}

func describeMachine(binary, offload string) machine {
	m := machine{
		NProc:          runtime.NumCPU(),
		CPUModel:       cpuModel(),
		GoVersion:      runtime.Version(),
		Date:           time.Now().UTC().Format(time.RFC3339),
		TungateVersion: commandOutput(binary, "version"),
		TungateCommit:  commandOutput("git", "-C", "..", "describe", "--always", "--dirty", "--abbrev=12"),
		Offload:        offload,
		Rounds:         rounds,
		LoadAvgStart:   loadAvg(),
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	} else {
		m.Kernel = "unknown: " + err.Error()
	}
	return m
}

func cpuModel() string {
	raw, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown: " + err.Error()
	}
	for line := range strings.SplitSeq(string(raw), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown (no model name in /proc/cpuinfo)"
}

func loadAvg() string {
	raw, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown: " + err.Error()
	}
	f := strings.Fields(string(raw))
	if len(f) < 3 {
		return strings.TrimSpace(string(raw))
	}
	return strings.Join(f[:3], " ")
}

func commandOutput(name string, args ...string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).Output()
	if err != nil {
		return fmt.Sprintf("unknown (%s: %v)", name, err)
	}
	return strings.TrimSpace(string(out))
}

// results is the whole report, as latest.json holds it.
type results struct {
	Machine machine   `json:"machine"`
	Figures []*figure `json:"figures"`
	Failed  []string  `json:"failed,omitempty"`
}

// write stores results as dir/latest.json and dir/latest.md and returns
// the Markdown.
func (r *results) write(dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	raw, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "latest.json"), append(raw, '\n'), 0o644); err != nil {
		return "", err
	}
	md := r.markdown()
	return md, os.WriteFile(filepath.Join(dir, "latest.md"), []byte(md), 0o644)
}

func (r *results) markdown() string {
	var b strings.Builder
	m := r.Machine
	fmt.Fprintf(&b, "# tungate benchmark\n\n")
	fmt.Fprintf(&b, "tungate and the kernel path (the same client and server over the lab's veth, no TUN) measured in the same run, alternating, %d rounds; each cell is the median of the rounds, ratio = tungate / kernel (below 1 for rates and throughputs, above 1 for times, means tungate is slower). The machine is shared: other work may run alongside, so compare ratios, not absolute figures, between runs. Written by `make bench` (bench/).\n\n", m.Rounds)
	fmt.Fprintf(&b, "| figure | kernel | tungate | ratio |\n|---|---:|---:|---:|\n")
	for _, f := range r.Figures {
		name := f.Name
		if f.Unit != "" {
			name += " (" + f.Unit + ")"
		}
		if f.NotMeasured != "" {
			fmt.Fprintf(&b, "| %s | %s | %s | |\n", name, f.NotMeasured, f.NotMeasured)
			continue
		}
		kernel := f.KernelNA
		if f.Kernel != nil {
			kernel = f.cell(f.Kernel)
		}
		ratio := ""
		if f.Ratio != nil {
			ratio = strconv.FormatFloat(*f.Ratio, 'f', 2, 64)
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", name, kernel, f.cell(f.Tungate), ratio)
	}
	fmt.Fprintf(&b, "\n## Machine\n\n")
	for _, kv := range [][2]string{
		{"nproc", strconv.Itoa(m.NProc)},
		{"CPU", m.CPUModel},
		{"kernel", m.Kernel},
		{"Go", m.GoVersion},
		{"date", m.Date},
		{"tungate", m.TungateVersion},
		{"commit", m.TungateCommit},
		{"tun.offload", m.Offload},
		{"load average (start → end)", m.LoadAvgStart + " → " + m.LoadAvgEnd},
	} {
		fmt.Fprintf(&b, "- %s: %s\n", kv[0], kv[1])
	}
	fmt.Fprintf(&b, "\n## Rounds\n\n")
	for _, f := range r.Figures {
		if f.NotMeasured != "" {
			continue
		}
		fmt.Fprintf(&b, "- %s:", f.Name)
		if f.Kernel != nil {
			fmt.Fprintf(&b, " kernel %s;", f.rounds(f.Kernel))
		}
		fmt.Fprintf(&b, " tungate %s", f.rounds(f.Tungate))
		if f.Note != "" {
			fmt.Fprintf(&b, " (%s)", f.Note)
		}
		b.WriteString("\n")
	}
	if len(r.Failed) > 0 {
		fmt.Fprintf(&b, "\n## Not measured (the run failed)\n\n")
		for _, e := range r.Failed {
			fmt.Fprintf(&b, "- %s\n", strings.ReplaceAll(e, "\n", " "))
		}
	}
	return b.String()
}

func (f *figure) cell(s *series) string {
	if s == nil || s.Median == nil {
		return "not measured"
	}
	return strconv.FormatFloat(*s.Median, 'f', f.digits, 64)
}

func (f *figure) rounds(s *series) string {
	if s == nil || len(s.Rounds) == 0 {
		return "none"
	}
	parts := make([]string, len(s.Rounds))
	for i, v := range s.Rounds {
		parts[i] = strconv.FormatFloat(v, 'f', f.digits, 64)
	}
	return strings.Join(parts, ", ")
}
