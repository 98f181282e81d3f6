package procfs

import (
	"strings"
	"testing"
)

func FuzzParseMaps(f *testing.F) {
	f.Add([]byte(sampleMaps))
	f.Add([]byte("1000-2000 r--p 00000000 00:00 0"))
	f.Add([]byte("1000-2000 rw-s 1ffffffffffffffff 103:05 5   /a b (deleted)\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		ms, err := ParseMaps(data)
		if err != nil {
			return
		}
		for _, m := range ms {
			if m.Start >= m.End {
				t.Fatalf("mapping with Start >= End: %+v", m)
			}
			if len(m.Perms) != 4 {
				t.Fatalf("perms %q", m.Perms)
			}
			if m.Shared != (m.Perms[3] == 's') {
				t.Fatalf("shared %v for perms %q", m.Shared, m.Perms)
			}
			if m.Deleted && !strings.Contains(string(data), m.Path+deletedSuffix) {
				t.Fatalf("deleted path %q not in the input", m.Path)
			}
		}
	})
}

func FuzzParseStat(f *testing.F) {
	f.Add([]byte(mkStat("sleep", nil)))
	f.Add([]byte(mkStat("a) b (c", nil)))
	f.Add([]byte("1 (x) S 1\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := ParseStat(data)
		if err != nil && st != (Stat{}) {
			t.Fatalf("error %v with non-zero result %+v", err, st)
		}
	})
}

func FuzzParseStatus(f *testing.F) {
	f.Add([]byte(sampleStatus))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := ParseStatus(data)
		if err == nil && st.State == "" {
			t.Fatalf("success without a state: %+v", st)
		}
	})
}
