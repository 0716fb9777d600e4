/* rtcrelay's in-kernel fast path: a TC (clsact ingress) program that forwards the datagrams of
 * established flows both ways, so the relay's workers see only what needs a decision.
 *
 *   client -> public address, source a flow in `flows`:
 *       grow by the 24-byte tunnel Data header (wire/tunnel_frame.py's fixed-width layout: the
 *       flow's 22-byte prefix from the map, then the payload length), send from the worker's
 *       tunnel address to the flow's transceiver.
 *   transceiver -> tunnel address, a Data frame whose handle is in `returns`, from that flow's
 *   transceiver, whose prefix and length match:
 *       strip the header, send the payload to the client from the public address.
 *
 * Where it goes: an address of this host through loopback (delivered in place when it came in
 * on loopback); anything else out of the interface the other side's datagrams last came in on
 * (`paths`, written here), with bpf_redirect_neigh filling the MACs: no FIB lookup, which the
 * kernel refuses where IP forwarding is off. Redirected datagrams pass no netfilter hook.
 *
 * Everything else (no listener, no flow, a fragment, IP options, a malformed or oversized
 * datagram, a control frame, the other side not seen yet, a client behind NAT on this host, a
 * checksummed frame for a client elsewhere) goes on untouched (TC_ACT_UNSPEC: the next filter,
 * then the stack and the workers' sockets), so the relay's guarantees hold: the
 * kernel sends only to an address a worker put in a map (no reflection), and a worker deletes a
 * flow's keys the moment the flow ends. Workers write the maps (relay/kernel_flows.py); the
 * supervisor loads and attaches this program (relay/kernel_path.py). IPv4 only: IPv6 flows stay
 * on the workers' hit path.
 *
 * The checksum of the UDP datagram it writes is 0 (legal for IPv4: not computed); the IP
 * header's is recomputed. Counters are per CPU (no atomics on the packet path): per flow in
 * `counters` (slot chosen by the worker), per outcome in `stats`.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define HEADER_LEN 24      /* DATA_HEADER_LEN_V4 */
#define PREFIX_LEN 22      /* the header up to the payload length */
#define MAX_PAYLOAD 2048   /* relay/worker.py BUFSIZE: larger ones go to the workers (counted there) */
#define LOOPBACK_IFINDEX 1
#define KIND_PUBLIC 1
#define KIND_TUNNEL 2
#define PASS TC_ACT_UNSPEC

/* relay/kernel_maps.py packs the same layouts: keep the two in step (tests/test_kernel_maps.py). */
struct listener_key {
    __be32 ip;
    __be16 port;
    __u16 pad;
};

struct listener {
    __u32 kind;
};

struct flow_key {            /* a client datagram: (source, destination) */
    __be32 client_ip;
    __be32 public_ip;
    __be16 client_port;
    __be16 public_port;
};

struct flow {
    __be32 tunnel_ip;         /* the worker's tunnel address: the source towards the transceiver */
    __be32 target_ip;         /* the transceiver */
    __be16 tunnel_port;
    __be16 target_port;
    __u32 slot;               /* index in `counters` */
    __u32 local;              /* the transceiver's address is this host's: deliver locally */
    __u32 client_local;       /* the client's address is this host's (see socket_here) */
    __u8 prefix[24];          /* PREFIX_LEN used */
};

struct return_key {          /* a tunnel frame: (handle as on the wire, destination) */
    __u64 handle;
    __be32 tunnel_ip;
    __be16 tunnel_port;
    __u16 pad;
};

struct return_flow {
    __be32 target_ip;         /* the frame must come from the flow's transceiver */
    __be32 client_ip;
    __be32 public_ip;
    __be16 target_port;
    __be16 client_port;
    __be16 public_port;
    __u16 pad;
    __u32 slot;
    __u32 local;              /* the client's address is this host's */
    __u8 prefix[24];          /* what the frame must start with */
};

struct path {                /* where each side was last seen: its packets' ingress interface */
    __u32 client_ifindex;
    __u32 transceiver_ifindex;
    __be32 public_ip;         /* the address the client sent to (a wildcard listener's flows) */
};

struct flow_counters {
    __u64 packets_in;         /* client -> transceiver */
    __u64 bytes_in;
    __u64 packets_out;        /* transceiver -> client */
    __u64 bytes_out;
};

