/*
 * junkgen: hostile input for the relay (tests/test_faults_hostile.py, run by tests/junkgen.py).
 *
 * Sends datagrams from many bound UDP sockets (several loopback source addresses x many ports)
 * at a bounded rate with sendmmsg, then waits a little and counts every datagram that arrived
 * on those sockets: the relay must send nothing to an address that has no flow (no reflection).
 *
 * Kinds of junk (weights below; the relay's expected drop reasons in brackets):
 *
 * public port
 *   random       random bytes, random first byte, 1..1500 bytes [not_webrtc, unknown_flow, stun_*]
 *   empty        a zero-length datagram [empty]
 *   stun_mut     a signed Binding Request (seed) truncated, bit-flipped, extended, or with an
 *                attribute length past the end [stun_*, token_*]. Never a mutation that
 *                leaves a valid request: no zero flips, the FINGERPRINT attribute's *type* is
 *                never touched (an unknown attribute after MESSAGE-INTEGRITY is ignored, so a
 *                request whose FINGERPRINT was renamed or cut off is still valid), and no
 *                truncation with a fixed-up length right at the FINGERPRINT boundary
 *   stun_big     framed Binding Requests with oversized attributes: a 64..1400-byte USERNAME,
 *                or a real token's USERNAME after a large optional attribute and a wrong
 *                MESSAGE-INTEGRITY [token_bad_length, stun_bad_integrity]
 *   dtls, rtp    RFC 7983 DTLS (20..63) / RTP (128..191) first bytes, random body [unknown_flow]
 *   oversized    2049..4096 bytes, larger than the worker's receive slot [oversized]
 * tunnel ports
 *   tun_random   random bytes, 0..1500 [frame_*]
 *   tun_version  version byte 1 + random msgpack-ish bytes [frame_malformed]
 *   tun_mut      a Data frame (seed) with its handle randomised or bytes flipped
 *                [tunnel_unknown_flow, frame_malformed]
 *   tun_trunc    a Data frame cut short [frame_malformed, tunnel_unknown_flow]
 *   tun_badver   a Data frame with another version byte [frame_bad_version]
 *
 * Valid SessionClosed and Drain frames are taken by the relay without any counter, so the
 * generator leaves them out ("avoided" in its output) to keep the drop accounting exact.
 *
 * Arguments (key=value): public=IP:PORT stun_seeds=FILE frame_seeds=FILE [tunnels=IP:PORT,...]
 * [sources=IP,...] [per_source=N] [count=N] [pps=R] [seed=N] [settle_ms=N] [tunnel_share=PER_MILLE].
 * Seed files: per record a flags byte (bit 0: ends in FINGERPRINT), u16 big-endian length, bytes.
 * Output: one JSON object on stdout (sent, send errors, per kind, per destination, received).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { K_RANDOM, K_EMPTY, K_STUN_MUT, K_STUN_BIG, K_DTLS, K_RTP, K_OVERSIZED,
       K_TUN_RANDOM, K_TUN_VERSION, K_TUN_MUT, K_TUN_TRUNC, K_TUN_BADVER, K_N };
static const char *KIND_NAMES[K_N] = {"random", "empty", "stun_mut", "stun_big", "dtls", "rtp", "oversized",
    "tun_random", "tun_version", "tun_mut", "tun_trunc", "tun_badver"};
/* weights, per mille of the public (first 7) and tunnel (last 5) shares */
static const int WEIGHTS[K_N] = {220, 20, 380, 80, 110, 150, 40, 250, 200, 300, 150, 100};

#define MAXSEEDS 128
#define MAXLEN 4096
#define BATCH 32
#define MAXSOCKS 2048
#define MAXTUN 64

struct seed { unsigned char d[MAXLEN]; int n; int has_fp; };
static struct seed stun_seeds[MAXSEEDS], frame_seeds[MAXSEEDS];
static int nstun, nframe;
static uint64_t rng_state;

