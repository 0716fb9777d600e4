/*
 * fwd_ref: the C reference forwarder for the relay benchmark (bench/relay.py).
 *
 * What it does per datagram is what the relay does on its hit path, in C:
 *   recvmmsg (batch 64) from the public UDP socket
 *   -> look the source address up in an open-addressing table (the relay's dict hit; a miss
 *      inserts, so every flow is a hit after its first packet)
 *   -> prepend the relay's 24-byte tunnel header
 *   -> sendmmsg to the target over a connected UDP socket.
 *
 * The header is a version byte then a MessagePack array [1, handle, ip, port, payload]:
 *   0x01 | 0x95 | 0x01 | 0xcf u64be(handle) | 0xc4 0x04 ip[4] | 0xcd u16be(port) | 0xc5 u16be(len)
 * followed by the payload (24 + len bytes on the wire). The handle is fixed per source
 * address (a 64-bit mix of ip:port).
 *
 * With -R, the return direction too, as the relay's worker does it for a transceiver's Data
 * frames (a thread per worker, blocked on the destination socket; the forward loop is the same
 * code with or without it):
 *   recvmmsg (batch) from the connected destination socket (frames from the target)
 *   -> the frame's handle looked up in a second table (handle -> source address, filled when
 *      the forward direction learns a flow); the header must be a Data header naming that
 *      source address, with the payload's length (as the relay checks a frame's prefix)
 *   -> strip the 24 bytes, sendmmsg the payload to the source address from the public socket.
 *
 * Usage: fwd_ref -l 127.0.0.1:PORT -t 127.0.0.1:PORT [-n workers] [-r rcvbuf] [-b batch] [-F flows] [-R]
 *   -n N  N SO_REUSEPORT worker processes (default 1: the process itself is the worker)
 *   -F F  flows a worker must hold: its table gets the power of two >= 2F slots (at least
 *         2^16, at most 2^22; at most 3/4 of them are filled), as a dict grows with its flows
 *   -r B  receive buffer of the public socket(s), bytes (SO_RCVBUFFORCE when allowed,
 *         else SO_RCVBUF, capped by net.core.rmem_max); default 256 MiB (with -R the
 *         destination socket's too)
 *   -R    forward the target's Data frames back to the flows' sources (above)
 * Prints one line when every worker's socket is bound:
 *   READY pids=<pid>[,<pid>...] rcvbuf=<effective bytes>
 * and, on SIGTERM/SIGINT, one summary line per worker on stderr. Nothing per packet.
 * IPv4 only (the header carries a 4-byte client address).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HDR 24
#define MAX_PAYLOAD 2048
#define MAX_BATCH 256
#define MAX_WORKERS 64
#define MIN_TABLE_BITS 16
#define MAX_TABLE_BITS 22

static volatile sig_atomic_t g_stop = 0;
static pid_t g_children[MAX_WORKERS];
static int g_nchildren = 0;

static void on_term(int sig) {
    (void)sig;
    g_stop = 1;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static int parse_addr(const char *s, struct sockaddr_in *out) {
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host) return -1;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    if (inet_pton(AF_INET, host, &out->sin_addr) != 1) return -1;
    long port = strtol(colon + 1, NULL, 10);
    if (port < 0 || port > 65535) return -1;
    out->sin_port = htons((uint16_t)port);
    return 0;
}

static int set_rcvbuf(int fd, int bytes) {
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) != 0) {
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes) != 0) die("SO_RCVBUF");
    }
    int eff = 0;
    socklen_t len = sizeof eff;
    getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &eff, &len);
    return eff;
}

/* ---- the tiny flow table: open addressing, linear probing, u64 keys ---- */
struct slot {
    uint64_t key; /* 0 = empty; else (1<<63) | ip<<16 | port */
    uint64_t handle;
};
static struct slot *g_table;
static uint32_t g_table_used;
static int g_table_bits = MIN_TABLE_BITS;

