package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// fileSpan is how much of the fake seed a fileProvider holds in its file;
// ranges beyond it are served by ReadPages.
const fileSpan = 32 << 20

// fileProvider is a fakeProvider that also holds the first fileSpan bytes
// of the seed in a memfd, at file offset fileBase + (addr - seedBase), and
// serves pages requests from there (FileProvider).
type fileProvider struct {
	fakeProvider
	fd int
	// pastEOF, if set, hands out offsets beyond the file's end (a page
	// cache that lost its pages): sendfile then sends nothing.
	pastEOF atomic.Bool
	files   atomic.Int64 // PageFile calls answered from the file
}

const fileBase = 3 * PageSize

func newFileProvider(t testing.TB) *fileProvider {
	t.Helper()
	fd, err := unix.MemfdCreate("zerocopy-src", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	buf := make([]byte, fileSpan)
	fillPattern(seedBase, buf)
	if _, err := unix.Pwrite(fd, buf, fileBase); err != nil {
		t.Fatal(err)
	}
	return &fileProvider{fd: fd}
}

func (p *fileProvider) PageFile(ctx context.Context, peer, seed string, ranges []Range) (int, []int64, func(), bool, error) {
	if seed != "a/s1" {
		return -1, nil, nil, false, fmt.Errorf("seed %q: %w", seed, ErrUnknownSeed)
	}
	offs := make([]int64, len(ranges))
	for i, g := range ranges {
		if g.Addr < seedBase || g.Addr+g.Len > seedBase+fileSpan {
			return -1, nil, nil, false, nil
		}
		offs[i] = fileBase + int64(g.Addr-seedBase)
		if p.pastEOF.Load() {
			offs[i] += 1 << 30
		}
	}
	fd, err := unix.FcntlInt(uintptr(p.fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, nil, nil, false, err
	}
	p.files.Add(1)
	return fd, offs, func() { unix.Close(fd) }, true, nil
}

var _ FileProvider = (*fileProvider)(nil)

// destFile is a memfd that ReadRangesTo fills; check compares its
// contents at offs with the seed's pattern at ranges.
func destFile(t testing.TB) int {
	t.Helper()
	fd, err := unix.MemfdCreate("zerocopy-dst", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func checkFile(t testing.TB, fd int, ranges []Range, offs []int64) {
	t.Helper()
	for i, g := range ranges {
		got := make([]byte, g.Len)
		if n, err := unix.Pread(fd, got, offs[i]); err != nil || n != len(got) {
			t.Fatalf("pread range %d: %d bytes, %v", i, n, err)
		}
		checkPattern(t, g.Addr, got)
	}
}

// layout gives ranges file offsets in reverse order with a page's gap, so
// that a piece written to the wrong place shows.
func layout(ranges []Range) []int64 {
	offs := make([]int64, len(ranges))
	var at int64 = PageSize
	for i := len(ranges) - 1; i >= 0; i-- {
		offs[i] = at
		at += int64(ranges[i].Len) + PageSize
	}
	return offs
}

// TestZeroCopy reads pages into a file (ReadRangesTo) and into a buffer
// from a server that sends them from a file (sendfile), over plain TCP
// (both ends zero-copy) and TLS (both fall back to copies): the contents
// must be the seed's either way, for one page, a split read, many ranges
// and ranges beyond the provider's file (served by ReadPages).
func TestZeroCopy(t *testing.T) {
	r := mrand.New(mrand.NewPCG(5, 6))
	var scattered []Range
	for range 300 {
		scattered = append(scattered, Range{Addr: seedBase + uint64(r.IntN(fileSpan/PageSize-8))*PageSize, Len: uint64(1+r.IntN(8)) * PageSize})
	}
	var counted []Range // more ranges than one request may carry
	for i := range 3000 {
		counted = append(counted, Range{Addr: seedBase + uint64(i)*2*PageSize, Len: PageSize})
	}
	reads := []struct {
		name   string
		ranges []Range
		inFile bool // wholly inside the provider's file
	}{
		{"one page", []Range{{seedBase + 5*PageSize, PageSize}}, true},
		{"split", []Range{{seedBase + 7*PageSize, 10<<20 + 3*PageSize}}, true},
		{"scattered", scattered, true},
		{"by count", counted, true},
		{"past the file", []Range{{seedBase + fileSpan - 2*PageSize, 6 * PageSize}, {seedBase + 40<<20, 64 * PageSize}}, false},
	}
	cert, pool := selfSigned(t)
	for _, secure := range []bool{false, true} {
		scfg, ccfg := serverCfg(), clientCfg()
		if secure {
			scfg.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
			ccfg.TLS = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}
		}
		p := newFileProvider(t)
		s, addr := startServer(t, scfg, p, "")
		c := dial(t, addr, ccfg)
		for _, rd := range reads {
			t.Run(fmt.Sprintf("tls=%v/%s", secure, rd.name), func(t *testing.T) {
				before, files := s.Stats(), p.files.Load()
				dst := destFile(t)
				offs := layout(rd.ranges)
				spliced, err := c.ReadRangesTo(context.Background(), "a/s1", rd.ranges, dst, offs)
				if err != nil {
					t.Fatal(err)
				}
				checkFile(t, dst, rd.ranges, offs)
				var total uint64
				for _, g := range rd.ranges {
					total += g.Len
				}
				buf := make([]byte, total)
				if err := c.ReadRanges(context.Background(), "a/s1", rd.ranges, buf); err != nil {
					t.Fatal(err)
				}
				at := uint64(0)
				for _, g := range rd.ranges {
					checkPattern(t, g.Addr, buf[at:at+g.Len])
					at += g.Len
				}
				sent := s.Stats().BytesSentFile - before.BytesSentFile
				switch {
				case secure && (sent != 0 || spliced != 0 || p.files.Load() != files):
					t.Errorf("TLS: %d bytes sent from the file, %d spliced, %d PageFile calls; want none", sent, spliced, p.files.Load()-files)
				case !secure && rd.inFile && sent != 2*total:
					t.Errorf("%d bytes sent from the file, want %d (both reads)", sent, 2*total)
				case !secure && !rd.inFile && sent != 0:
					t.Errorf("%d bytes sent from the file for ranges it does not hold", sent)
				case !secure && (spliced == 0 && total > 64<<10 || spliced > total):
					// (A small response arrives whole in the reader's
					// 64 KiB buffer with its header.)
					t.Errorf("%d of %d bytes spliced", spliced, total)
				}
			})
		}
		if st := c.Stats(); !secure && st.BytesSpliced == 0 || secure && st.BytesSpliced != 0 {
			t.Errorf("tls=%v: client stats %+v", secure, st)
		}
	}
}

// TestZeroCopyShortFile: a provider whose file lacks the pages it claims
// (sendfile sends nothing) costs the request its connection, not a hang
// or wrong data; the client's retry on a fresh connection fails the same
// way, and once the provider is sane again reads work.
func TestZeroCopyShortFile(t *testing.T) {
	p := newFileProvider(t)
	_, addr := startServer(t, serverCfg(), p, "")
	cfg := clientCfg()
	c := dial(t, addr, cfg)
	p.pastEOF.Store(true)
	dst := destFile(t)
	rs := []Range{{seedBase, 8 * PageSize}}
	if _, err := c.ReadRangesTo(context.Background(), "a/s1", rs, dst, []int64{0}); err == nil || !errors.Is(err, errConnLost) {
		t.Fatalf("read from a short file: %v, want a lost connection", err)
	}
	p.pastEOF.Store(false)
	if _, err := c.ReadRangesTo(context.Background(), "a/s1", rs, dst, []int64{0}); err != nil {
		t.Fatal(err)
	}
	checkFile(t, dst, rs, []int64{0})
}

// TestZeroCopyBadFile: a destination the client cannot write fails the
// request with the write's error, which is not retried (it is not the
// peer's fault); the connection it cut is replaced for the next read.
func TestZeroCopyBadFile(t *testing.T) {
	p := newFileProvider(t)
	s, addr := startServer(t, serverCfg(), p, "")
	c := dial(t, addr, clientCfg())
	ro, err := unix.Open("/proc/self/exe", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(ro)
	rs := []Range{{seedBase, 64 * PageSize}}
	reqs := s.Stats().PagesRequests
	_, err = c.ReadRangesTo(context.Background(), "a/s1", rs, ro, []int64{0})
	var fe *fileWriteError
	if !errors.As(err, &fe) || !errors.Is(err, unix.EBADF) {
		t.Fatalf("read into a read-only file: %v, want EBADF from the file write", err)
	}
	if n := s.Stats().PagesRequests - reqs; n != 1 {
		t.Errorf("the failed read was sent %d times, want once", n)
	}
	dst := destFile(t)
	if _, err := c.ReadRangesTo(context.Background(), "a/s1", rs, dst, []int64{PageSize}); err != nil {
		t.Fatal(err)
	}
	checkFile(t, dst, rs, []int64{PageSize})
	if _, err := c.ReadRangesTo(context.Background(), "a/s1", rs, dst, nil); !errors.Is(err, ErrBadRange) {
		t.Errorf("offsets missing: %v, want ErrBadRange", err)
	}
}