enum stat {
    STAT_TO_TRANSCEIVER,      /* forwarded */
    STAT_TO_CLIENT,
    STAT_NO_ROUTE,            /* a flow's datagram left to the workers: no route or neighbour */
    STAT_MISMATCH,            /* a frame with a live handle but not its flow's source/prefix/length */
    STAT_ADJUST_FAILED,       /* the kernel could not grow or shrink the packet */
    STAT_CHECKSUMMED,         /* a frame with a UDP checksum for a client elsewhere (see from_transceiver) */
    STAT_NO_LOCAL_SOCKET,     /* a reply for a client address of this host that no socket has (NAT here) */
    STAT_COUNT,
};

struct settings {
    __u32 loopback_egress;    /* 1: between loopback addresses too, go out through lo (captures see it) */
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct settings);
} settings SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, struct listener_key);
    __type(value, struct listener);
} listeners SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);   /* set at load: workers x flow_capacity */
    __type(key, struct flow_key);
    __type(value, struct flow);
} flows SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, struct return_key);
    __type(value, struct return_flow);
} returns SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 65536);
    __type(key, __u32);
    __type(value, struct flow_counters);
} counters SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 65536);
    __type(key, __u32);
    __type(value, struct path);
} paths SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, STAT_COUNT);
    __type(key, __u32);
    __type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 which)
{
    __u64 *value = bpf_map_lookup_elem(&stats, &which);
    if (value)
        *value += 1;
}

static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
    __u16 *words = (__u16 *)ip;
    __u32 sum = 0;
    ip->check = 0;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
        sum += words[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (__u16)~sum;
}

/* Where the rewritten packet goes, decided before the packet is changed (a packet that cannot
 * go is left to the workers intact): *ifindex 0 = deliver here (it came in on loopback), else
 * redirect there (through the neighbour subsystem unless it is loopback). Returns 0, or -1.
 *
 * A host address goes through loopback. Anything else goes out of the interface the other
 * side's datagrams last came in on (`paths`, recorded by this program): the reply leaves where
 * the request arrived, and no FIB lookup needs IP forwarding on (bpf_fib_lookup refuses when
 * it is off, as on most hosts that are not routers). */
static __always_inline int route(struct __sk_buff *skb, __u32 local, __u32 seen_ifindex, __u32 *ifindex)
{
    if (local) {
        __u32 zero = 0;
        struct settings *set = bpf_map_lookup_elem(&settings, &zero);
        *ifindex = skb->ingress_ifindex == LOOPBACK_IFINDEX && !(set && set->loopback_egress) ? 0 : LOOPBACK_IFINDEX;
        return 0;
    }
    if (!seen_ifindex)
        return -1;
    *ifindex = seen_ifindex;
    return 0;
}

