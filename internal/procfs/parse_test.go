package procfs

import (
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

const sampleMaps = `55d0c8a00000-55d0c8a02000 r--p 00000000 08:01 1835029                    /usr/bin/sleep
55d0c8a02000-55d0c8a06000 r-xp 00002000 08:01 1835029                    /usr/bin/sleep
7f0000000000-7f0000001000 rw-s 00001000 fd:1a 42                         /tmp/my file (deleted)
7f0000001000-7f0000002000 rw-p 00000000 00:00 0                          [anon:go heap]
7f0000002000-7f0000003000 ---p 00000000 00:00 0 
7f0000003000-7f0000004000 rwxp 00000000 00:00 0
7f0000004000-7f0000005000 rw-s 00000000 00:01 77                         /memfd:x (deleted)
7ffd1c9e0000-7ffd1ca01000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
`

func TestParseMaps(t *testing.T) {
	got, err := ParseMaps([]byte(sampleMaps))
	if err != nil {
		t.Fatal(err)
	}
	r, w, x := uint32(unix.PROT_READ), uint32(unix.PROT_WRITE), uint32(unix.PROT_EXEC)
	want := []Mapping{
		{0x55d0c8a00000, 0x55d0c8a02000, "r--p", r, false, 0, unix.Mkdev(8, 1), 1835029, "/usr/bin/sleep", false},
		{0x55d0c8a02000, 0x55d0c8a06000, "r-xp", r | x, false, 0x2000, unix.Mkdev(8, 1), 1835029, "/usr/bin/sleep", false},
		{0x7f0000000000, 0x7f0000001000, "rw-s", r | w, true, 0x1000, unix.Mkdev(0xfd, 0x1a), 42, "/tmp/my file", true},
		{0x7f0000001000, 0x7f0000002000, "rw-p", r | w, false, 0, 0, 0, "[anon:go heap]", false},
		{0x7f0000002000, 0x7f0000003000, "---p", 0, false, 0, 0, 0, "", false},
		{0x7f0000003000, 0x7f0000004000, "rwxp", r | w | x, false, 0, 0, 0, "", false},
		{0x7f0000004000, 0x7f0000005000, "rw-s", r | w, true, 0, unix.Mkdev(0, 1), 77, "/memfd:x", true},
		{0x7ffd1c9e0000, 0x7ffd1ca01000, "rw-p", r | w, false, 0, 0, 0, "[stack]", false},
		{0xffffffffff600000, 0xffffffffff601000, "--xp", x, false, 0, 0, 0, "[vsyscall]", false},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d mappings, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("mapping %d:\n got %+v\nwant %+v", i, got[i], want[i])
		}
	}
	if got[0].Len() != 0x2000 {
		t.Errorf("Len = %#x, want 0x2000", got[0].Len())
	}
}