static uint64_t rnd(void) {  /* xorshift64* */
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}
static int rint_(int lo, int hi) { return lo + (int)(rnd() % (uint64_t)(hi - lo + 1)); }  /* inclusive */
static void rfill(unsigned char *p, int n) { for (int i = 0; i < n; i++) p[i] = (unsigned char)rnd(); }
static double now_s(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec / 1e9; }

static int load_seeds(const char *path, struct seed *out) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    int n = 0;
    unsigned char h[3];
    while (n < MAXSEEDS && fread(h, 1, 3, f) == 3) {
        int len = (h[1] << 8) | h[2];
        if (len > MAXLEN || fread(out[n].d, 1, len, f) != (size_t)len) { fprintf(stderr, "bad seed file\n"); exit(2); }
        out[n].n = len; out[n].has_fp = h[0] & 1; n++;
    }
    fclose(f);
    return n;
}

static int parse_addr(const char *text, struct sockaddr_in *sa) {
    char host[64]; const char *colon = strrchr(text, ':');
    if (!colon || colon - text >= 63) return -1;
    memcpy(host, text, colon - text); host[colon - text] = 0;
    memset(sa, 0, sizeof *sa); sa->sin_family = AF_INET; sa->sin_port = htons((uint16_t)atoi(colon + 1));
    return inet_pton(AF_INET, host, &sa->sin_addr) == 1 ? 0 : -1;
}

static int flip_ok(int pos, const struct seed *s) {  /* never touch FINGERPRINT's type */
    return !(s->has_fp && (pos == s->n - 8 || pos == s->n - 7));
}

static int make_stun_mut(unsigned char *b) {
    const struct seed *s = &stun_seeds[rnd() % nstun];
    int n = s->n, m = rint_(0, 5);
    memcpy(b, s->d, n);
    if (m == 0) {  /* plain truncation, length field kept */
        return rint_(1, n - 1);
    } else if (m == 1) {  /* truncation at a 4-byte boundary with the length fixed up */
        int k;
        do { k = 20 + 4 * rint_(0, (n - 20) / 4 - 1); } while (s->has_fp && k == n - 8);
        b[2] = (unsigned char)((k - 20) >> 8); b[3] = (unsigned char)(k - 20);
        return k;
    } else if (m == 2) {  /* 1..4 flips at distinct positions, never a zero xor */
        int pos[4], np = rint_(1, 4);
        for (int i = 0; i < np; i++) {
            int p, dup;
            do { p = rint_(0, n - 1); dup = 0; for (int j = 0; j < i; j++) dup |= pos[j] == p; } while (dup || !flip_ok(p, s));
            pos[i] = p;
            b[p] ^= (unsigned char)rint_(1, 255);
        }
        return n;
    } else if (m == 3) {  /* junk attribute appended after FINGERPRINT, length fixed up */
        int extra = 4 * rint_(1, 16);
        b[n] = 0x80; b[n + 1] = 0x55; b[n + 2] = 0; b[n + 3] = (unsigned char)(extra - 4);
        rfill(b + n + 4, extra - 4);
        int len = n - 20 + extra;
        b[2] = (unsigned char)(len >> 8); b[3] = (unsigned char)len;
        return n + extra;
    } else if (m == 4) {  /* the first attribute's length runs past the end */
        int len = rint_(n - 20, 0xFFFF);
        b[22] = (unsigned char)(len >> 8); b[23] = (unsigned char)len;
        return n;
    } else {  /* message type changed: response, indication, other methods, bad top bits */
        int t;
        do { t = rint_(0, 0xFFFF); } while (t == 0x0001);
        b[0] = (unsigned char)(t >> 8); b[1] = (unsigned char)t;
        return n;
    }
}

static void put_attr_head(unsigned char *p, int type, int len) { p[0] = type >> 8; p[1] = type; p[2] = len >> 8; p[3] = len; }