/* -R: handle -> source address, the same size; written by the forward loop only (a slot's key
 * before its handle, which is published last: the return thread reads a slot only once it sees
 * the handle), read by the return thread; never deleted. */
struct rslot {
    uint64_t handle; /* 0 = empty */
    uint64_t key;
};
static struct rslot *g_rtable;
static int g_returns = 0;

static inline uint32_t rslot_of(uint64_t handle) {
    return (uint32_t)((handle * 0x9e3779b97f4a7c15ULL) >> (64 - g_table_bits));
}

static inline void rtable_insert(uint64_t handle, uint64_t key) {
    uint32_t mask = (1u << g_table_bits) - 1;
    if (!handle) return; /* (never: splitmix64 of a nonzero key) */
    for (uint32_t probe = 0, i = rslot_of(handle); probe <= mask; probe++, i = (i + 1) & mask) {
        struct rslot *r = &g_rtable[i];
        if (__atomic_load_n(&r->handle, __ATOMIC_RELAXED) == 0) {
            r->key = key;
            __atomic_store_n(&r->handle, handle, __ATOMIC_RELEASE);
            return;
        }
    }
}

static inline uint64_t rtable_lookup(uint64_t handle) { /* the key, 0 = none */
    uint32_t mask = (1u << g_table_bits) - 1;
    for (uint32_t probe = 0, i = rslot_of(handle); probe <= mask; probe++, i = (i + 1) & mask) {
        uint64_t h = __atomic_load_n(&g_rtable[i].handle, __ATOMIC_ACQUIRE);
        if (h == handle) return g_rtable[i].key;
        if (h == 0) return 0;
    }
    return 0;
}

