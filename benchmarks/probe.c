/* The mount benchmark's measuring helper: system calls timed with nothing in between.
 *
 * benchmarks/mount.py compiles it (gcc -O2) into its work directory and runs it with
 * the current directory inside the mount. LIST is a file of NUL-terminated paths
 * relative to the mount, read into memory before any timing; only the loop over the
 * system calls is timed (CLOCK_MONOTONIC), so the helper's own cost is the loop and
 * the call: well under a microsecond per path, against tens of microseconds for a
 * FUSE round trip.
 *
 *   probe stat LIST                lstat() of every path, in LIST's order
 *   probe read LIST                read() every file start to end in 1 MiB calls
 *   probe random LIST COUNT SEED   COUNT pread()s of 4 KiB at random 4 KiB-aligned
 *                                  offsets, files chosen in proportion to their size;
 *                                  every file opened (and posix_fadvise'd RANDOM: no
 *                                  readahead, one 4 KiB request each) before timing
 *
 * Output, one line of key=value pairs: n (paths or reads), failed, bytes, seconds (of
 * the timed loop) and, for random, mean_us, p50_us, p99_us and max_us per read.
 * Exit status 1 if any call failed (the failures are counted, not printed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static char **read_list(const char *file, size_t *count) {
    FILE *f = fopen(file, "rb");
    if (!f) { perror(file); exit(2); }
    size_t cap = 1 << 20, len = 0;
    char *buf = malloc(cap);
    size_t got;
    while ((got = fread(buf + len, 1, cap - len, f)) > 0) {
        len += got;
        if (len == cap) buf = realloc(buf, cap *= 2);
    }
    fclose(f);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) n += buf[i] == '\0';
    char **paths = malloc((n + 1) * sizeof *paths);
    size_t k = 0;
    for (size_t i = 0; i < len && k < n; k++) {
        paths[k] = buf + i;
        i += strlen(buf + i) + 1;
    }
    *count = n;
    return paths;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static uint64_t rng_state;
static uint64_t next_random(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static int do_stat(char **paths, size_t n) {
    struct stat st;
    size_t failed = 0;
    double t = now();
    for (size_t i = 0; i < n; i++)
        if (lstat(paths[i], &st) != 0) failed++;
    t = now() - t;
    printf("n=%zu failed=%zu bytes=0 seconds=%.6f\n", n, failed, t);
    return failed != 0;
}

static int do_read(char **paths, size_t n) {
    const size_t size = 1 << 20;
    char *buf = malloc(size);
    size_t failed = 0;
    uint64_t bytes = 0;
    double t = now();
    for (size_t i = 0; i < n; i++) {
        int fd = open(paths[i], O_RDONLY);
        if (fd < 0) { failed++; continue; }
        ssize_t got;
        while ((got = read(fd, buf, size)) > 0) bytes += (uint64_t)got;
        if (got < 0) failed++;
        close(fd);
    }
    t = now() - t;
    printf("n=%zu failed=%zu bytes=%llu seconds=%.6f\n", n, failed, (unsigned long long)bytes, t);
    return failed != 0;
}

static int do_random(char **paths, size_t n, long count, uint64_t seed) {
    int *fds = malloc(n * sizeof *fds);
    uint64_t *ends = malloc(n * sizeof *ends), total = 0;
    size_t failed = 0;
    for (size_t i = 0; i < n; i++) {
        struct stat st;
        fds[i] = open(paths[i], O_RDONLY);
        if (fds[i] < 0 || fstat(fds[i], &st) != 0) { perror(paths[i]); return 2; }
        posix_fadvise(fds[i], 0, 0, POSIX_FADV_RANDOM);
        total += (uint64_t)st.st_size / 4096 * 4096;
        ends[i] = total;
    }
    if (total == 0) { fprintf(stderr, "no 4 KiB block to read\n"); return 2; }
    rng_state = seed;
    double *lat = malloc((size_t)count * sizeof *lat);
    char buf[4096];
    uint64_t bytes = 0;
    double t = now();
    for (long r = 0; r < count; r++) {
        uint64_t at = next_random() % (total / 4096) * 4096;
        size_t lo = 0, hi = n - 1; /* first file whose end is past at */
        while (lo < hi) {
            size_t mid = (lo + hi) / 2;
            if (ends[mid] > at) hi = mid; else lo = mid + 1;
        }
        uint64_t off = at - (lo ? ends[lo - 1] : 0);
        double t0 = now();
        ssize_t got = pread(fds[lo], buf, sizeof buf, (off_t)off);
        lat[r] = now() - t0;
        if (got != (ssize_t)sizeof buf) failed++; else bytes += (uint64_t)got;
    }
    t = now() - t;
    double sum = 0;
    for (long r = 0; r < count; r++) sum += lat[r];
    qsort(lat, (size_t)count, sizeof *lat, cmp_double);
    printf("n=%ld failed=%zu bytes=%llu seconds=%.6f mean_us=%.1f p50_us=%.1f p99_us=%.1f "
           "max_us=%.1f\n", count, failed, (unsigned long long)bytes, t, sum / count * 1e6,
           lat[count / 2] * 1e6, lat[(long)((double)count * 0.99)] * 1e6,
           lat[count - 1] * 1e6);
    return failed != 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: probe stat|read LIST | probe random LIST COUNT SEED\n");
        return 2;
    }
    size_t n;
    char **paths = read_list(argv[2], &n);
    if (strcmp(argv[1], "stat") == 0) return do_stat(paths, n);
    if (strcmp(argv[1], "read") == 0) return do_read(paths, n);
    if (strcmp(argv[1], "random") == 0 && argc == 5 && n > 0) {
        long count = atol(argv[3]);
        if (count <= 0) return 2;
        return do_random(paths, n, count, strtoull(argv[4], NULL, 10));
    }
    fprintf(stderr, "bad arguments\n");
    return 2;
}
