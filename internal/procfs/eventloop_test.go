package procfs

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFDsEventLoop reads the kernel's fdinfo of a real eventfd and epoll
// instance of this process.
func TestFDsEventLoop(t *testing.T) {
	efd, err := unix.Eventfd(5, unix.EFD_CLOEXEC|unix.EFD_SEMAPHORE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(epfd)
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: int32(efd), Pad: 77}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, efd, &ev); err != nil {
		t.Fatal(err)
	}
	fds, err := FDs(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	var e, p *FDInfo
	for i := range fds {
		switch fds[i].Num {
		case efd:
			e = &fds[i]
		case epfd:
			p = &fds[i]
		}
	}
	if e == nil || p == nil {
		t.Fatalf("eventfd %d or epoll %d not listed: %+v", efd, epfd, fds)
	}
	if e.AnonType() != "eventfd" || e.Eventfd.Count != 5 || !e.Eventfd.Semaphore || e.Eventfd.ID == 0 {
		t.Errorf("eventfd: %s %+v, want count 5, semaphore, an id", e.AnonType(), e.Eventfd)
	}
	// epoll_event.data is the union; Fd and Pad are its two halves. The
	// kernel adds EPOLLERR and EPOLLHUP to every watch.
	want := EpollTarget{TFD: efd, Events: uint32(unix.EPOLLIN|unix.EPOLLERR|unix.EPOLLHUP) | uint32(1<<31), Data: 77<<32 | uint64(efd), Ino: e.File.Ino}
	if p.AnonType() != "eventpoll" || len(p.Epoll) != 1 || p.Epoll[0] != want {
		t.Errorf("epoll: %s %+v, want [%+v]", p.AnonType(), p.Epoll, want)
	}
}

func TestParseEpollRejects(t *testing.T) {
	for _, in := range []string{
		"tfd: x events: 19 data: 1  pos:0 ino:1 sdev:2\n",
		"tfd: 5 events: 19\n",
		"tfd: 5 events: zz data: 1\n",
		"tfd: -1 events: 19 data: 1\n",
	} {
		if got, err := parseEpoll([]byte(in)); err == nil {
			t.Errorf("parseEpoll(%q) = %+v, want an error", in, got)
		}
	}
	if _, err := parseEventfd([]byte("pos:\t0\nflags:\t02\n")); err == nil {
		t.Errorf("parseEventfd without a count: want an error")
	}
}
