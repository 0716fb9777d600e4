/*
 * loadgen: UDP load generator and sink for the relay benchmark (bench/relay.py).
 *
 * Payload (S bytes, default 140, host byte order, S >= 24):
 *   u32 magic "RBEN" | u32 flow id | u64 sequence number (per flow) | u64 CLOCK_MONOTONIC ns | filler
 * The sink finds it at (datagram length - S), so it works behind any header the forwarder
 * prepends; datagrams without the magic there (e.g. forwarded STUN preambles) count as "other".
 *
 * loadgen gen -t IP:PORT [-f flows] [-s size] (-n count | -r pps -d seconds) [-b batch]
 *             [-S BASE_IP:BASE_PORT] [-o first_flow] [-P preamble_file [-R preamble_pps]]
 *             [-w preamble_wait_ms] [-G] [-T max_seconds]
 *   F flows (up to 2^20) = F UDP sockets, each connected to the target, bound to ephemeral
 *   loopback ports, or with -S to the fixed addresses of a source plan (below). Batches of b
 *   datagrams go out with sendmmsg, flow after flow. Raises RLIMIT_NOFILE to F + 64 (the hard
 *   limit too when allowed, up to fs.nr_open), else exits 2 saying so.
 *   -o: this process's flow i is flow first_flow + i (payload flow id, plan address, preamble
 *   record): one load split over several processes, each within its open files limit.
 *   -n: as fast as possible, N datagrams in all (drain tests).  -r/-d: paced at R pps for D s,
 *   with clock_nanosleep(TIMER_ABSTIME) between batches (batch 1 for latency runs).
 *   -P: a file of records (u32 big-endian length + bytes); flow i sends record i once before
 *   any traffic (e.g. a STUN Binding Request the relay learns the flow from), then waits -w ms.
 *   -R paces them (default: back to back). With -P, -n 0 sends the preambles only.
 *   -G: after the preambles print "ARMED" and wait for a line (or EOF) on stdin before sending.
 *   -E: also receive what comes to the flow sockets (the clients' side of the transceiver ->
 *   client direction, `tgen` below, through a forwarder): a thread, epoll over the sockets,
 *   recvmmsg. After the last send it waits for -e datagrams with the magic (default: as many as
 *   it sent), or until none came for -i ms (default 300; with -e, counted from the first one).
 *   Prints one JSON line at the end: sent, send_errors, start_ns, end_ns, pps, cpu_s (this
 *   process's CPU time while sending, both threads: a load CPU near saturation makes a lower
 *   bound), ...; with -E also back (datagrams received with the magic) and
 *   back_p50/p99/p999/max_ns (receive time - the payload's send timestamp: one way from `tgen`).
 *
 * Source plan (-S BASE_IP:BASE_PORT, IPv4): flow (or record) i binds to
 *   BASE_IP + i / PER_IP (as a 32-bit integer) : BASE_PORT + i % PER_IP, PER_IP = 32768 - BASE_PORT,
 *   i.e. below Linux's ephemeral range, where nothing else is likely to hold a port (127/8 is
 *   all loopback). Two runs with the same plan use the same 5-tuples: a forwarder that learned
 *   them once keeps hitting. No SO_REUSEADDR: an address in use exits 2 naming it.
 *
 * loadgen churn -t IP:PORT -P preamble_file -S BASE_IP:BASE_PORT -r rate -d seconds [-T max_seconds]
 *   New sessions arriving: at `rate` records per second (clock_nanosleep; several per wake-up
 *   above 20k/s), record i goes out from a new socket bound to plan address i, which is then
 *   closed. Stops after the last record, `seconds`, or max_seconds. Prints one JSON line:
 *   planned, sent, errors, elapsed_ns, rate (achieved), cpu_s.
 *
 * loadgen tgen [-B bind_ip] [-p port] [-f flows] [-s size] -r pps -d seconds [-b batch] [-T max_seconds]
 *   The transceivers' side of the transceiver -> client direction. Bound where a forwarder sends
 *   its flows (the sink's address), it first learns each flow from one datagram of it (payload
 *   flow ids 0 .. flows-1, e.g. `gen -n FLOWS -b 1` through the forwarder): the address it came
 *   from (the relay worker's tunnel address) and, when it carries the 24-byte tunnel header,
 *   the header's first 22 bytes (the flow's Data prefix: its handle, client address and port).
 *   Once every flow is known it prints "ARMED" and waits for a line (or EOF) on stdin, then
 *   sends paced Data frames (that prefix, the payload length, a payload as gen's) to each flow's
 *   address from its own socket, b per flow in turn: the forwarder strips the header and sends
 *   the payload to the client (the flow's gen socket, read by `gen -E`). A datagram learned
 *   without a header (no forwarder: the baseline) is answered without one. Prints one JSON
 *   line: flows, learned, sent, send_errors, pps, cpu_s, ...
 *
 * loadgen sink [-B bind_ip] [-p port] [-s size] [-e expected] [-i idle_ms] [-T max_seconds]
 *              [-D late_ns] [-L max_latency_samples] [-r rcvbuf] [-H] [-K]
 *   Prints "READY <port> rcvbuf=<bytes>" once bound, receives with recvmmsg, and prints one
 *   JSON line when it has `expected` datagrams, or was idle for idle_ms after the first one,
 *   or after max_seconds, or on SIGTERM/SIGINT: received, first/last rx time, latency
 *   percentiles (one-way: rx time - tx timestamp, same clock), late (> late_ns), loss by
 *   sequence gaps, header length seen, cpu_s; -H also checks the 24-byte relay tunnel header.
 *   -K also records kernel receive timestamps (SO_TIMESTAMPNS, CLOCK_REALTIME, taken when the
 *   sender's packet reaches this socket): k_first/k_last/k_span/k_pps stay exact even if the sink
 *   itself was stopped (SIGSTOP) while packets queued — the drain test uses that.
 *
 * sink and tgen with LOADGEN_FD=n in the environment: receive on that inherited socket, bound
 * to -p by the caller, instead of binding one (see bind_local).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x4E454252u /* "RBEN" little-endian */