static __always_inline int send(__u32 ifindex, struct ethhdr *eth)
{
    if (!ifindex)
        return TC_ACT_OK;
    if (ifindex == LOOPBACK_IFINDEX) {
        /* loopback's address is all zeroes: a frame for it has zero MACs */
        __builtin_memset(eth->h_source, 0, ETH_ALEN);
        __builtin_memset(eth->h_dest, 0, ETH_ALEN);
        return bpf_redirect(ifindex, 0);
    }
    return bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

/* The packet's headers after a size change, re-checked for the verifier. */
#define HEADERS(skb, eth, ip, udp, extra)                                              \
    void *eth##_end = (void *)(long)(skb)->data_end;                                  \
    struct ethhdr *eth = (void *)(long)(skb)->data;                                  \
    struct iphdr *ip = (void *)(eth + 1);                                            \
    struct udphdr *udp = (void *)(ip + 1);                                           \
    if ((void *)(udp + 1) + (extra) > eth##_end)                                     \
        return PASS;

static __always_inline void rewrite(struct iphdr *ip, struct udphdr *udp, __be32 src, __be16 sport, __be32 dst,
                                    __be16 dport, __u16 payload)
{
    ip->saddr = src;
    ip->daddr = dst;
    ip->ttl = 64;
    ip->tot_len = bpf_htons(sizeof(*ip) + sizeof(*udp) + payload);
    ip->check = ip_checksum(ip);
    udp->source = sport;
    udp->dest = dport;
    udp->len = bpf_htons(sizeof(*udp) + payload);
    udp->check = 0;
}

/* A client on this host: is there a socket that takes a datagram from (src, sport) to (dst,
 * dport)? None when the client is behind NAT on this host (its real port is another), whose
 * datagrams need conntrack's translation, which the workers' sends get and a datagram rewritten
 * here does not: those go through the workers, both ways. */
static __always_inline int socket_here(struct __sk_buff *skb, __be32 src, __be16 sport, __be32 dst, __be16 dport)
{
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = src;
    tuple.ipv4.daddr = dst;
    tuple.ipv4.sport = sport;
    tuple.ipv4.dport = dport;
    struct bpf_sock *sk = bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return 0;
    bpf_sk_release(sk);
    return 1;
}

static __always_inline int from_client(struct __sk_buff *skb, struct flow_key *key, __u16 payload, __be32 sent_to)
{
    struct flow *flow = bpf_map_lookup_elem(&flows, key);
    if (!flow)
        return PASS;
    /* A client on this host behind NAT here: its datagram carries its conntrack entry, whose
     * NAT the input hook would apply again to the rewritten datagram (its source would become
     * the client's NAT address). Such a client has no socket at its address: the workers send. */
    if (flow->client_local && !socket_here(skb, sent_to, key->public_port, key->client_ip, key->client_port)) {
        count(STAT_NO_LOCAL_SOCKET);
        return PASS;
    }
    struct path *path = bpf_map_lookup_elem(&paths, &flow->slot);
    if (!path)
        return PASS;
    if (path->client_ifindex != skb->ingress_ifindex)
        path->client_ifindex = skb->ingress_ifindex;
    if (path->public_ip != sent_to)
        path->public_ip = sent_to;
    __u32 ifindex;
    if (route(skb, flow->local, path->transceiver_ifindex, &ifindex)) {
        count(STAT_NO_ROUTE); /* no frame from the transceiver seen yet: the workers send this one */
        return PASS;
    }
    /* the room goes between the IP and the UDP header: the new UDP header, then the tunnel
     * header, whose last 8 bytes land on the old UDP header */
    if (bpf_skb_adjust_room(skb, HEADER_LEN, BPF_ADJ_ROOM_NET, 0)) {
        count(STAT_ADJUST_FAILED);
        return PASS;
    }
    HEADERS(skb, eth, ip, udp, HEADER_LEN)
    __u8 *header = (__u8 *)(udp + 1);
    __builtin_memcpy(header, flow->prefix, PREFIX_LEN);
    header[PREFIX_LEN] = payload >> 8;
    header[PREFIX_LEN + 1] = payload & 0xff;
    rewrite(ip, udp, flow->tunnel_ip, flow->tunnel_port, flow->target_ip, flow->target_port, payload + HEADER_LEN);
    struct flow_counters *c = bpf_map_lookup_elem(&counters, &flow->slot);
    if (c) {
        c->packets_in += 1;
        c->bytes_in += payload;
    }
    count(STAT_TO_TRANSCEIVER);
    return send(ifindex, eth);
}

static __always_inline int prefix_matches(const __u8 *frame, const __u8 *prefix)
{
    __u64 a0, a1, b0, b1;
    __u32 a2, b2;
    __u16 a3, b3;
    __builtin_memcpy(&a0, frame, 8);
    __builtin_memcpy(&b0, prefix, 8);
    __builtin_memcpy(&a1, frame + 8, 8);
    __builtin_memcpy(&b1, prefix + 8, 8);
    __builtin_memcpy(&a2, frame + 16, 4);
    __builtin_memcpy(&b2, prefix + 16, 4);
    __builtin_memcpy(&a3, frame + 20, 2);
    __builtin_memcpy(&b3, prefix + 20, 2);
    return a0 == b0 && a1 == b1 && a2 == b2 && a3 == b3;
}

static __always_inline int from_transceiver(struct __sk_buff *skb, __be32 tunnel_ip, __be16 tunnel_port,
                                            __be32 source_ip, __be16 source_port, __u16 length, __u16 checksum)
{
    if (length < HEADER_LEN)
        return PASS;
    /* the header must be in the linear part (it is, but for odd drivers) */
    if (bpf_skb_pull_data(skb, sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr) + HEADER_LEN))
        return PASS;
    HEADERS(skb, eth0, ip0, udp0, HEADER_LEN)
    const __u8 *frame = (const __u8 *)(udp0 + 1);
    /* version 1, fixarray(5), tag 1 (Data), uint64 marker */
    if (frame[0] != 0x01 || frame[1] != 0x95 || frame[2] != 0x01 || frame[3] != 0xcf)
        return PASS;
    struct return_key key = {.tunnel_ip = tunnel_ip, .tunnel_port = tunnel_port};
    __builtin_memcpy(&key.handle, frame + 4, 8);
    struct return_flow *flow = bpf_map_lookup_elem(&returns, &key);
    if (!flow)
        return PASS;
    __u16 payload = length - HEADER_LEN;
    if (flow->target_ip != source_ip || flow->target_port != source_port || !prefix_matches(frame, flow->prefix)
        || frame[PREFIX_LEN] != (payload >> 8) || frame[PREFIX_LEN + 1] != (payload & 0xff)) {
        count(STAT_MISMATCH);
        return PASS; /* the workers validate it again and count why */
    }
    /* A frame a local process sent with a UDP checksum leaves its checksum to be completed at
     * transmission (CHECKSUM_PARTIAL), at an offset that the shrink below leaves 24 bytes off:
     * fine if the datagram is delivered on this host, wrong if a NIC completes it. Such frames
     * go out through the workers; rtcrelay's transceiver sends none (SO_NO_CHECK). */
    if (!flow->local && checksum) {
        count(STAT_CHECKSUMMED);
        return PASS;
    }
    struct path *path = bpf_map_lookup_elem(&paths, &flow->slot);
    if (!path)
        return PASS;
    /* the reply's source: the public address, or (a wildcard listener) the one the client used */
    __be32 public_ip = flow->public_ip ? flow->public_ip : path->public_ip;
    if (flow->local && !socket_here(skb, public_ip, flow->public_port, flow->client_ip, flow->client_port)) {
        count(STAT_NO_LOCAL_SOCKET);
        return PASS;
    }
    if (path->transceiver_ifindex != skb->ingress_ifindex)
        path->transceiver_ifindex = skb->ingress_ifindex;
    __u32 ifindex;
    if (!public_ip || route(skb, flow->local, path->client_ifindex, &ifindex)) {
        count(STAT_NO_ROUTE);
        return PASS;
    }
    /* the 24 bytes after the IP header go (the old UDP header and 16 header bytes); the new UDP
     * header lands on the header's last 8 bytes */
    if (bpf_skb_adjust_room(skb, -HEADER_LEN, BPF_ADJ_ROOM_NET, 0)) {
        count(STAT_ADJUST_FAILED);
        return PASS;
    }
    HEADERS(skb, eth, ip, udp, 0)
    rewrite(ip, udp, public_ip, flow->public_port, flow->client_ip, flow->client_port, payload);
    struct flow_counters *c = bpf_map_lookup_elem(&counters, &flow->slot);
    if (c) {
        c->packets_out += 1;
        c->bytes_out += payload;
    }
    count(STAT_TO_CLIENT);
    return send(ifindex, eth);
}

SEC("tc")
int rtcrelay_ingress(struct __sk_buff *skb)
{
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return PASS;
    HEADERS(skb, eth, ip, udp, 0)
    if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 || ip->version != 4 || ip->protocol != IPPROTO_UDP)
        return PASS;
    if (ip->frag_off & bpf_htons(0x3fff)) /* MF or an offset: a fragment */
        return PASS;
    struct listener_key where = {.ip = ip->daddr, .port = udp->dest};
    struct listener *listener = bpf_map_lookup_elem(&listeners, &where);
    if (!listener) {
        where.ip = 0; /* a public socket bound to 0.0.0.0 */
        listener = bpf_map_lookup_elem(&listeners, &where);
        if (!listener || listener->kind != KIND_PUBLIC)
            return PASS;
    }
    __u16 udp_len = bpf_ntohs(udp->len);
    if (udp_len <= sizeof(*udp) || udp_len != bpf_ntohs(ip->tot_len) - sizeof(*ip))
        return PASS;
    __u16 length = udp_len - sizeof(*udp);
    if (length > MAX_PAYLOAD)
        return PASS;
    if (listener->kind == KIND_PUBLIC) {
        struct flow_key key = {
            .client_ip = ip->saddr, .public_ip = where.ip, .client_port = udp->source, .public_port = udp->dest,
        };
        return from_client(skb, &key, length, ip->daddr);
    }
    if (listener->kind == KIND_TUNNEL)
        return from_transceiver(skb, ip->daddr, udp->dest, ip->saddr, udp->source, length, udp->check);
    return PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