static int make_stun_big(unsigned char *b) {
    static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    int off = 20;
    b[0] = 0; b[1] = 1; b[4] = 0x21; b[5] = 0x12; b[6] = 0xA4; b[7] = 0x42; rfill(b + 8, 12);
    if (rnd() & 1) {  /* a huge USERNAME */
        int ulen = rint_(64, 1400);
        put_attr_head(b + off, 0x0006, ulen);
        for (int i = 0; i < ulen; i++) b[off + 4 + i] = B64[rnd() % 64];
        b[off + 4 + ulen / 2] = ':';
        off += 4 + ((ulen + 3) & ~3);
        memset(b + off - ((4 - ulen % 4) % 4), 0, (4 - ulen % 4) % 4);
    } else {  /* a big optional attribute, then a real token's USERNAME */
        const struct seed *s = &stun_seeds[rnd() % nstun];
        int plen = rint_(100, 1300);
        put_attr_head(b + off, 0x8055, plen); rfill(b + off + 4, plen);
        off += 4 + ((plen + 3) & ~3);
        int ulen = (s->d[22] << 8) | s->d[23];
        if (ulen > 600) ulen = 600;
        memcpy(b + off, s->d + 20, 4 + ((ulen + 3) & ~3));
        off += 4 + ((ulen + 3) & ~3);
    }
    put_attr_head(b + off, 0x0008, 20); rfill(b + off + 4, 20); off += 24;  /* a wrong MESSAGE-INTEGRITY */
    b[2] = (unsigned char)((off - 20) >> 8); b[3] = (unsigned char)(off - 20);
    return off;
}

/* A SessionClosed (tag 3) or Drain (tag 4) frame: valid ones are taken without a counter, so
   the junk leaves them out (counted in "avoided") to keep the drop accounting exact. */
static int is_uncounted_control(const unsigned char *b, int n) {
    int pos;
    if (n < 3 || b[0] != 1) return 0;
    if (b[1] >= 0x90 && b[1] <= 0x9f) pos = 2;
    else if (b[1] == 0xdc) pos = 4;
    else if (b[1] == 0xdd) pos = 6;
    else return 0;
    if (pos >= n) return 0;
    unsigned char c = b[pos];
    uint64_t v; int w;
    if (c <= 0x7f) return c == 3 || c == 4;
    if (c == 0xcc || c == 0xd0) w = 1; else if (c == 0xcd || c == 0xd1) w = 2;
    else if (c == 0xce || c == 0xd2) w = 4; else if (c == 0xcf || c == 0xd3) w = 8; else return 0;
    if (pos + w >= n) return 0;
    v = 0;
    for (int i = 1; i <= w; i++) v = (v << 8) | b[pos + i];
    return v == 3 || v == 4;
}

static int make_tun(int kind, unsigned char *b) {
    const struct seed *s = &frame_seeds[rnd() % nframe];
    int n = s->n;
    switch (kind) {
    case K_TUN_RANDOM: { int len = rint_(0, 1500); rfill(b, len); return len; }
    case K_TUN_VERSION: { int len = rint_(1, 200); rfill(b, len); b[0] = 1; return len; }
    case K_TUN_MUT:
        memcpy(b, s->d, n);
        if ((rnd() & 1) && n >= 12 && s->d[3] == 0xCF) rfill(b + 4, 8);  /* another handle */
        else for (int i = rint_(1, 3); i > 0; i--) b[rint_(1, n - 1)] ^= (unsigned char)rint_(1, 255);
        return n;
    case K_TUN_TRUNC: memcpy(b, s->d, n); return rint_(1, n - 1);
    default: memcpy(b, s->d, n); do { b[0] = (unsigned char)rnd(); } while (b[0] == 1); return n;
    }
}