#define MIN_SIZE 24
#define MAX_DGRAM 4096
#define MAX_BATCH 256
#define MAX_FLOWS (1 << 20)
#define EPHEMERAL_LO 32768 /* Linux's default ephemeral port range starts here */
#define HDR 24

static volatile sig_atomic_t g_stop = 0;
static void on_term(int sig) {
    (void)sig;
    g_stop = 1;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* user + system CPU time of this process */
static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void sleep_until(uint64_t t) {
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR && !g_stop) {}
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void fail(const char *msg) {
    fprintf(stderr, "loadgen: %s\n", msg);
    exit(2);
}

/* "IP:PORT" or "[IPv6]:PORT" */
static int parse_addr(const char *s, struct sockaddr_storage *out, socklen_t *outlen) {
    char host[80];
    const char *colon = strrchr(s, ':');
    if (!colon) return -1;
    const char *h = s;
    size_t hl = (size_t)(colon - s);
    if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (hl >= sizeof host) return -1;
    memcpy(host, h, hl);
    host[hl] = 0;
    long port = strtol(colon + 1, NULL, 10);
    if (port < 0 || port > 65535) return -1;
    memset(out, 0, sizeof *out);
    struct sockaddr_in *a4 = (struct sockaddr_in *)out;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        *outlen = sizeof *a4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        *outlen = sizeof *a6;
        return 0;
    }
    return -1;
}

static int set_rcvbuf(int fd, int bytes) {
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
    int eff = 0;
    socklen_t len = sizeof eff;
    getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &eff, &len);
    return eff;
}

static void install_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term; /* no SA_RESTART */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* n receive headers over bufs (one datagram each), from names[i] when names is given */
static void rx_init(struct mmsghdr *msgs, struct iovec *iov, uint8_t (*bufs)[MAX_DGRAM], int n,
                    struct sockaddr_storage *names) {
    memset(msgs, 0, (size_t)n * sizeof *msgs);
    for (int i = 0; i < n; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = MAX_DGRAM;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        if (names) msgs[i].msg_hdr.msg_name = &names[i];
    }
}

/* A UDP socket bound to ip:port (0: any), receive timeout 50 ms; its port in *bound, its
 * effective receive buffer in *eff. With LOADGEN_FD in the environment: that inherited socket,
 * which the caller keeps bound between runs (udpload.hold_port: a closed port answers a relay
 * with ICMP port unreachable, and the relay drops every flow of that "transceiver"), emptied of
 * what an earlier run left in it. */
static int bind_local(const char *ip, int port, int rcvbuf, int *bound, int *eff, const char *who) {
    struct sockaddr_storage addr;
    socklen_t alen;
    char spec[128];
    snprintf(spec, sizeof spec, strchr(ip, ':') ? "[%s]:%d" : "%s:%d", ip, port);
    if (parse_addr(spec, &addr, &alen)) fail("bad -B/-p");
    const char *held = getenv("LOADGEN_FD");
    int fd;
    if (held && *held) {
        fd = atoi(held);
        char junk[2048];
        while (recv(fd, junk, sizeof junk, MSG_DONTWAIT) >= 0) {
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK) die("LOADGEN_FD");
        *eff = set_rcvbuf(fd, rcvbuf);
    } else {
        fd = socket(addr.ss_family, SOCK_DGRAM, 0);
        if (fd < 0) die("socket");
        *eff = set_rcvbuf(fd, rcvbuf);
        if (bind(fd, (struct sockaddr *)&addr, alen) != 0) die(who);
    }
    struct timeval tv = {.tv_sec = 0, .tv_usec = 50000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_storage b;
    socklen_t blen = sizeof b;
    getsockname(fd, (struct sockaddr *)&b, &blen);
    *bound = ntohs(b.ss_family == AF_INET ? ((struct sockaddr_in *)&b)->sin_port
                                          : ((struct sockaddr_in6 *)&b)->sin6_port);
    if (held && *held && port && *bound != port) fail("LOADGEN_FD is not bound to -p");
    return fd;
}

/* Print "ARMED", then wait (at most max_s) for a line or EOF on stdin. */
static void armed_wait(double max_s, const char *who) {
    printf("ARMED\n");
    fflush(stdout);
    struct pollfd pfd = {.fd = 0, .events = POLLIN};
    if (poll(&pfd, 1, (int)(max_s * 1000)) <= 0) {
        fprintf(stderr, "loadgen: %s: no go signal on stdin\n", who);
        exit(2);
    }
    char line[64];
    if (read(0, line, sizeof line) < 0) die("read stdin");
}

/* sendmmsg all n, retrying what the kernel refuses for a moment (bounded); how many went */
static int send_all(int fd, struct mmsghdr *msgs, int n) {
    int done = 0, retries = 0;
    while (done < n) {
        int r = sendmmsg(fd, msgs + done, (unsigned)(n - done), 0);
        if (r < 0) {
            if ((errno == EINTR || errno == ECONNREFUSED || errno == EAGAIN || errno == ENOBUFS) && ++retries < 8)
                continue;
            break;
        }
        done += r;
    }
    return done;
}

/* ------------------------------------------------------------------ source plan */

struct plan {
    uint32_t ip; /* host order */
    int port, per_ip;
};

static void parse_plan(const char *s, struct plan *p) {
    struct sockaddr_storage a;
    socklen_t l;
    if (parse_addr(s, &a, &l) || a.ss_family != AF_INET) fail("-S wants an IPv4 BASE_IP:BASE_PORT");
    const struct sockaddr_in *a4 = (const struct sockaddr_in *)&a;
    p->ip = ntohl(a4->sin_addr.s_addr);
    p->port = ntohs(a4->sin_port);
    if (p->port < 1 || p->port >= EPHEMERAL_LO) fail("-S: BASE_PORT must be 1..32767 (below the ephemeral range)");
    p->per_ip = EPHEMERAL_LO - p->port;
}

/* Bind fd to plan address i. In use: exit 2 naming it (a shared tuple would merge two flows). */
static void bind_plan(int fd, const struct plan *p, uint64_t i) {
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(p->ip + (uint32_t)(i / (uint64_t)p->per_ip));
    a.sin_port = htons((uint16_t)(p->port + (int)(i % (uint64_t)p->per_ip)));
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0) return;
    int err = errno;
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &a.sin_addr, ip, sizeof ip);
    fprintf(stderr, "loadgen: bind source address %s:%d (index %" PRIu64 " of the -S plan): %s%s\n", ip,
            ntohs(a.sin_port), i, strerror(err),
            err == EADDRINUSE ? " (another process holds it: another generator with the same -S?)" : "");
    exit(2);
}