func TestParseMapsEdge(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		n       int    // mappings on success
		errLike string // substring of the error, "" for success
	}{
		{"empty", "", 0, ""},
		{"no trailing newline", "1000-2000 r--p 00000000 00:00 0", 1, ""},
		{"path with spaces only inside", "1000-2000 r--p 00000000 00:00 5   /a b  c\n", 1, ""},
		{"major wider than two digits", "1000-2000 r--p 00000000 103:05 5 /x\n", 1, ""},
		{"truncated after perms", "1000-2000 r--p", 0, "line 1"},
		{"truncated after dev", "1000-2000 r--p 00000000 00:00", 0, "missing device"},
		{"second line truncated", "1000-2000 r--p 00000000 00:00 0\n3000-", 0, "line 2"},
		{"blank line", "1000-2000 r--p 00000000 00:00 0\n\n3000-4000 r--p 00000000 00:00 0\n", 0, "line 2"},
		{"bad perms letter", "1000-2000 rwxq 00000000 00:00 0\n", 0, "perms"},
		{"perms too long", "1000-2000 rwxpp 00000000 00:00 0\n", 0, "perms"},
		{"perms in wrong order", "1000-2000 wr-p 00000000 00:00 0\n", 0, "perms"},
		{"start overflows", "1ffffffffffffffff-2000 r--p 00000000 00:00 0\n", 0, "start"},
		{"offset overflows", "1000-2000 r--p 1ffffffffffffffff 00:00 0\n", 0, "offset"},
		{"inode overflows", "1000-2000 r--p 0 00:00 99999999999999999999\n", 0, "inode"},
		{"start equals end", "2000-2000 r--p 00000000 00:00 0\n", 0, "range"},
		{"start above end", "3000-2000 r--p 00000000 00:00 0\n", 0, "range"},
		{"no dash", "10002000 r--p 00000000 00:00 0\n", 0, "range"},
		{"signed start", "+1000-2000 r--p 00000000 00:00 0\n", 0, "start"},
		{"hex prefix", "0x1000-0x2000 r--p 00000000 00:00 0\n", 0, "start"},
		{"dev without colon", "1000-2000 r--p 00000000 0000 0\n", 0, "device"},
		{"dev minor not hex", "1000-2000 r--p 00000000 00:zz 0\n", 0, "minor"},
		{"inode not number", "1000-2000 r--p 00000000 00:00 abc /x\n", 0, "inode"},
		{"double space in fields", "1000-2000  r--p 00000000 00:00 0\n", 0, "perms"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ms, err := ParseMaps([]byte(tc.in))
			if tc.errLike == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if len(ms) != tc.n {
					t.Fatalf("got %d mappings, want %d", len(ms), tc.n)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error, got %+v", ms)
			}
			if !strings.Contains(err.Error(), tc.errLike) {
				t.Fatalf("error %q does not mention %q", err, tc.errLike)
			}
		})
	}
	ms, err := ParseMaps([]byte("1000-2000 r--p 00000000 00:00 5   /a b  c\n"))
	if err != nil || ms[0].Path != "/a b  c" {
		t.Fatalf("path with spaces: %+v, %v", ms, err)
	}
}

// mkStat builds a /proc/PID/stat line with 52 fields whose field n is
// "n*1000" unless overridden; field 3 (state) defaults to "S".
func mkStat(comm string, over map[int]string) string {
	f := []string{"1234", "(" + comm + ")"}
	for n := 3; n <= 52; n++ {
		v := fmt.Sprint(n * 1000)
		if n == 3 {
			v = "S"
		}
		if o, ok := over[n]; ok {
			v = o
		}
		f = append(f, v)
	}
	return strings.Join(f, " ") + "\n"
}