static int make_public(int kind, unsigned char *b) {
    switch (kind) {
    case K_RANDOM: { int len = rint_(1, 1500); rfill(b, len); return len; }
    case K_EMPTY: return 0;
    case K_STUN_MUT: return make_stun_mut(b);
    case K_STUN_BIG: return make_stun_big(b);
    case K_DTLS: { int len = rint_(13, 1200); rfill(b, len); b[0] = (unsigned char)rint_(20, 63); return len; }
    case K_RTP: { int len = rint_(12, 1200); rfill(b, len); b[0] = (unsigned char)rint_(128, 191); return len; }
    default: { int len = rint_(2049, 4096); rfill(b, len); return len; }
    }
}

int main(int argc, char **argv) {
    const char *public_s = NULL, *tunnels_s = "", *sources_s = "127.0.0.1", *stun_path = NULL, *frame_path = NULL;
    long count = 1000; double pps = 10000; int per_source = 64, settle_ms = 1000, tunnel_share = 300;
    rng_state = 88172645463325252ULL;
    for (int i = 1; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) { fprintf(stderr, "bad arg %s\n", argv[i]); return 2; }
        *eq = 0; const char *k = argv[i], *v = eq + 1;
        if (!strcmp(k, "public")) public_s = v;
        else if (!strcmp(k, "tunnels")) tunnels_s = v;
        else if (!strcmp(k, "sources")) sources_s = v;
        else if (!strcmp(k, "per_source")) per_source = atoi(v);
        else if (!strcmp(k, "count")) count = atol(v);
        else if (!strcmp(k, "pps")) pps = atof(v);
        else if (!strcmp(k, "seed")) rng_state ^= strtoull(v, NULL, 10) * 0x9E3779B97F4A7C15ULL;
        else if (!strcmp(k, "stun_seeds")) stun_path = v;
        else if (!strcmp(k, "frame_seeds")) frame_path = v;
        else if (!strcmp(k, "settle_ms")) settle_ms = atoi(v);
        else if (!strcmp(k, "tunnel_share")) tunnel_share = atoi(v);
        else { fprintf(stderr, "unknown arg %s\n", k); return 2; }
    }
    if (!public_s || !stun_path || !frame_path) { fprintf(stderr, "public=, stun_seeds=, frame_seeds= needed\n"); return 2; }
    if (!rng_state) rng_state = 1;
    nstun = load_seeds(stun_path, stun_seeds); nframe = load_seeds(frame_path, frame_seeds);
    if (!nstun || !nframe) { fprintf(stderr, "no seeds\n"); return 2; }

    struct sockaddr_in pub, tun[MAXTUN]; int ntun = 0;
    if (parse_addr(public_s, &pub)) { fprintf(stderr, "bad public\n"); return 2; }
    char buf[4096]; snprintf(buf, sizeof buf, "%s", tunnels_s);
    for (char *t = strtok(buf, ","); t && ntun < MAXTUN; t = strtok(NULL, ","))
        if (parse_addr(t, &tun[ntun++])) { fprintf(stderr, "bad tunnel %s\n", t); return 2; }
    if (!ntun) tunnel_share = 0;

    static int socks[MAXSOCKS]; static struct sockaddr_in names[MAXSOCKS]; int nsock = 0;
    char srcbuf[4096]; snprintf(srcbuf, sizeof srcbuf, "%s", sources_s);
    for (char *t = strtok(srcbuf, ","); t; t = strtok(NULL, ",")) {
        for (int i = 0; i < per_source && nsock < MAXSOCKS; i++) {
            int fd = socket(AF_INET, SOCK_DGRAM, 0);
            if (fd < 0) { perror("socket"); return 2; }
            int rcv = 1 << 20; setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
            struct sockaddr_in sa = {0}; sa.sin_family = AF_INET;
            if (inet_pton(AF_INET, t, &sa.sin_addr) != 1) { fprintf(stderr, "bad source %s\n", t); return 2; }
            if (bind(fd, (struct sockaddr *)&sa, sizeof sa)) { perror("bind"); return 2; }
            socklen_t sl = sizeof names[nsock]; getsockname(fd, (struct sockaddr *)&names[nsock], &sl);
            socks[nsock++] = fd;
        }
    }

    static unsigned char bufs[BATCH][MAXLEN + 256];
    struct iovec iov[BATCH]; struct mmsghdr msgs[BATCH]; int kinds[BATCH];
    long sent = 0, errors = 0, by_kind[K_N] = {0}, bytes = 0, to_public = 0, to_tunnel = 0, avoided = 0;
    int pub_total = 0, tun_total = 0;
    for (int k = 0; k < K_TUN_RANDOM; k++) pub_total += WEIGHTS[k];
    for (int k = K_TUN_RANDOM; k < K_N; k++) tun_total += WEIGHTS[k];
    double start = now_s();
    while (sent + errors < count) {
        int n = count - sent - errors < BATCH ? (int)(count - sent - errors) : BATCH;
        double due = start + (sent + errors) / pps, t = now_s();
        if (due > t) { struct timespec ts = {(time_t)(due - t), (long)((due - t - (time_t)(due - t)) * 1e9)}; nanosleep(&ts, NULL); }
        for (int i = 0; i < n; i++) {
            int kind, tunnel = (int)(rnd() % 1000) < tunnel_share, w, lo = tunnel ? K_TUN_RANDOM : 0, hi = tunnel ? K_N : K_TUN_RANDOM;
            w = (int)(rnd() % (uint64_t)(tunnel ? tun_total : pub_total));
            for (kind = lo; kind < hi - 1 && w >= WEIGHTS[kind]; kind++) w -= WEIGHTS[kind];
            int len = tunnel ? make_tun(kind, bufs[i]) : make_public(kind, bufs[i]);
            while (tunnel && is_uncounted_control(bufs[i], len)) { avoided++; len = make_tun(kind, bufs[i]); }
            kinds[i] = kind;
            iov[i].iov_base = bufs[i]; iov[i].iov_len = len;
            memset(&msgs[i], 0, sizeof msgs[i]);
            msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = tunnel ? &tun[rnd() % ntun] : &pub;
            msgs[i].msg_hdr.msg_namelen = sizeof pub;
        }
        int fd = socks[rnd() % nsock], done = 0;
        while (done < n) {
            int r = sendmmsg(fd, msgs + done, n - done, 0);
            if (r < 0) { if (errno == EINTR) continue; errors++; done++; continue; }  /* skip the failing one */
            for (int i = done; i < done + r; i++) {
                by_kind[kinds[i]]++; bytes += iov[i].iov_len;
                if (kinds[i] >= K_TUN_RANDOM) to_tunnel++; else to_public++;
            }
            sent += r; done += r;
        }
    }
    double elapsed = now_s() - start;
    usleep(settle_ms * 1000);
    long received = 0; int nonzero = 0;
    static char rbuf[65536];
    printf("{\"reflected\": [");
    for (int i = 0; i < nsock; i++) {
        long c = 0;
        while (recv(socks[i], rbuf, sizeof rbuf, MSG_DONTWAIT) >= 0) c++;
        if (c) {
            char ip[32]; inet_ntop(AF_INET, &names[i].sin_addr, ip, sizeof ip);
            printf("%s[\"%s\", %d, %ld]", nonzero++ ? ", " : "", ip, ntohs(names[i].sin_port), c);
        }
        received += c;
        close(socks[i]);
    }
    printf("], \"received\": %ld, \"sources\": %d, \"sent\": %ld, \"send_errors\": %ld, \"bytes\": %ld, "
           "\"to_public\": %ld, \"to_tunnel\": %ld, \"avoided\": %ld, \"elapsed\": %.3f, \"by_kind\": {",
           received, nsock, sent, errors, bytes, to_public, to_tunnel, avoided, elapsed);
    for (int k = 0; k < K_N; k++) printf("%s\"%s\": %ld", k ? ", " : "", KIND_NAMES[k], by_kind[k]);
    printf("}}\n");
    return 0;
}