/* An ephemeral port on the loopback address of `family` (gen without -S). */
static void bind_loopback(int fd, int family) {
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    int r = family == AF_INET ? bind(fd, (struct sockaddr *)&a4, sizeof a4)
                              : bind(fd, (struct sockaddr *)&a6, sizeof a6);
    if (r != 0) die("bind flow socket");
}

/* One socket per flow: make room for `need` descriptors, or say why not. */
static void raise_nofile(rlim_t need) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) die("getrlimit");
    if (rl.rlim_cur >= need) return;
    struct rlimit want = {need, rl.rlim_max >= need ? rl.rlim_max : need}; /* hard: needs CAP_SYS_RESOURCE */
    if (setrlimit(RLIMIT_NOFILE, &want) == 0) return;
    int err = errno;
    long nr_open = -1;
    FILE *f = fopen("/proc/sys/fs/nr_open", "r");
    if (f) {
        if (fscanf(f, "%ld", &nr_open) != 1) nr_open = -1;
        fclose(f);
    }
    fprintf(stderr, "loadgen: need %llu open files (one per flow + 64), soft limit %llu, hard limit %llu, "
            "fs.nr_open %ld: raising failed (%s); raise `ulimit -n` (as root up to fs.nr_open) or use fewer flows\n",
            (unsigned long long)need, (unsigned long long)rl.rlim_cur, (unsigned long long)rl.rlim_max, nr_open,
            strerror(err));
    exit(2);
}

/* ------------------------------------------------------------------ gen */

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int64_t pct(const int64_t *v, size_t n, double q) {
    if (!n) return -1;
    size_t i = (size_t)(q * (double)n);
    if (i >= n) i = n - 1;
    return v[i];
}


struct preambles {
    uint8_t *data;
    size_t *off;
    uint32_t *len;
    size_t n;
};

static void read_preambles(const char *path, struct preambles *p) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    size_t cap = 0, size = 0;
    uint8_t *data = NULL;
    for (;;) {
        if (size + 65536 > cap) {
            cap = cap ? cap * 2 : 1 << 20;
            data = realloc(data, cap);
            if (!data) die("realloc");
        }
        size_t r = fread(data + size, 1, cap - size, f);
        size += r;
        if (r == 0) break;
    }
    fclose(f);
    size_t n = 0, pos = 0, ncap = 1024;
    p->off = malloc(ncap * sizeof *p->off);
    p->len = malloc(ncap * sizeof *p->len);
    while (pos + 4 <= size) {
        uint32_t l = ((uint32_t)data[pos] << 24) | ((uint32_t)data[pos + 1] << 16) | ((uint32_t)data[pos + 2] << 8) |
                     data[pos + 3];
        pos += 4;
        if (l > MAX_DGRAM || pos + l > size) fail("preamble file: bad record length");
        if (n == ncap) {
            ncap *= 2;
            p->off = realloc(p->off, ncap * sizeof *p->off);
            p->len = realloc(p->len, ncap * sizeof *p->len);
        }
        p->off[n] = pos;
        p->len[n] = l;
        n++;
        pos += l;
    }
    if (pos != size) fail("preamble file: trailing bytes");
    p->data = data;
    p->n = n;
}

/* gen -E: what comes to the flow sockets, received by a thread of its own */
struct back_rx {
    int *fds, flows, size;
    size_t max_samples, nlat;
    int64_t *lat;
    uint64_t received, last_ns; /* atomics: read by the sending thread */
    volatile int stop;
};

static void *back_receiver(void *arg) {
    struct back_rx *e = arg;
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < e->flows; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, e->fds[i], &ev) != 0) die("epoll_ctl");
    }
    enum { B = 64, EV = 256 };
    static uint8_t bufs[B][MAX_DGRAM];
    struct mmsghdr msgs[B];
    struct iovec iov[B];
    struct epoll_event evs[EV];
    rx_init(msgs, iov, bufs, B, NULL);
    while (!e->stop && !g_stop) {
        int k = epoll_wait(ep, evs, EV, 50);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int j = 0; j < k; j++) {
            int fd = e->fds[evs[j].data.u32];
            for (;;) {
                int n = recvmmsg(fd, msgs, B, MSG_DONTWAIT, NULL);
                if (n <= 0) break; /* EAGAIN (drained), or ECONNREFUSED from an earlier send */
                uint64_t rx = now_ns(), got = 0;
                for (int i = 0; i < n; i++) {
                    int len = (int)msgs[i].msg_len;
                    uint32_t magic;
                    if (len < e->size || (memcpy(&magic, bufs[i] + len - e->size, 4), magic != MAGIC)) continue;
                    uint64_t ts;
                    memcpy(&ts, bufs[i] + len - e->size + 16, 8);
                    if (e->nlat < e->max_samples) e->lat[e->nlat++] = (int64_t)(rx - ts);
                    got++;
                }
                if (got) {
                    __atomic_add_fetch(&e->received, got, __ATOMIC_RELAXED);
                    __atomic_store_n(&e->last_ns, rx, __ATOMIC_RELAXED);
                }
                if (n < B) break;
            }
        }
    }
    close(ep);
    return NULL;
}