static inline uint64_t mix64(uint64_t x) { /* splitmix64 finaliser */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static inline uint64_t lookup(uint32_t ip_be, uint16_t port_be, uint64_t *misses) {
    uint64_t key = (1ULL << 63) | ((uint64_t)ip_be << 16) | port_be;
    uint32_t mask = (1u << g_table_bits) - 1;
    uint32_t i = (uint32_t)((key * 0x9e3779b97f4a7c15ULL) >> (64 - g_table_bits));
    for (uint32_t probe = 0; probe <= mask; probe++, i = (i + 1) & mask) {
        struct slot *s = &g_table[i];
        if (s->key == key) return s->handle;
        if (s->key == 0) {
            uint64_t h = mix64(key);
            (*misses)++;
            if (g_table_used < (3u << g_table_bits) / 4) { /* full table: forward, don't insert */
                s->key = key;
                s->handle = h;
                g_table_used++;
                if (g_rtable) rtable_insert(h, key);
            }
            return h;
        }
    }
    (*misses)++;
    return mix64(key);
}

static inline void put_be16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void put_be64(uint8_t *p, uint64_t v) {
    for (int k = 7; k >= 0; k--) {
        p[k] = (uint8_t)v;
        v >>= 8;
    }
}

static inline uint64_t get_be64(const uint8_t *p) {
    uint64_t v = 0;
    for (int k = 0; k < 8; k++) v = (v << 8) | p[k];
    return v;
}

/* A batch of datagram buffers (HDR + MAX_PAYLOAD bytes each) with their receive and send
 * headers: a datagram is received `at` bytes into its buffer, from addr[i] when `named`. */
struct batch {
    uint8_t *bufs;
    struct mmsghdr *rx, *tx;
    struct iovec *rx_iov, *tx_iov;
    struct sockaddr_in *addr;
};

static void batch_init(struct batch *b, int n, size_t at, int named) {
    b->bufs = aligned_alloc(64, (size_t)n * (HDR + MAX_PAYLOAD));
    b->rx = calloc((size_t)n, sizeof *b->rx);
    b->tx = calloc((size_t)n, sizeof *b->tx);
    b->rx_iov = calloc((size_t)n, sizeof *b->rx_iov);
    b->tx_iov = calloc((size_t)n, sizeof *b->tx_iov);
    b->addr = calloc((size_t)n, sizeof *b->addr);
    if (!b->bufs || !b->rx || !b->tx || !b->rx_iov || !b->tx_iov || !b->addr) die("calloc");
    for (int i = 0; i < n; i++) {
        uint8_t *buf = b->bufs + (size_t)i * (HDR + MAX_PAYLOAD);
        b->rx_iov[i].iov_base = buf + at;
        b->rx_iov[i].iov_len = HDR + MAX_PAYLOAD - at;
        b->rx[i].msg_hdr.msg_iov = &b->rx_iov[i];
        b->rx[i].msg_hdr.msg_iovlen = 1;
        if (named) b->rx[i].msg_hdr.msg_name = &b->addr[i];
        b->tx_iov[i].iov_base = buf;
        b->tx[i].msg_hdr.msg_iov = &b->tx_iov[i];
        b->tx[i].msg_hdr.msg_iovlen = 1;
    }
}

/* -R: the target's Data frames back to the flows' sources, from the public socket */
struct returns {
    int in_fd, out_fd, batch;
    uint64_t rx, tx, dropped, send_errors;
};

static void *return_loop(void *arg) {
    struct returns *ret = arg;
    int batch = ret->batch;
    struct batch b;
    batch_init(&b, batch, 0, 0); /* a whole frame in each buffer */
    struct mmsghdr *rx = b.rx, *tx = b.tx;
    struct iovec *rx_iov = b.rx_iov, *tx_iov = b.tx_iov;
    struct sockaddr_in *dst = b.addr;
    while (!g_stop) {
        int n = recvmmsg(ret->out_fd, rx, (unsigned)batch, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNREFUSED) continue;
            die("recvmmsg(returns)");
        }
        ret->rx += (uint64_t)n;
        int m = 0;
        for (int i = 0; i < n; i++) {
            const uint8_t *h = rx_iov[i].iov_base;
            unsigned len = rx[i].msg_len;
            uint64_t key;
            /* a Data header (version 1, fixarray(5), kind 1, uint64 handle) of a known flow,
             * naming that flow's address, with the payload's length */
            if ((rx[i].msg_hdr.msg_flags & MSG_TRUNC) || len < HDR || h[0] != 0x01 || h[1] != 0x95 ||
                h[2] != 0x01 || h[3] != 0xcf || !(key = rtable_lookup(get_be64(h + 4))) || h[12] != 0xc4 ||
                h[13] != 0x04 || memcmp(h + 14, &(uint32_t){(uint32_t)(key >> 16)}, 4) != 0 || h[18] != 0xcd ||
                memcmp(h + 19, &(uint16_t){(uint16_t)key}, 2) != 0 || h[21] != 0xc5 ||
                (((unsigned)h[22] << 8) | h[23]) != len - HDR) {
                ret->dropped++;
                continue;
            }
            dst[m].sin_family = AF_INET;
            dst[m].sin_addr.s_addr = (uint32_t)(key >> 16);
            dst[m].sin_port = (uint16_t)key;
            tx_iov[m].iov_base = (uint8_t *)h + HDR;
            tx_iov[m].iov_len = len - HDR;
            tx[m].msg_hdr.msg_name = &dst[m];
            tx[m].msg_hdr.msg_namelen = sizeof dst[m];
            m++;
        }
        int done = 0, retries = 0;
        while (done < m) {
            int r = sendmmsg(ret->in_fd, tx + done, (unsigned)(m - done), 0);
            if (r < 0) {
                if ((errno == EINTR || errno == EAGAIN || errno == ENOBUFS) && ++retries < 8) continue;
                ret->send_errors++; /* that one: on to the next */
                done++;
                continue;
            }
            done += r;
            ret->tx += (uint64_t)r;
        }
    }
    return NULL;
}

