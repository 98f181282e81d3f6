// Package trace reads, writes, generates and replays serverless invocation
// traces in the format of the Azure Functions 2019 public dataset
// (invocations_per_function_md.anon.dNN.csv): one row per function with
// the columns HashOwner, HashApp, HashFunction, Trigger, then one column
// per minute ("1" … "1440") holding that minute's invocation count.
//
// The real dataset is read with Read or ReadFile; GenerateSpiky writes a
// synthetic function of the shape the MITOSIS paper replays (a low base
// rate with spikes far above it). Schedule turns per-minute counts into
// arrival offsets at a chosen time compression and Replay fires them.
package trace

import (
	"bufio"
	"bytes"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// Function is one row of a trace: a function and its invocations per
// minute.
type Function struct {
	Owner    string // HashOwner
	App      string // HashApp
	Function string // HashFunction
	Trigger  string // e.g. "http", "timer", "queue"
	Counts   []int  // invocations in minute 1, 2, …
}

// Total returns the number of invocations over the whole trace.
func (f Function) Total() int {
	n := 0
	for _, c := range f.Counts {
		n += c
	}
	return n
}

// Peak returns the busiest minute (from 0) and its count; the first one
// on a tie, and (0, 0) for an empty trace.
func (f Function) Peak() (minute, count int) {
	for i, c := range f.Counts {
		if c > count {
			minute, count = i, c
		}
	}
	return minute, count
}

// fixedColumns are the columns before the per-minute counts.
var fixedColumns = []string{"HashOwner", "HashApp", "HashFunction", "Trigger"}

// MaxMinutes bounds the minute columns Read accepts (a day is 1440; a
// larger bound allows concatenated days while refusing absurd headers).
const MaxMinutes = 14 * 1440

// MaxCount bounds one minute's count; larger values are refused as
// corrupt (the real dataset's busiest function stays far below it).
const MaxCount = 1 << 30

// Read parses a trace. The header must name the four fixed columns and
// then minutes 1..N in order; every row must have N counts, each a
// non-negative integer. A UTF-8 byte-order mark and CRLF line ends are
// accepted. Errors name the line and column.
func Read(r io.Reader) ([]Function, error) {
	br := bufio.NewReader(r)
	if b, err := br.Peek(3); err == nil && bytes.Equal(b, []byte{0xEF, 0xBB, 0xBF}) {
		br.Discard(3)
	}
	cr := csv.NewReader(br)
	cr.ReuseRecord = true
	header, err := cr.Read()
	if err == io.EOF {
		return nil, errors.New("trace: empty input: want a header HashOwner,HashApp,HashFunction,Trigger,1,2,…")
	}
	if err != nil {
		return nil, fmt.Errorf("trace: header: %w", err)
	}
	minutes, err := checkHeader(header)
	if err != nil {
		return nil, err
	}
	var fns []Function
	for {
		rec, err := cr.Read()
		if err == io.EOF {
			return fns, nil
		}
		if err != nil {
			var pe *csv.ParseError
			if errors.As(err, &pe) && errors.Is(pe.Err, csv.ErrFieldCount) {
				return nil, fmt.Errorf("trace: line %d: %d columns, the header has %d (4 fixed + %d minutes)", pe.Line, len(rec), len(header), minutes)
			}
			return nil, fmt.Errorf("trace: %w", err)
		}
		line, _ := cr.FieldPos(0) // Precondition: the read succeeded (FieldPos panics otherwise).
		f := Function{Owner: rec[0], App: rec[1], Function: rec[2], Trigger: rec[3], Counts: make([]int, minutes)}
		for i, s := range rec[len(fixedColumns):] {
			n, err := strconv.Atoi(strings.TrimSpace(s))
			if err != nil || n < 0 || n > MaxCount {
				return nil, fmt.Errorf("trace: line %d, column %d (minute %d): count %q is not an integer in [0, %d]",
					line, len(fixedColumns)+i+1, i+1, s, MaxCount)
			}
			f.Counts[i] = n
		}
		fns = append(fns, f)
	}
}

// checkHeader validates the header and returns the number of minutes.
func checkHeader(h []string) (int, error) {
	if len(h) <= len(fixedColumns) {
		return 0, fmt.Errorf("trace: header has %d columns; want HashOwner,HashApp,HashFunction,Trigger and at least one minute column", len(h))
	}
	for i, want := range fixedColumns {
		if strings.TrimSpace(h[i]) != want {
			return 0, fmt.Errorf("trace: header column %d is %q, want %q (is this an invocations_per_function file?)", i+1, h[i], want)
		}
	}
	minutes := len(h) - len(fixedColumns)
	if minutes > MaxMinutes {
		return 0, fmt.Errorf("trace: header has %d minute columns, more than %d", minutes, MaxMinutes)
	}
	for i, s := range h[len(fixedColumns):] {
		if strings.TrimSpace(s) != strconv.Itoa(i+1) {
			return 0, fmt.Errorf("trace: header column %d is %q, want minute %d", len(fixedColumns)+i+1, s, i+1)
		}
	}
	return minutes, nil
}

// ReadFile reads the trace in the named file.
func ReadFile(path string) ([]Function, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fns, err := Read(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return fns, nil
}

// Write writes fns in the trace format. Every function must have the same
// number of minutes (at least one).
func Write(w io.Writer, fns []Function) error {
	if len(fns) == 0 {
		return errors.New("trace: nothing to write")
	}
	minutes := len(fns[0].Counts)
	if minutes == 0 {
		return errors.New("trace: a function with no minutes")
	}
	cw := csv.NewWriter(w)
	rec := append([]string(nil), fixedColumns...)
	for i := 1; i <= minutes; i++ {
		rec = append(rec, strconv.Itoa(i))
	}
	if err := cw.Write(rec); err != nil {
		return err
	}
	for _, f := range fns {
		if len(f.Counts) != minutes {
			return fmt.Errorf("trace: function %q has %d minutes, the first has %d", f.Function, len(f.Counts), minutes)
		}
		rec = append(rec[:0], f.Owner, f.App, f.Function, f.Trigger)
		for _, c := range f.Counts {
			if c < 0 {
				return fmt.Errorf("trace: function %q has a negative count", f.Function)
			}
			rec = append(rec, strconv.Itoa(c))
		}
		if err := cw.Write(rec); err != nil {
			return err
		}
	}
	cw.Flush()
	return cw.Error()
}

// Find returns the function whose HashFunction is, or starts with, key
// (a unique prefix), or an error naming the candidates.
func Find(fns []Function, key string) (Function, error) {
	var hits []Function
	for _, f := range fns {
		if f.Function == key {
			return f, nil
		}
		if key != "" && strings.HasPrefix(f.Function, key) {
			hits = append(hits, f)
		}
	}
	switch len(hits) {
	case 0:
		return Function{}, fmt.Errorf("trace: no function %q", key)
	case 1:
		return hits[0], nil
	}
	return Function{}, fmt.Errorf("trace: %q matches %d functions (%s, %s, …); give more of the hash", key, len(hits), hits[0].Function, hits[1].Function)
}
