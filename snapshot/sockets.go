package snapshot

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/mitosis-fork/mitosis/descriptor"
)

// sockProbe classifies socket fd num of a process: the kind of connection-
// less unix socket a child can get a fresh copy of (descriptor.SocketPeerGone
// or SocketFresh) and its type, or an error saying why it cannot be carried.
type sockProbe func(num int) (state int, sotype int, err error)

// probeSockets returns the sockProbe of process pid: it takes each socket
// with pidfd_getfd and looks at it from the daemon.
func probeSockets(pid int) sockProbe {
	return func(num int) (int, int, error) {
		pidfd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			return 0, 0, err
		}
		defer unix.Close(pidfd)
		fd, err := unix.PidfdGetfd(pidfd, num, 0)
		if err != nil {
			return 0, 0, err
		}
		defer unix.Close(fd)
		return classifySocket(fd)
	}
}

// errLiveSocket is a socket with a connection, an address or queued data.
var errLiveSocket = errors.New("a connected, listening or bound socket")

// classifySocket tells whether fd is a unix stream or seqpacket socket with
// nothing to carry:
//
//   - peer gone: connected once (getpeername succeeds) and both directions
//     shut down (poll: POLLHUP with POLLRDHUP), nothing queued to read;
//   - fresh: never connected (getpeername: ENOTCONN), not listening, no
//     local address (getsockname: an empty path).
func classifySocket(fd int) (int, int, error) {
	domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return 0, 0, err
	}
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return 0, 0, err
	}
	if domain != unix.AF_UNIX || (typ != unix.SOCK_STREAM && typ != unix.SOCK_SEQPACKET) {
		return 0, 0, errLiveSocket
	}
	if listening, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || listening != 0 {
		return 0, 0, errLiveSocket
	}
	if sa, err := unix.Getsockname(fd); err != nil {
		return 0, 0, err
	} else if u, ok := sa.(*unix.SockaddrUnix); ok && u.Name != "" && u.Name != "@" {
		// x/sys/unix reports an unbound socket (an address of the family
		// alone) as "@".
		return 0, 0, fmt.Errorf("%w (bound to %q)", errLiveSocket, u.Name)
	}
	_, perr := unix.Getpeername(fd)
	if errors.Is(perr, unix.ENOTCONN) {
		return descriptor.SocketFresh, typ, nil
	}
	if perr != nil {
		return 0, 0, perr
	}
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
	if _, err := unix.Poll(pfd, 0); err != nil {
		return 0, 0, err
	}
	const gone = unix.POLLHUP | unix.POLLRDHUP
	if pfd[0].Revents&gone != gone {
		return 0, 0, errLiveSocket
	}
	if n, err := unix.IoctlGetInt(fd, unix.SIOCINQ); err != nil || n != 0 {
		return 0, 0, fmt.Errorf("%w (%d bytes queued)", errLiveSocket, n)
	}
	return descriptor.SocketPeerGone, typ, nil
}