static int worker(int in_fd, const struct sockaddr_in *target, int batch, int rcvbuf) {
    int out_fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (out_fd < 0) die("socket(out)");
    if (connect(out_fd, (const struct sockaddr *)target, sizeof *target) != 0) die("connect(target)");
    /* wake up now and then to notice SIGTERM even if it lands between two checks */
    struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
    setsockopt(in_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

    g_table = calloc((size_t)1 << g_table_bits, sizeof(struct slot));
    struct returns ret = {.in_fd = in_fd, .out_fd = out_fd, .batch = batch};
    pthread_t return_thread;
    if (g_returns) {
        g_rtable = calloc((size_t)1 << g_table_bits, sizeof(struct rslot));
        if (!g_rtable) die("calloc");
        set_rcvbuf(out_fd, rcvbuf);
        setsockopt(out_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        int err = pthread_create(&return_thread, NULL, return_loop, &ret);
        if (err) {
            errno = err;
            die("pthread_create");
        }
    }
    if (!g_table) die("calloc");
    struct batch b;
    batch_init(&b, batch, HDR, 1); /* payload lands after room for the header */
    struct mmsghdr *rx = b.rx, *tx = b.tx;
    struct iovec *rx_iov = b.rx_iov, *tx_iov = b.tx_iov;
    struct sockaddr_in *src = b.addr;

    uint64_t n_rx = 0, n_tx = 0, n_drop = 0, n_miss = 0, n_send_err = 0;
    while (!g_stop) {
        for (int i = 0; i < batch; i++) rx[i].msg_hdr.msg_namelen = sizeof src[i];
        int n = recvmmsg(in_fd, rx, (unsigned)batch, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
            die("recvmmsg");
        }
        n_rx += (uint64_t)n;
        int m = 0;
        for (int i = 0; i < n; i++) {
            unsigned len = rx[i].msg_len;
            if ((rx[i].msg_hdr.msg_flags & MSG_TRUNC) || src[i].sin_family != AF_INET) {
                n_drop++;
                continue;
            }
            uint32_t ip_be = src[i].sin_addr.s_addr;
            uint16_t port_be = src[i].sin_port;
            uint64_t handle = lookup(ip_be, port_be, &n_miss);
            uint8_t *h = (uint8_t *)rx_iov[i].iov_base - HDR;
            h[0] = 0x01; /* tunnel frame version */
            h[1] = 0x95; /* fixarray(5) */
            h[2] = 0x01; /* kind: data */
            h[3] = 0xcf; /* uint64 handle */
            put_be64(h + 4, handle);
            h[12] = 0xc4; /* bin8, 4 bytes: client IPv4 */
            h[13] = 0x04;
            memcpy(h + 14, &ip_be, 4);
            h[18] = 0xcd; /* uint16: client port */
            memcpy(h + 19, &port_be, 2);
            h[21] = 0xc5; /* bin16: payload */
            put_be16(h + 22, (uint16_t)len);
            tx_iov[m].iov_base = h;
            tx_iov[m].iov_len = HDR + len;
            m++;
        }
        int done = 0, retries = 0;
        while (done < m) {
            int r = sendmmsg(out_fd, tx + done, (unsigned)(m - done), 0);
            if (r < 0) {
                /* ECONNREFUSED: an ICMP from an earlier send to a closed port; the next send works */
                if ((errno == EINTR || errno == ECONNREFUSED || errno == EAGAIN) && ++retries < 8) continue;
                n_send_err += (uint64_t)(m - done);
                break;
            }
            done += r;
        }
        n_tx += (uint64_t)done;
    }
    if (g_returns) pthread_join(return_thread, NULL);
    fprintf(stderr,
            "fwd_ref worker %d: rx=%llu tx=%llu dropped=%llu table_misses=%llu send_errors=%llu flows=%u slots=%u"
            " returns: rx=%llu tx=%llu dropped=%llu send_errors=%llu\n",
            (int)getpid(), (unsigned long long)n_rx, (unsigned long long)n_tx, (unsigned long long)n_drop,
            (unsigned long long)n_miss, (unsigned long long)n_send_err, g_table_used, 1u << g_table_bits,
            (unsigned long long)ret.rx, (unsigned long long)ret.tx, (unsigned long long)ret.dropped,
            (unsigned long long)ret.send_errors);
    return 0;
}

static void usage(void) {
    fprintf(stderr, "usage: fwd_ref -l IP:PORT -t IP:PORT [-n workers] [-r rcvbuf_bytes] [-b batch] [-F flows] [-R]\n");
    exit(2);
}

int main(int argc, char **argv) {
    struct sockaddr_in listen_addr, target;
    int have_l = 0, have_t = 0, workers = 1, batch = 64;
    long rcvbuf = 256L << 20, flows = 0;
    int opt;
    while ((opt = getopt(argc, argv, "l:t:n:r:b:F:R")) != -1) {
        switch (opt) {
        case 'l': if (parse_addr(optarg, &listen_addr)) usage(); have_l = 1; break;
        case 't': if (parse_addr(optarg, &target)) usage(); have_t = 1; break;
        case 'n': workers = atoi(optarg); break;
        case 'r': rcvbuf = atol(optarg); break;
        case 'b': batch = atoi(optarg); break;
        case 'F': flows = atol(optarg); break;
        case 'R': g_returns = 1; break;
        default: usage();
        }
    }
    if (!have_l || !have_t || workers < 1 || workers > MAX_WORKERS || batch < 1 || batch > MAX_BATCH ||
        rcvbuf < 4096 || rcvbuf > (1L << 30) || flows < 0 || flows > (1L << (MAX_TABLE_BITS - 1)))
        usage();
    while (g_table_bits < MAX_TABLE_BITS && (1L << g_table_bits) < 2 * flows) g_table_bits++;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term; /* no SA_RESTART: a blocked recvmmsg returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    /* every socket is bound before READY, so the harness can send right after it */
    int fds[MAX_WORKERS];
    int eff = 0;
    for (int w = 0; w < workers; w++) {
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        if (fd < 0) die("socket");
        int one = 1;
        if (workers > 1 && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) die("SO_REUSEPORT");
        eff = set_rcvbuf(fd, (int)rcvbuf);
        if (bind(fd, (struct sockaddr *)&listen_addr, sizeof listen_addr) != 0) die("bind");
        fds[w] = fd;
    }

    if (workers == 1) {
        printf("READY pids=%d rcvbuf=%d\n", (int)getpid(), eff);
        fflush(stdout);
        return worker(fds[0], &target, batch, (int)rcvbuf);
    }

    pid_t parent = getpid();
    for (int w = 0; w < workers; w++) {
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            if (getppid() != parent) _exit(0);
            for (int k = 0; k < workers; k++)
                if (k != w) close(fds[k]);
            _exit(worker(fds[w], &target, batch, (int)rcvbuf));
        }
        g_children[g_nchildren++] = pid;
    }
    for (int w = 0; w < workers; w++) close(fds[w]);
    printf("READY pids=");
    for (int k = 0; k < g_nchildren; k++) printf(k ? ",%d" : "%d", (int)g_children[k]);
    printf(" rcvbuf=%d\n", eff);
    fflush(stdout);

    /* supervisor: wait for SIGTERM (or a dead worker), then stop every worker, bounded */
    int alive = g_nchildren;
    while (!g_stop && alive == g_nchildren) {
        int status;
        pid_t r = waitpid(-1, &status, WNOHANG);
        if (r > 0) alive--;
        else if (r < 0 && errno == ECHILD) alive = 0;
        else usleep(50000); /* polling: no race between the flag check and a blocking wait */
    }
    for (int k = 0; k < g_nchildren; k++) {
        kill(g_children[k], SIGCONT); /* a stopped worker must run to see SIGTERM */
        kill(g_children[k], SIGTERM);
    }
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        int status;
        pid_t r = waitpid(-1, &status, WNOHANG);
        if (r < 0 && errno == ECHILD) break;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - t0.tv_sec >= 3) {
            for (int k = 0; k < g_nchildren; k++) kill(g_children[k], SIGKILL);
            while (waitpid(-1, &status, 0) > 0) {}
            break;
        }
        if (r == 0) usleep(10000);
    }
    return 0;
}
