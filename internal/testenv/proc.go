package testenv

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ProcState returns the state letter of /proc/PID/stat.
func ProcState(pid int) (byte, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0, fmt.Errorf("cannot parse /proc/%d/stat", pid)
	}
	return b[i+2], nil
}

// WaitStopped polls /proc/PID/stat until the process is stopped (state T).
func WaitStopped(pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		st, err := ProcState(pid)
		if err != nil {
			return fmt.Errorf("pid %d: waiting for it to stop: %w", pid, err)
		}
		switch st {
		case 'T':
			return nil
		case 'Z', 'X':
			return fmt.Errorf("pid %d exited (state %c) instead of stopping", pid, st)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pid %d not stopped within %v (state %c)", pid, timeout, st)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// Machine describes the host a benchmark ran on.
type Machine struct {
	NProc     int    `json:"nproc"`
	Model     string `json:"model"`
	Kernel    string `json:"kernel"`
	MemTotal  string `json:"mem_total"`
	LoadAvg   string `json:"loadavg_at_start"`
	GoVersion string `json:"go"`
}

// ReadMachine reads the host's CPU count and model, kernel release,
// memory and load average.
func ReadMachine() Machine {
	m := Machine{NProc: runtime.NumCPU(), GoVersion: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.Model = strings.TrimSpace(v)
				break
			}
		}
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "MemTotal:"); ok {
				var kb int64
				fmt.Sscan(strings.TrimSpace(v), &kb)
				m.MemTotal = fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
			}
		}
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) >= 3 {
			m.LoadAvg = strings.Join(f[:3], " ")
		}
	}
	return m
}

// FmtDur prints a duration with three significant digits ("-" for none),
// as the benchmark reports do.
func FmtDur(d time.Duration) string {
	if d <= 0 {
		return "-"
	}
	v := float64(d)
	var unit string
	switch {
	case d >= time.Second:
		v, unit = v/1e9, "s"
	case d >= time.Millisecond:
		v, unit = v/1e6, "ms"
	default:
		v, unit = v/1e3, "µs"
	}
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f %s", v, unit)
	case v >= 10:
		return fmt.Sprintf("%.1f %s", v, unit)
	default:
		return fmt.Sprintf("%.2f %s", v, unit)
	}
}
