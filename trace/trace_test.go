package trace

import (
	"bytes"
	"context"
	"errors"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestReadWriteRoundTrip(t *testing.T) {
	fns := []Function{
		{Owner: "o1", App: "a1", Function: "f1", Trigger: "http", Counts: []int{0, 3, 100, 0}},
		{Owner: "o2", App: "a2", Function: "f2", Trigger: "timer", Counts: []int{1, 1, 1, 1}},
	}
	var buf bytes.Buffer
	if err := Write(&buf, fns); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(buf.String(), "HashOwner,HashApp,HashFunction,Trigger,1,2,3,4\n") {
		t.Fatalf("header: %q", strings.SplitN(buf.String(), "\n", 2)[0])
	}
	got, err := Read(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, fns) {
		t.Fatalf("round trip: got %+v, want %+v", got, fns)
	}
	if got[0].Total() != 103 {
		t.Errorf("Total = %d", got[0].Total())
	}
	if m, c := got[0].Peak(); m != 2 || c != 100 {
		t.Errorf("Peak = %d, %d", m, c)
	}
}

func TestReadAcceptsBOMAndCRLF(t *testing.T) {
	in := "\xEF\xBB\xBFHashOwner,HashApp,HashFunction,Trigger,1,2\r\nx,y,z,http,4,5\r\n"
	got, err := Read(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || !reflect.DeepEqual(got[0].Counts, []int{4, 5}) || got[0].Owner != "x" {
		t.Fatalf("got %+v", got)
	}
}

func TestReadErrors(t *testing.T) {
	const h = "HashOwner,HashApp,HashFunction,Trigger,1,2\n"
	tests := []struct {
		name, in, want string
	}{
		{"empty", "", "empty input"},
		{"short header", "HashOwner,HashApp,HashFunction,Trigger\n", "at least one minute column"},
		{"wrong column", "Owner,HashApp,HashFunction,Trigger,1\n", `column 1 is "Owner"`},
		{"minutes out of order", "HashOwner,HashApp,HashFunction,Trigger,1,3\n", "want minute 2"},
		{"too few counts", h + "a,b,c,http,1\n", "line 2: 5 columns, the header has 6"},
		{"not a number", h + "a,b,c,http,1,x\n", `line 2, column 6 (minute 2): count "x"`},
		{"negative", h + "a,b,c,http,-1,2\n", `count "-1"`},
		{"bad quote", h + "a,\"b,c,http,1,2\n", "trace:"},
		{"second row bad", h + "a,b,c,http,1,2\na,b,c,http,1,2.5\n", "line 3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Read(strings.NewReader(tt.in))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

func TestWriteRefusesRagged(t *testing.T) {
	err := Write(&bytes.Buffer{}, []Function{{Counts: []int{1}}, {Function: "g", Counts: []int{1, 2}}})
	if err == nil || !strings.Contains(err.Error(), `"g" has 2 minutes`) {
		t.Fatalf("err = %v", err)
	}
}

func TestFind(t *testing.T) {
	fns := []Function{{Function: "abc1"}, {Function: "abc2"}, {Function: "def"}}
	if f, err := Find(fns, "de"); err != nil || f.Function != "def" {
		t.Fatalf("Find de = %v, %v", f, err)
	}
	if _, err := Find(fns, "abc"); err == nil || !strings.Contains(err.Error(), "matches 2") {
		t.Fatalf("ambiguous: %v", err)
	}
	if _, err := Find(fns, "zz"); err == nil {
		t.Fatal("missing: no error")
	}
}

func TestGenerateSpiky(t *testing.T) {
	c := SpikeConfig{Minutes: 45, BaseRate: 6, Spikes: 3, SpikeSize: 100, FirstSpike: 3, Gap: 15, Seed: 7}
	a, b := GenerateSpiky(c), GenerateSpiky(c)
	if !reflect.DeepEqual(a, b) {
		t.Fatal("not deterministic")
	}
	if len(a.Counts) != 45 {
		t.Fatalf("%d minutes", len(a.Counts))
	}
	for _, m := range []int{3, 18, 33} {
		if a.Counts[m] != 100 {
			t.Errorf("minute %d: %d, want the spike", m, a.Counts[m])
		}
	}
	base := 0
	for m, n := range a.Counts {
		if m != 3 && m != 18 && m != 33 {
			base += n
		}
	}
	if mean := float64(base) / 42; mean < 4 || mean > 8 {
		t.Errorf("base rate %.1f, want about 6", mean)
	}
	if len(a.Function) != 64 {
		t.Errorf("hash %q", a.Function)
	}
	var buf bytes.Buffer
	if err := Write(&buf, []Function{a}); err != nil {
		t.Fatal(err)
	}
	got, err := Read(&buf)
	if err != nil || !reflect.DeepEqual(got[0], a) {
		t.Fatalf("generated trace does not round-trip: %v", err)
	}
	if c2 := (SpikeConfig{Seed: 8}); GenerateSpiky(c2).Function == a.Function {
		t.Error("different seeds, same hash")
	}
}

func TestSchedule(t *testing.T) {
	counts := []int{4, 0, 10}
	minute := time.Second
	for _, sp := range []Spread{Uniform, Poisson, Burst} {
		t.Run(sp.String(), func(t *testing.T) {
			got := Schedule(counts, minute, sp, 100*time.Millisecond, 1)
			if len(got) != 14 {
				t.Fatalf("%d arrivals", len(got))
			}
			for i, d := range got {
				if i > 0 && d < got[i-1] {
					t.Fatalf("not sorted at %d", i)
				}
				inFirst := i < 4
				lo, hi := 2*minute, 3*minute
				if inFirst {
					lo, hi = 0, minute
				}
				if sp == Burst {
					hi = lo + 100*time.Millisecond
				}
				if d < lo || d >= hi {
					t.Fatalf("arrival %d at %s outside [%s, %s)", i, d, lo, hi)
				}
			}
			if !reflect.DeepEqual(got, Schedule(counts, minute, sp, 100*time.Millisecond, 1)) {
				t.Fatal("not repeatable")
			}
		})
	}
	if got := Schedule([]int{2}, time.Second, Uniform, 0, 0); !reflect.DeepEqual(got, []time.Duration{0, 500 * time.Millisecond}) {
		t.Fatalf("uniform: %v", got)
	}
}

func TestScheduleSpiky(t *testing.T) {
	counts := []int{6, 5, 100, 7, 0, 6}
	if th := SpikeThreshold(counts); th != 24 {
		t.Fatalf("threshold %d, want 4 x median 6", th)
	}
	got := Schedule(counts, time.Second, Spiky, 50*time.Millisecond, 3)
	var spike, uniform int
	for _, d := range got {
		switch m := d / time.Second; {
		case m == 2 && d-2*time.Second < 50*time.Millisecond:
			spike++
		case m == 0:
			if d == time.Duration(int64(time.Second)*int64(uniform)/6) {
				uniform++
			}
		}
	}
	if spike != 100 || uniform != 6 {
		t.Fatalf("spike minute: %d of 100 in the burst; first minute: %d of 6 evenly spaced", spike, uniform)
	}
	if th := SpikeThreshold([]int{1, 1, 1}); th != SpikeMin-1 {
		t.Fatalf("low-rate threshold %d", th)
	}
}

func TestParseSpread(t *testing.T) {
	for _, s := range []Spread{Uniform, Poisson, Burst, Spiky} {
		if got, err := ParseSpread(s.String()); err != nil || got != s {
			t.Errorf("ParseSpread(%q) = %v, %v", s, got, err)
		}
	}
	if _, err := ParseSpread("bursty"); err == nil {
		t.Error("no error for an unknown spread")
	}
}

func TestReplay(t *testing.T) {
	arrivals := []time.Duration{0, 20 * time.Millisecond, 20 * time.Millisecond, 40 * time.Millisecond}
	var inFlight, peak atomic.Int32
	start := time.Now()
	fired := make([]time.Duration, len(arrivals))
	rs := Replay(context.Background(), arrivals, 2, func(ctx context.Context, i int) error {
		fired[i] = time.Since(start)
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		time.Sleep(30 * time.Millisecond)
		if i == 3 {
			return errors.New("boom")
		}
		return nil
	})
	if peak.Load() > 2 {
		t.Errorf("peak in flight %d, limit 2", peak.Load())
	}
	for i, r := range rs {
		if r.Index != i || fired[i] < arrivals[i] {
			t.Errorf("arrival %d fired at %s, due %s", i, fired[i], arrivals[i])
		}
		if r.Latency < 30*time.Millisecond {
			t.Errorf("arrival %d latency %s", i, r.Latency)
		}
	}
	if rs[3].Err == nil || rs[0].Err != nil {
		t.Errorf("errors: %v %v", rs[0].Err, rs[3].Err)
	}
	s := Summarize(rs)
	if s.N != 4 || s.Errors != 1 || s.P50 < 30*time.Millisecond || s.Max < s.P99 {
		t.Errorf("stats %+v", s)
	}
}

func TestReplayCancel(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	var ran atomic.Int32
	rs := Replay(ctx, []time.Duration{0, time.Hour}, 0, func(ctx context.Context, i int) error {
		ran.Add(1)
		return nil
	})
	if ran.Load() != 1 || rs[1].Err == nil || rs[0].Err != nil {
		t.Fatalf("ran %d, results %+v", ran.Load(), rs)
	}
}

func TestPercentile(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 100; i++ {
		s = append(s, time.Duration(i))
	}
	for _, tt := range []struct {
		p    float64
		want time.Duration
	}{{50, 50}, {99, 99}, {100, 100}, {0, 1}} {
		if got := Percentile(s, tt.p); got != tt.want {
			t.Errorf("p%.0f = %d, want %d", tt.p, got, tt.want)
		}
	}
	if Percentile(nil, 50) != 0 {
		t.Error("empty")
	}
}

func FuzzRead(f *testing.F) {
	f.Add([]byte("HashOwner,HashApp,HashFunction,Trigger,1,2\na,b,c,http,1,2\n"))
	f.Add([]byte("\xEF\xBB\xBFHashOwner,HashApp,HashFunction,Trigger,1\r\nx,y,z,timer,0\r\n"))
	f.Add([]byte("HashOwner,HashApp,HashFunction,Trigger,1\n\"a\nb\",c,d,e,5\n"))
	f.Add([]byte("HashOwner,HashApp,HashFunction,Trigger,2\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		fns, err := Read(bytes.NewReader(data))
		if err != nil {
			if fns != nil {
				t.Fatal("functions returned with an error")
			}
			return
		}
		if len(fns) == 0 {
			return
		}
		for _, fn := range fns {
			for _, c := range fn.Counts {
				if c < 0 || c > MaxCount {
					t.Fatalf("count %d accepted", c)
				}
			}
		}
		var buf bytes.Buffer
		if err := Write(&buf, fns); err != nil {
			t.Fatalf("Write of a read trace: %v", err)
		}
		again, err := Read(&buf)
		if err != nil {
			t.Fatalf("re-read: %v", err)
		}
		if !reflect.DeepEqual(again, fns) {
			t.Fatalf("round trip differs")
		}
	})
}