func TestParseStat(t *testing.T) {
	base := Stat{State: 'S', PPid: 4000, PGrp: 5000, NumThreads: 20000, StartTime: 22000, RSSPages: 24000, StartCode: 26000, EndCode: 27000,
		StartStack: 28000, StartData: 45000, EndData: 46000, StartBrk: 47000,
		ArgStart: 48000, ArgEnd: 49000, EnvStart: 50000, EnvEnd: 51000}
	tests := []struct {
		name    string
		in      string
		want    Stat
		wantErr bool
	}{
		{"plain", mkStat("sleep", nil), base, false},
		{"hostile comm", mkStat("a) b (c", nil), base, false},
		{"comm with only parens", mkStat(")) ((", nil), base, false},
		{"empty comm", mkStat("", nil), base, false},
		{"state and max values", mkStat("x", map[int]string{3: "t", 26: "18446744073709551615"}),
			func() Stat { s := base; s.State = 't'; s.StartCode = 1<<64 - 1; return s }(), false},
		{"extra trailing fields", strings.TrimSuffix(mkStat("x", nil), "\n") + " 7 8 9\n", base, false},
		{"no newline", strings.TrimSuffix(mkStat("x", nil), "\n"), base, false},
		{"huge number", mkStat("x", map[int]string{27: "18446744073709551616"}), Stat{}, true},
		{"huge thread count", mkStat("x", map[int]string{20: "99999999999999999999"}), Stat{}, true},
		{"bad start time", mkStat("x", map[int]string{22: "-5"}), Stat{}, true},
		{"bad rss", mkStat("x", map[int]string{24: "1x"}), Stat{}, true},
		{"negative address", mkStat("x", map[int]string{45: "-1"}), Stat{}, true},
		{"long state", mkStat("x", map[int]string{3: "SS"}), Stat{}, true},
		{"empty field", mkStat("x", map[int]string{48: ""}), Stat{}, true},
		{"truncated", "1234 (sleep) S 1 2 3 4\n", Stat{}, true},
		{"truncated at env_start", strings.Join(strings.Fields(mkStat("x", nil))[:50], " "), Stat{}, true},
		{"no parens", "1234 sleep S 1\n", Stat{}, true},
		{"only close paren", "1234 sleep) S 1\n", Stat{}, true},
		{"bad pid", strings.Replace(mkStat("x", nil), "1234", "12a4", 1), Stat{}, true},
		{"nothing after comm", "1234 (x)", Stat{}, true},
		{"empty", "", Stat{}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseStat([]byte(tc.in))
			if tc.wantErr {
				if err == nil {
					t.Fatalf("no error, got %+v", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("got  %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

const sampleStatus = `Name:	a: b
Umask:	0027
State:	S (sleeping)
Tgid:	5547
Pid:	5547
PPid:	5543
TracerPid:	77
Uid:	1000	1001	1002	1003
Gid:	2000	2001	2002	2003
FDSize:	256
Groups:	4 24 27 
Threads:	3
SigQ:	0/96365
SigPnd:	0000000000000000
SigBlk:	0000000000010000
SigIgn:	0000000000001000
SigCgt:	fffffffe7fc1feff
CapPrm:	0000000000000400
CapEff:	000001fffeffffff
`

func TestParseStatus(t *testing.T) {
	want := Status{Threads: 3, TracerPid: 77, SigBlk: 1 << 16, SigIgn: 1 << 12, SigCgt: 0xfffffffe7fc1feff,
		Uid: [4]uint32{1000, 1001, 1002, 1003}, Gid: [4]uint32{2000, 2001, 2002, 2003},
		Groups: []uint32{4, 24, 27}, Umask: 0o027, State: "S (sleeping)", CapPrm: 0x400, CapEff: 0x1fffeffffff}
	noUmask := want
	noUmask.Umask = 0o022
	noGroups := want
	noGroups.Groups = []uint32{}
	drop := func(keys ...string) string {
		var out []string
	lines:
		for _, l := range strings.Split(sampleStatus, "\n") {
			for _, k := range keys {
				if strings.HasPrefix(l, k+":") {
					continue lines
				}
			}
			out = append(out, l)
		}
		return strings.Join(out, "\n")
	}
	tests := []struct {
		name    string
		in      string
		want    Status
		errLike string
	}{
		{"full", sampleStatus, want, ""},
		{"no umask", drop("Umask"), noUmask, ""},
		{"empty groups", strings.Replace(sampleStatus, "Groups:	4 24 27 ", "Groups:	 ", 1), noGroups, ""},
		{"missing uid", drop("Uid"), Status{}, "missing Uid"},
		{"missing several", drop("SigCgt", "Threads"), Status{}, "missing Threads, SigCgt"},
		{"three uids", strings.Replace(sampleStatus, "1000	1001	1002	1003", "1000	1001	1002", 1), Status{}, "Uid"},
		{"uid overflow", strings.Replace(sampleStatus, "1000	1001", "4294967296	1001", 1), Status{}, "Uid"},
		{"bad sigblk", strings.Replace(sampleStatus, "0000000000010000", "00000000000g0000", 1), Status{}, "SigBlk"},
		{"sigcgt too wide", strings.Replace(sampleStatus, "fffffffe7fc1feff", "1fffffffe7fc1feff", 1), Status{}, "SigCgt"},
		{"bad umask", strings.Replace(sampleStatus, "0027", "0029", 1), Status{}, "Umask"},
		{"line without colon", sampleStatus + "garbage\n", Status{}, "colon"},
		{"empty", "", Status{}, "missing State"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseStatus([]byte(tc.in))
			if tc.errLike != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errLike) {
					t.Fatalf("error %v, want one mentioning %q", err, tc.errLike)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got  %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestParseFDInfo(t *testing.T) {
	tests := []struct {
		in      string
		pos     int64
		flags   uint32
		wantErr bool
	}{
		{"pos:\t123\nflags:\t02102001\nmnt_id:\t30\nino:\t5\n", 123, 0o2102001, false},
		{"pos:\t0\nflags:\t00\n", 0, 0, false},
		{"pos:\t0\nflags:\t09\n", 0, 0, true},
		{"pos:\tx\nflags:\t00\n", 0, 0, true},
		{"flags:\t00\n", 0, 0, true},
	}
	for _, tc := range tests {
		pos, flags, err := parseFDInfo([]byte(tc.in))
		if (err != nil) != tc.wantErr || pos != tc.pos || flags != tc.flags {
			t.Errorf("parseFDInfo(%q) = %d, %#o, %v; want %d, %#o, err %v", tc.in, pos, flags, err, tc.pos, tc.flags, tc.wantErr)
		}
	}
}

func TestFDKindString(t *testing.T) {
	for k, want := range map[FDKind]string{FDRegular: "regular file", FDSocket: "socket", FDPipe: "pipe",
		FDAnonInode: "anon inode", FDMemfd: "memfd", FDDeleted: "deleted file", FDOther: "other", FDKind(99): "FDKind(99)"} {
		if got := k.String(); got != want {
			t.Errorf("%d.String() = %q, want %q", int(k), got, want)
		}
	}
	for target, want := range map[string]string{"anon_inode:[eventfd]": "eventfd", "anon_inode:inotify": "inotify",
		"socket:[5]": "socket", "anon_inode:[eventpoll]": "eventpoll"} {
		k, _ := classifyFD(target, unix.S_IFSOCK)
		fi := FDInfo{Target: target, Kind: k}
		if got := fi.Describe(); got != want {
			t.Errorf("Describe(%q) = %q, want %q", target, got, want)
		}
	}
}

func TestParseLimits(t *testing.T) {
	data := "Limit                     Soft Limit           Hard Limit           Units     \n" +
		"Max cpu time              unlimited            unlimited            seconds   \n" +
		"Max file size             unlimited            unlimited            bytes     \n" +
		"Max data size             unlimited            unlimited            bytes     \n" +
		"Max stack size            8388608              unlimited            bytes     \n" +
		"Max core file size        0                    unlimited            bytes     \n" +
		"Max resident set          unlimited            unlimited            bytes     \n" +
		"Max processes             94581                94581                processes \n" +
		"Max open files            123                  456                  files     \n" +
		"Max nice priority         0                    0                    \n"
	ls, err := ParseLimits([]byte(data))
	if err != nil {
		t.Fatal(err)
	}
	if len(ls) != 9 || ls[7] != (Limit{Resource: 7, Cur: 123, Max: 456}) || ls[3].Cur != 8388608 || ls[3].Max != ^uint64(0) || ls[8] != (Limit{Resource: 8}) {
		t.Fatalf("got %+v", ls)
	}
	for _, bad := range []string{"", "garbage\n", "Limit x\nMax open files            abc                  456                  files\n", "Limit x\nshort\n"} {
		if _, err := ParseLimits([]byte(bad)); err == nil {
			t.Errorf("ParseLimits(%q) accepted", bad)
		}
	}
	self, err := Limits(os.Getpid())
	if err != nil || len(self) < 16 {
		t.Fatalf("Limits(self) = %d limits, %v", len(self), err)
	}
	var nofile unix.Rlimit
	_ = unix.Getrlimit(unix.RLIMIT_NOFILE, &nofile)
	if self[unix.RLIMIT_NOFILE].Cur != nofile.Cur || self[unix.RLIMIT_NOFILE].Max != nofile.Max {
		t.Errorf("RLIMIT_NOFILE from /proc %+v, getrlimit %+v", self[unix.RLIMIT_NOFILE], nofile)
	}
}
