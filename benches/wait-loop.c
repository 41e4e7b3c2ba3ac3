/*
 * The floor for benches/wakeup-cost.sh: an inotify watch on DIR and a loop
 * that waits and reads its events, nothing else. MODE 0: blocking read;
 * 1: poll(2) on the inotify fd and two idle sockets, then read; 2: the
 * same with epoll; 3: epoll with a timeout of an hour (a deadline armed on
 * every wait, as an agent with a pending expiry has). Usage: wait-loop MODE DIR
 */
#include <sys/inotify.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <stdio.h>
int main(int argc, char **argv) {
  int mode = atoi(argv[1]);
  int fd = inotify_init1(mode == 0 ? IN_CLOEXEC : IN_CLOEXEC | IN_NONBLOCK);
  inotify_add_watch(fd, argv[2], IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_ATTRIB);
  int sv[2], sw[2]; socketpair(AF_UNIX, SOCK_STREAM, 0, sv); socketpair(AF_UNIX, SOCK_STREAM, 0, sw);
  char buf[4096];
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN};
  ev.data.u64 = 0; epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
  ev.data.u64 = 1; epoll_ctl(ep, EPOLL_CTL_ADD, sv[0], &ev);
  ev.data.u64 = 2; epoll_ctl(ep, EPOLL_CTL_ADD, sw[0], &ev);
  for (;;) {
    if (mode == 1) {
      struct pollfd p[3] = {{fd, POLLIN, 0}, {sv[0], POLLIN, 0}, {sw[0], POLLIN, 0}};
      poll(p, 3, -1);
    } else if (mode == 2 || mode == 3) {
      struct epoll_event out[3]; epoll_wait(ep, out, 3, mode == 3 ? 3600000 : -1);
    }
    read(fd, buf, sizeof buf);
  }
}
