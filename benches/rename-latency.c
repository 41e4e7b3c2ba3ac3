/*
 * rename -> mode 0644 as a C writer sees it, with the writer's own rename
 * timed apart: for each DIR in turn, write DIR/.credentials.json.tmp (0600),
 * rename it over DIR/.credentials.json, and wait (inotify IN_ATTRIB on DIR,
 * no busy loop) until the file's mode is 0644; 3 ms between changes, the
 * first 20 per DIR not counted. Prints p50/p90 of both per DIR. Start one
 * watcher per DIR first (the bench binary's `floor DIR`, `floor-held DIR`,
 * or `cred-watch run` on a config whose source is there).
 * Build: cc -O2 -o rename-latency benches/rename-latency.c
 * Usage: rename-latency N DIR...
 */
#define _GNU_SOURCE
#include <sys/inotify.h>
#include <sys/stat.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <unistd.h>
#include <time.h>
#include <string.h>

#define MAX_DIRS 16
#define WARM_UP 20

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static long long wall_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static void drain(int in) {
  char buf[4096];
  while (read(in, buf, sizeof buf) > 0) {
  }
}

int main(int argc, char **argv) {
  if (argc < 3 || argc - 2 > MAX_DIRS) {
    fprintf(stderr, "usage: %s N DIR... (at most %d)\n", argv[0], MAX_DIRS);
    return 2;
  }
  int n = atoi(argv[1]), k = argc - 2;
  char **dirs = argv + 2;
  double *total = malloc(sizeof(double) * n * k), *renamed = malloc(sizeof(double) * n * k);
  int count[MAX_DIRS] = {0};
  int in = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  for (int d = 0; d < k; d++)
    inotify_add_watch(in, dirs[d], IN_ATTRIB);
  for (int i = 0; i < (n + WARM_UP) * k; i++) {
    int d = i % k;
    char tmp[512], target[512], data[400];
    snprintf(tmp, sizeof tmp, "%s/.credentials.json.tmp", dirs[d]);
    snprintf(target, sizeof target, "%s/.credentials.json", dirs[d]);
    /* Obviously fake tokens; only the prefixes matter to the validator. */
    int len = snprintf(data, sizeof data,
                       "{\"claudeAiOauth\":{\"accessToken\":\"sk-ant-oat01-bench%d\",\"refreshToken\":\"sk-ant-ort01-bench%d\",\"expiresAt\":%lld,\"scopes\":[\"user:inference\"],\"subscriptionType\":\"max\"}}",
                       i, i, wall_ms() + 3600000 + i);
    usleep(3000);
    drain(in);
    int f = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (f < 0 || write(f, data, len) != len) {
      perror(tmp);
      return 1;
    }
    close(f);
    double t0 = now_us();
    rename(tmp, target);
    double rename_us = now_us() - t0;
    struct stat st;
    int fixed = 0;
    while (now_us() < t0 + 1e6) {
      if (stat(target, &st) == 0 && (st.st_mode & 0777) == 0644) {
        fixed = 1;
        break;
      }
      struct pollfd p = {in, POLLIN, 0};
      poll(&p, 1, 100);
      drain(in);
    }
    if (fixed && i >= WARM_UP * k && count[d] < n) {
      renamed[d * n + count[d]] = rename_us;
      total[d * n + count[d]++] = now_us() - t0;
    }
  }
  for (int d = 0; d < k; d++) {
    int c = count[d];
    if (c == 0) {
      printf("%-40s nothing fixed\n", dirs[d]);
      continue;
    }
    qsort(total + d * n, c, sizeof(double), by_value);
    qsort(renamed + d * n, c, sizeof(double), by_value);
    printf("%-40s n=%d p50 %.1f p90 %.1f  rename p50 %.1f p90 %.1f\n", dirs[d], c,
           total[d * n + c / 2], total[d * n + c * 9 / 10], renamed[d * n + c / 2],
           renamed[d * n + c * 9 / 10]);
  }
  return 0;
}
