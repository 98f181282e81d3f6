package snapshot

import (
	"errors"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
)

// TestClassifySocket runs classifySocket on real sockets.
func TestClassifySocket(t *testing.T) {
	pair := func(typ int) [2]int {
		p, err := unix.Socketpair(unix.AF_UNIX, typ|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
		return p
	}
	sock := func(typ int) int {
		fd, err := unix.Socket(unix.AF_UNIX, typ|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	gone := pair(unix.SOCK_STREAM)
	unix.Close(gone[1])
	goneSeq := pair(unix.SOCK_SEQPACKET)
	unix.Close(goneSeq[1])
	queued := pair(unix.SOCK_STREAM)
	if _, err := unix.Write(queued[1], []byte("x")); err != nil {
		t.Fatal(err)
	}
	unix.Close(queued[1])
	live := pair(unix.SOCK_STREAM)
	bound := sock(unix.SOCK_STREAM)
	if err := unix.Bind(bound, &unix.SockaddrUnix{Name: filepath.Join(t.TempDir(), "s")}); err != nil {
		t.Fatal(err)
	}
	listening := sock(unix.SOCK_STREAM)
	if err := unix.Bind(listening, &unix.SockaddrUnix{Name: "@mitosis-test-" + t.Name()}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(listening, 1); err != nil {
		t.Fatal(err)
	}
	dgram := sock(unix.SOCK_DGRAM)
	for _, tc := range []struct {
		name          string
		fd            int
		state, sotype int
		live          bool
	}{
		{"socketpair end, peer closed", gone[0], descriptor.SocketPeerGone, unix.SOCK_STREAM, false},
		{"seqpacket end, peer closed", goneSeq[0], descriptor.SocketPeerGone, unix.SOCK_SEQPACKET, false},
		{"fresh stream socket", sock(unix.SOCK_STREAM), descriptor.SocketFresh, unix.SOCK_STREAM, false},
		{"peer closed, data queued", queued[0], 0, 0, true},
		{"connected pair", live[0], 0, 0, true},
		{"bound", bound, 0, 0, true},
		{"listening", listening, 0, 0, true},
		{"datagram", dgram, 0, 0, true},
	} {
		state, sotype, err := classifySocket(tc.fd)
		if tc.live {
			if !errors.Is(err, errLiveSocket) {
				t.Errorf("%s: (%d, %d, %v); want errLiveSocket", tc.name, state, sotype, err)
			}
			continue
		}
		if err != nil || state != tc.state || sotype != tc.sotype {
			t.Errorf("%s: (%d, %d, %v); want (%d, %d)", tc.name, state, sotype, err, tc.state, tc.sotype)
		}
	}
}