static int cmd_gen(int argc, char **argv) {
    struct sockaddr_storage target;
    socklen_t tlen = 0;
    int have_t = 0, flows = 64, size = 140, batch = 0, wait_go = 0;
    long long count = 0;
    double rate = 0, duration = 0, max_s = 60, preamble_rate = 0;
    long preamble_wait_ms = 100;
    const char *preamble_path = NULL;
    struct plan plan = {0};
    long first = 0, idle_ms = 300;
    long long expect_back = -1;
    int receive = 0;
    int opt;
    while ((opt = getopt(argc, argv, "t:f:s:n:r:d:b:P:R:w:GT:S:o:Ei:e:")) != -1) {
        switch (opt) {
        case 't': if (parse_addr(optarg, &target, &tlen)) fail("bad -t"); have_t = 1; break;
        case 'f': flows = atoi(optarg); break;
        case 's': size = atoi(optarg); break;
        case 'n': count = atoll(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'b': batch = atoi(optarg); break;
        case 'P': preamble_path = optarg; break;
        case 'w': preamble_wait_ms = atol(optarg); break;
        case 'G': wait_go = 1; break;
        case 'T': max_s = atof(optarg); break;
        case 'S': parse_plan(optarg, &plan); break;
        case 'o': first = atol(optarg); break;
        case 'R': preamble_rate = atof(optarg); break;
        case 'E': receive = 1; break;
        case 'i': idle_ms = atol(optarg); break;
        case 'e': expect_back = atoll(optarg); break;
        default: fail("usage: loadgen gen -t IP:PORT [-f flows] [-s size] (-n count | -r pps -d s) ...");
        }
    }
    if (!have_t) fail("gen: -t IP:PORT is required");
    if (flows < 1 || first < 0 || first + flows > MAX_FLOWS) fail("gen: -o + -f out of range (at most 2^20 flows)");
    if (size < MIN_SIZE || size > MAX_DGRAM) fail("gen: -s must be 24..4096");
    int paced = rate > 0;
    if (paced) {
        if (duration <= 0) fail("gen: -r needs -d seconds");
        count = (long long)(rate * duration + 0.5);
    }
    if (count < 0 || (count == 0 && !preamble_path)) fail("gen: give -n count or -r pps -d seconds");
    if (max_s <= 0) max_s = 60;
    if (batch <= 0) {
        batch = paced ? (int)(rate * 50e-6) : 64; /* paced: one batch per ~50 us */
        if (batch < 1) batch = 1;
        if (batch > 64) batch = 64;
    }
    if (batch > MAX_BATCH) batch = MAX_BATCH;

    struct preambles pre = {0};
    if (preamble_path) {
        read_preambles(preamble_path, &pre);
        if (pre.n < (size_t)(first + flows)) fail("gen: fewer preamble records than flows");
    }

    int family = target.ss_family;
    if (plan.per_ip && family != AF_INET) fail("gen: -S needs an IPv4 target");
    raise_nofile((rlim_t)flows + 64);
    int *fds = malloc((size_t)flows * sizeof *fds);
    uint64_t *seq = calloc((size_t)flows, sizeof *seq);
    if (!fds || !seq) die("malloc");
    for (int i = 0; i < flows; i++) {
        int fd = socket(family, SOCK_DGRAM, 0);
        if (fd < 0) die("socket");
        if (plan.per_ip) bind_plan(fd, &plan, (uint64_t)(first + i));
        else bind_loopback(fd, family);
        if (connect(fd, (struct sockaddr *)&target, tlen) != 0) die("connect flow socket");
        fds[i] = fd;
    }

    uint64_t preambles_sent = 0, send_errors = 0;
    if (pre.n) {
        uint64_t t0 = now_ns();
        for (int i = 0; i < flows && !g_stop; i++) {
            if (preamble_rate > 0) sleep_until(t0 + (uint64_t)((double)i * 1e9 / preamble_rate));
            size_t r = (size_t)(first + i);
            if (send(fds[i], pre.data + pre.off[r], pre.len[r], 0) == (ssize_t)pre.len[r]) preambles_sent++;
            else send_errors++;
        }
        if (preamble_wait_ms > 0) sleep_until(now_ns() + (uint64_t)preamble_wait_ms * 1000000ull);
    }
    if (wait_go) armed_wait(max_s, "gen");

    uint8_t *bufs = calloc((size_t)batch, (size_t)size);
    struct mmsghdr *msgs = calloc((size_t)batch, sizeof *msgs);
    struct iovec *iov = calloc((size_t)batch, sizeof *iov);
    if (!bufs || !msgs || !iov) die("calloc");
    for (int i = 0; i < batch; i++) {
        uint8_t *b = bufs + (size_t)i * size;
        for (int k = MIN_SIZE; k < size; k++) b[k] = (uint8_t)(0x80 | (k & 0x3f)); /* looks like RTP */
        iov[i].iov_base = b;
        iov[i].iov_len = (size_t)size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }

    struct back_rx back = {.fds = fds, .flows = flows, .size = size, .max_samples = 4u << 20};
    pthread_t back_thread;
    if (receive) {
        back.lat = malloc(back.max_samples * sizeof *back.lat);
        if (!back.lat) die("malloc");
        int err = pthread_create(&back_thread, NULL, back_receiver, &back);
        if (err) {
            errno = err;
            die("pthread_create");
        }
    }

    uint64_t t_start = now_ns();
    double cpu0 = cpu_s();
    uint64_t t_limit = t_start + (uint64_t)(max_s * 1e9);
    double ns_per_pkt = paced ? 1e9 / rate : 0;
    long long sent = 0, attempted = 0;
    uint32_t flow = 0;
    while (attempted < count && !g_stop) {
        int n = batch;
        if (count - attempted < n) n = (int)(count - attempted);
        if (paced) sleep_until(t_start + (uint64_t)((double)attempted * ns_per_pkt));
        uint64_t ts = now_ns();
        if (ts > t_limit) break;
        for (int i = 0; i < n; i++) {
            uint8_t *b = bufs + (size_t)i * size;
            uint32_t magic = MAGIC;
            uint64_t s = seq[flow]++;
            uint32_t id = (uint32_t)first + flow;
            memcpy(b, &magic, 4);
            memcpy(b + 4, &id, 4);
            memcpy(b + 8, &s, 8);
            memcpy(b + 16, &ts, 8);
        }
        int done = send_all(fds[flow], msgs, n);
        send_errors += (uint64_t)(n - done);
        sent += done;
        attempted += n;
        flow = (flow + 1) % (uint32_t)flows;
    }
    uint64_t t_end = now_ns();
    if (receive) { /* what is still to come: all of it, or until none came for idle_ms */
        uint64_t want = expect_back >= 0 ? (uint64_t)expect_back : (uint64_t)sent;
        for (;;) {
            /* (the receiver's time first: it is never after t, whose difference is unsigned) */
            uint64_t last = __atomic_load_n(&back.last_ns, __ATOMIC_RELAXED), t = now_ns();
            if (__atomic_load_n(&back.received, __ATOMIC_RELAXED) >= want || g_stop || t > t_limit) break;
            if (expect_back >= 0 && !last) last = t; /* -e: the idle time starts with the first */
            uint64_t since = last > t_end ? last : t_end;
            if (t > since && t - since > (uint64_t)idle_ms * 1000000ull) break;
            sleep_until(t + 2000000ull);
        }
        back.stop = 1;
        pthread_join(back_thread, NULL);
    }
    double el = (double)(t_end - t_start);
    printf("{\"mode\":\"gen\",\"first_flow\":%ld,\"flows\":%d,\"size\":%d,\"batch\":%d,\"target_pps\":%.0f,"
           "\"planned\":%lld,"
           "\"sent\":%lld,\"send_errors\":%" PRIu64 ",\"preambles\":%" PRIu64 ",\"start_ns\":%" PRIu64
           ",\"end_ns\":%" PRIu64 ",\"elapsed_ns\":%" PRIu64 ",\"pps\":%.1f,\"cpu_s\":%.3f",
           first, flows, size, batch, paced ? rate : 0.0, count, sent, send_errors, preambles_sent, t_start, t_end,
           t_end - t_start, el > 0 ? (double)sent * 1e9 / el : 0.0, cpu_s() - cpu0);
    if (receive) {
        qsort(back.lat, back.nlat, sizeof *back.lat, cmp_i64);
        printf(",\"back\":%" PRIu64 ",\"back_p50_ns\":%" PRId64 ",\"back_p99_ns\":%" PRId64
               ",\"back_p999_ns\":%" PRId64 ",\"back_max_ns\":%" PRId64,
               back.received, pct(back.lat, back.nlat, 0.50), pct(back.lat, back.nlat, 0.99),
               pct(back.lat, back.nlat, 0.999), back.nlat ? back.lat[back.nlat - 1] : -1);
    }
    printf("}\n");
    fflush(stdout);
    return 0;
}

/* ------------------------------------------------------------------ churn */

static int cmd_churn(int argc, char **argv) {
    struct sockaddr_storage target;
    socklen_t tlen = 0;
    struct plan plan = {0};
    const char *preamble_path = NULL;
    double rate = 0, duration = 0, max_s = 60;
    int have_t = 0, opt;
    while ((opt = getopt(argc, argv, "t:P:S:r:d:T:")) != -1) {
        switch (opt) {
        case 't': if (parse_addr(optarg, &target, &tlen)) fail("bad -t"); have_t = 1; break;
        case 'P': preamble_path = optarg; break;
        case 'S': parse_plan(optarg, &plan); break;
        case 'r': rate = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'T': max_s = atof(optarg); break;
        default: fail("usage: loadgen churn -t IP:PORT -P preamble_file -S BASE_IP:BASE_PORT -r rate -d s [-T max_s]");
        }
    }
    if (!have_t || target.ss_family != AF_INET) fail("churn: -t IPv4:PORT is required");
    if (!preamble_path || !plan.per_ip) fail("churn: -P and -S are required");
    if (rate <= 0 || duration <= 0) fail("churn: -r rate and -d seconds must be > 0");
    if (max_s <= 0) max_s = 60;
    struct preambles pre = {0};
    read_preambles(preamble_path, &pre);
    uint64_t planned = (uint64_t)(rate * duration + 0.5);
    if (planned > pre.n) planned = pre.n;
    /* above ~20k/s a wake-up per record costs more than the records: a few per wake-up */
    uint64_t per_wake = rate > 20000 ? (uint64_t)(rate * 50e-6) + 1 : 1;
    double ns_per = 1e9 / rate;

    uint64_t t_start = now_ns(), sent = 0, errors = 0, i = 0;
    /* a run that falls behind stops a little past its duration (slack for the last wake-up) */
    uint64_t t_end_plan = t_start + (uint64_t)((duration * 1.05 + 0.05) * 1e9);
    uint64_t t_limit = t_start + (uint64_t)(max_s * 1e9);
    for (; i < planned && !g_stop; i++) {
        if (i % per_wake == 0) {
            sleep_until(t_start + (uint64_t)((double)i * ns_per));
            uint64_t t = now_ns();
            if (t > t_end_plan || t > t_limit) break;
        }
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        if (fd < 0) {
            errors++;
            continue;
        }
        bind_plan(fd, &plan, i);
        if (sendto(fd, pre.data + pre.off[i], pre.len[i], 0, (struct sockaddr *)&target, tlen) == (ssize_t)pre.len[i])
            sent++;
        else errors++;
        close(fd);
    }
    uint64_t t_end = now_ns();
    double el = (double)(t_end - t_start);
    printf("{\"mode\":\"churn\",\"target_rate\":%.0f,\"planned\":%" PRIu64 ",\"attempted\":%" PRIu64
           ",\"sent\":%" PRIu64 ",\"errors\":%" PRIu64 ",\"start_ns\":%" PRIu64 ",\"end_ns\":%" PRIu64
           ",\"elapsed_ns\":%" PRIu64 ",\"rate\":%.1f,\"cpu_s\":%.3f}\n",
           rate, planned, i, sent, errors, t_start, t_end, t_end - t_start, el > 0 ? (double)sent * 1e9 / el : 0.0,
           cpu_s());
    fflush(stdout);
    return 0;
}

/* ------------------------------------------------------------------ tgen */

static int header_ok(const uint8_t *h, int size) {
    return h[0] == 0x01 && h[1] == 0x95 && h[2] == 0x01 && h[3] == 0xcf && h[12] == 0xc4 && h[13] == 0x04 &&
           h[18] == 0xcd && h[21] == 0xc5 && (((int)h[22] << 8) | h[23]) == size;
}


static int cmd_tgen(int argc, char **argv) {
    const char *bind_ip = "127.0.0.1";
    int port = 0, size = 140, batch = 0, flows = 64;
    double rate = 0, duration = 0, max_s = 60;
    int opt;
    while ((opt = getopt(argc, argv, "B:p:f:s:r:d:b:T:")) != -1) {
        switch (opt) {
        case 'B': bind_ip = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'f': flows = atoi(optarg); break;
        case 's': size = atoi(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'b': batch = atoi(optarg); break;
        case 'T': max_s = atof(optarg); break;
        default: fail("usage: loadgen tgen [-B ip] [-p port] [-f flows] [-s size] -r pps -d s [-b batch] [-T max_s]");
        }
    }
    if (flows < 1 || flows > MAX_FLOWS) fail("tgen: -f 1..2^20");
    if (size < MIN_SIZE || size + HDR > MAX_DGRAM) fail("tgen: -s must be 24..4072");
    if (rate <= 0 || duration <= 0) fail("tgen: -r pps and -d seconds must be > 0");
    if (max_s <= 0) max_s = 60;
    if (batch <= 0) batch = (int)(rate * 50e-6); /* one batch per ~50 us, as gen */
    if (batch < 1) batch = 1;
    if (batch > 64) batch = 64;

    int bport, eff;
    int fd = bind_local(bind_ip, port, 64 << 20, &bport, &eff, "bind tgen");
    printf("READY %d rcvbuf=%d\n", bport, eff);
    fflush(stdout);

    /* learn: each flow's address and Data prefix, from one datagram of it */
    uint8_t(*prefix)[HDR] = calloc((size_t)flows, sizeof *prefix); /* [HDR - 1] = 1: has a header */
    struct sockaddr_storage *dst = calloc((size_t)flows, sizeof *dst);
    socklen_t *dst_len = calloc((size_t)flows, sizeof *dst_len);
    uint64_t *seq = calloc((size_t)flows, sizeof *seq);
    if (!prefix || !dst || !dst_len || !seq) die("calloc");
    enum { B = 64 };
    static uint8_t bufs[B][MAX_DGRAM];
    struct mmsghdr msgs[B];
    struct iovec iov[B];
    struct sockaddr_storage src[B];
    rx_init(msgs, iov, bufs, B, src);
    int learned = 0;
    uint64_t other = 0, t_limit = now_ns() + (uint64_t)(max_s * 1e9);
    while (learned < flows && !g_stop && now_ns() < t_limit) {
        for (int i = 0; i < B; i++) msgs[i].msg_hdr.msg_namelen = sizeof src[i];
        int n = recvmmsg(fd, msgs, B, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
            die("recvmmsg");
        }
        for (int i = 0; i < n; i++) {
            int len = (int)msgs[i].msg_len, hl = len - size;
            const uint8_t *b = bufs[i];
            uint32_t magic, flow;
            if (hl < 0 || (memcpy(&magic, b + hl, 4), magic != MAGIC) || (memcpy(&flow, b + hl + 4, 4), flow >= (uint32_t)flows) ||
                (hl != 0 && (hl != HDR || !header_ok(b, size)))) {
                other++;
                continue;
            }
            if (dst_len[flow]) continue;
            memcpy(&dst[flow], &src[i], msgs[i].msg_hdr.msg_namelen);
            dst_len[flow] = msgs[i].msg_hdr.msg_namelen;
            if (hl) {
                memcpy(prefix[flow], b, HDR - 2);
                prefix[flow][HDR - 1] = 1;
            }
            learned++;
        }
    }
    if (learned < flows) {
        fprintf(stderr, "loadgen: tgen: learned %d of %d flows (%" PRIu64 " other datagrams)\n", learned, flows, other);
        exit(2);
    }
    armed_wait(max_s, "tgen");

    /* send: paced, b frames per flow in turn */
    struct mmsghdr tx[64];
    struct iovec tx_iov[64];
    static uint8_t frames[64][MAX_DGRAM];
    memset(tx, 0, sizeof tx);
    for (int i = 0; i < batch; i++) {
        for (int k = HDR + MIN_SIZE; k < HDR + size; k++) frames[i][k] = (uint8_t)(0x80 | (k & 0x3f));
        tx[i].msg_hdr.msg_iov = &tx_iov[i];
        tx[i].msg_hdr.msg_iovlen = 1;
    }
    long long count = (long long)(rate * duration + 0.5), sent = 0, attempted = 0;
    uint64_t send_errors = 0, t_start = now_ns();
    double cpu0 = cpu_s(), ns_per_pkt = 1e9 / rate;
    t_limit = t_start + (uint64_t)(max_s * 1e9);
    uint32_t flow = 0;
    while (attempted < count && !g_stop) {
        int n = batch;
        if (count - attempted < n) n = (int)(count - attempted);
        sleep_until(t_start + (uint64_t)((double)attempted * ns_per_pkt));
        uint64_t ts = now_ns();
        if (ts > t_limit) break;
        int hl = prefix[flow][HDR - 1] ? HDR : 0;
        for (int i = 0; i < n; i++) {
            uint8_t *f = frames[i], *b = f + HDR; /* the payload stays at HDR: the header goes in front */
            uint32_t magic = MAGIC;
            uint64_t sq = seq[flow]++;
            memcpy(b, &magic, 4);
            memcpy(b + 4, &flow, 4);
            memcpy(b + 8, &sq, 8);
            memcpy(b + 16, &ts, 8);
            if (hl) {
                memcpy(f, prefix[flow], HDR - 2);
                f[HDR - 2] = (uint8_t)(size >> 8);
                f[HDR - 1] = (uint8_t)size;
            }
            tx_iov[i].iov_base = f + HDR - hl;
            tx_iov[i].iov_len = (size_t)(hl + size);
            tx[i].msg_hdr.msg_name = &dst[flow];
            tx[i].msg_hdr.msg_namelen = dst_len[flow];
        }
        int done = send_all(fd, tx, n);
        send_errors += (uint64_t)(n - done);
        sent += done;
        attempted += n;
        flow = (flow + 1) % (uint32_t)flows;
    }
    uint64_t t_end = now_ns();
    double el = (double)(t_end - t_start);
    printf("{\"mode\":\"tgen\",\"flows\":%d,\"learned\":%d,\"other\":%" PRIu64 ",\"size\":%d,\"batch\":%d,"
           "\"target_pps\":%.0f,\"planned\":%lld,\"sent\":%lld,\"send_errors\":%" PRIu64 ",\"start_ns\":%" PRIu64
           ",\"end_ns\":%" PRIu64 ",\"elapsed_ns\":%" PRIu64 ",\"pps\":%.1f,\"cpu_s\":%.3f}\n",
           flows, learned, other, size, batch, rate, count, sent, send_errors, t_start, t_end, t_end - t_start,
           el > 0 ? (double)sent * 1e9 / el : 0.0, cpu_s() - cpu0);
    fflush(stdout);
    return 0;
}

/* ------------------------------------------------------------------ sink */

static int cmd_sink(int argc, char **argv) {
    const char *bind_ip = "127.0.0.1";
    int port = 0, size = 140, check_hdr = 0, kstamp = 0, rcvbuf = 64 << 20;
    long long expected = 0;
    long idle_ms = 1000;
    double max_s = 60;
    int64_t late_ns = 10 * 1000000LL;
    size_t max_samples = 4u << 20;
    int opt;
    while ((opt = getopt(argc, argv, "B:p:s:e:i:T:D:L:r:HK")) != -1) {
        switch (opt) {
        case 'B': bind_ip = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 's': size = atoi(optarg); break;
        case 'e': expected = atoll(optarg); break;
        case 'i': idle_ms = atol(optarg); break;
        case 'T': max_s = atof(optarg); break;
        case 'D': late_ns = atoll(optarg); break;
        case 'L': max_samples = (size_t)atoll(optarg); break;
        case 'r': rcvbuf = atoi(optarg); break;
        case 'H': check_hdr = 1; break;
        case 'K': kstamp = 1; break;
        default: fail("usage: loadgen sink [-B ip] [-p port] [-s size] [-e expected] [-i idle_ms] [-T max_s] ...");
        }
    }
    if (size < MIN_SIZE || size > MAX_DGRAM) fail("sink: -s must be 24..4096");

    int bport, eff;
    int fd = bind_local(bind_ip, port, rcvbuf, &bport, &eff, "bind sink");
    int one = 1;
    if (kstamp && setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one) != 0) die("SO_TIMESTAMPNS");

    enum { B = 64 };
    static uint8_t bufs[B][MAX_DGRAM];
    struct mmsghdr msgs[B];
    struct iovec iov[B];
    static union {
        char buf[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } ctl[B];
    rx_init(msgs, iov, bufs, B, NULL);
    int64_t *lat = malloc(max_samples * sizeof *lat);
    uint64_t *fcount = calloc(MAX_FLOWS, sizeof *fcount);
    uint64_t *fmax = calloc(MAX_FLOWS, sizeof *fmax); /* highest seq seen + 1 */
    if (!lat || !fcount || !fmax) die("malloc");

    printf("READY %d rcvbuf=%d\n", bport, eff);
    fflush(stdout);

    uint64_t received = 0, other = 0, bytes = 0, late = 0, reordered = 0, hdr_ok = 0, hdr_bad = 0;
    uint64_t first_rx = 0, last_rx = 0, flows_seen = 0, k_first = 0, k_last = 0, k_missing = 0;
    long hdr_min = -1, hdr_max = -1;
    size_t nlat = 0;
    uint64_t t_start = now_ns(), t_limit = t_start + (uint64_t)(max_s * 1e9);
    const char *reason = "max_time";
    for (;;) {
        if (g_stop) { reason = "signal"; break; }
        if (expected > 0 && received >= (uint64_t)expected) { reason = "expected"; break; }
        uint64_t t = now_ns();
        if (t > t_limit) { reason = "max_time"; break; }
        if (received && idle_ms > 0 && t - last_rx > (uint64_t)idle_ms * 1000000ull) { reason = "idle"; break; }
        if (kstamp)
            for (int i = 0; i < B; i++) {
                msgs[i].msg_hdr.msg_control = ctl[i].buf;
                msgs[i].msg_hdr.msg_controllen = sizeof ctl[i].buf;
            }
        int n = recvmmsg(fd, msgs, B, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
            die("recvmmsg");
        }
        uint64_t rx = now_ns();
        for (int i = 0; i < n; i++) {
            int len = (int)msgs[i].msg_len;
            const uint8_t *b = bufs[i];
            uint32_t magic;
            if (len < size || (memcpy(&magic, b + len - size, 4), magic != MAGIC)) {
                other++;
                continue;
            }
            const uint8_t *p = b + len - size;
            uint32_t flow;
            uint64_t seq, ts;
            memcpy(&flow, p + 4, 4);
            memcpy(&seq, p + 8, 8);
            memcpy(&ts, p + 16, 8);
            if (flow >= MAX_FLOWS) {
                other++;
                continue;
            }
            if (!received) first_rx = rx;
            last_rx = rx;
            if (kstamp) {
                uint64_t kt = 0;
                for (struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[i].msg_hdr); c; c = CMSG_NXTHDR(&msgs[i].msg_hdr, c))
                    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
                        struct timespec kts;
                        memcpy(&kts, CMSG_DATA(c), sizeof kts);
                        kt = (uint64_t)kts.tv_sec * 1000000000ull + (uint64_t)kts.tv_nsec;
                    }
                if (!kt) k_missing++;
                else {
                    if (!k_first || kt < k_first) k_first = kt;
                    if (kt > k_last) k_last = kt;
                }
            }
            received++;
            bytes += (uint64_t)len;
            long hl = len - size;
            if (hdr_min < 0 || hl < hdr_min) hdr_min = hl;
            if (hl > hdr_max) hdr_max = hl;
            if (check_hdr) {
                if (hl == HDR && header_ok(b, size)) hdr_ok++;
                else hdr_bad++;
            }
            if (!fcount[flow]) flows_seen++;
            fcount[flow]++;
            if (seq + 1 > fmax[flow]) fmax[flow] = seq + 1;
            else reordered++;
            int64_t l = (int64_t)(rx - ts);
            if (l > late_ns) late++;
            if (nlat < max_samples) lat[nlat++] = l;
        }
    }
    uint64_t lost = 0;
    for (uint32_t f = 0; f < MAX_FLOWS; f++)
        if (fmax[f] > fcount[f]) lost += fmax[f] - fcount[f];
    qsort(lat, nlat, sizeof *lat, cmp_i64);
    uint64_t span = received > 1 ? last_rx - first_rx : 0;
    printf("{\"mode\":\"sink\",\"port\":%d,\"exit\":\"%s\",\"received\":%" PRIu64 ",\"other\":%" PRIu64
           ",\"bytes\":%" PRIu64 ",\"first_rx_ns\":%" PRIu64 ",\"last_rx_ns\":%" PRIu64 ",\"rx_span_ns\":%" PRIu64
           ",\"rx_pps\":%.1f,\"lat_samples\":%zu,\"lat_min_ns\":%" PRId64 ",\"lat_p50_ns\":%" PRId64
           ",\"lat_p90_ns\":%" PRId64 ",\"lat_p99_ns\":%" PRId64 ",\"lat_p999_ns\":%" PRId64
           ",\"lat_max_ns\":%" PRId64 ",\"late\":%" PRIu64 ",\"late_ns\":%" PRId64 ",\"lost_seq\":%" PRIu64
           ",\"reordered\":%" PRIu64 ",\"flows_seen\":%" PRIu64 ",\"hdr_len_min\":%ld,\"hdr_len_max\":%ld",
           bport, reason, received, other, bytes, first_rx, last_rx, span,
           span ? (double)(received - 1) * 1e9 / (double)span : 0.0, nlat, nlat ? lat[0] : -1,
           pct(lat, nlat, 0.50), pct(lat, nlat, 0.90), pct(lat, nlat, 0.99), pct(lat, nlat, 0.999),
           nlat ? lat[nlat - 1] : -1, late, late_ns, lost, reordered, flows_seen, hdr_min, hdr_max);
    if (check_hdr) printf(",\"hdr_ok\":%" PRIu64 ",\"hdr_bad\":%" PRIu64, hdr_ok, hdr_bad);
    if (kstamp) {
        uint64_t ks = k_last > k_first ? k_last - k_first : 0;
        printf(",\"k_first_ns\":%" PRIu64 ",\"k_last_ns\":%" PRIu64 ",\"k_span_ns\":%" PRIu64
               ",\"k_pps\":%.1f,\"k_missing\":%" PRIu64,
               k_first, k_last, ks, ks && received > 1 ? (double)(received - 1) * 1e9 / (double)ks : 0.0, k_missing);
    }
    printf(",\"rcvbuf\":%d,\"cpu_s\":%.3f}\n", eff, cpu_s());
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) fail("usage: loadgen gen|churn|tgen|sink [options] (see the comment at the top of loadgen.c)");
    install_signals();
    if (!strcmp(argv[1], "gen")) return cmd_gen(argc - 1, argv + 1);
    if (!strcmp(argv[1], "churn")) return cmd_churn(argc - 1, argv + 1);
    if (!strcmp(argv[1], "sink")) return cmd_sink(argc - 1, argv + 1);
    if (!strcmp(argv[1], "tgen")) return cmd_tgen(argc - 1, argv + 1);
    fail("first argument must be gen, churn, tgen or sink");
    return 2;
}
