// The kernel relay of `--relay kernel` (host/src/kernel_relay.rs): an sk_skb stream-verdict
// program that hands each byte a relayed socket receives straight to its peer socket's send
// queue, so the bytes of a relayed connection never cross into Harbor.
//
// Harbor puts both sockets of a connection into `sockets` (keyed by socket cookie) and
// writes `peers[cookie] = { peer cookie }`. This program counts what it moves in `peers`, so
// Harbor can see activity (the idle deadline), byte totals (metrics) and whether everything
// received before an EOF has been handed on (the half-close).
//
// Built by host/build.rs with clang -target bpf; only linux/bpf.h (linux-libc-dev) is needed.

#include <linux/bpf.h>

#define SEC(name) __attribute__((section(name), used))

// The three helpers used, by their numbers in linux/bpf.h (what libbpf's bpf_helpers.h declares).
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static __u64 (*bpf_get_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;
static long (*bpf_sk_redirect_hash)(struct __sk_buff *skb, void *map, void *key, __u64 flags) =
    (void *)BPF_FUNC_sk_redirect_hash;

// The legacy map definition aya reads from the "maps" section.
struct bpf_map_def {
    unsigned int type;
    unsigned int key_size;
    unsigned int value_size;
    unsigned int max_entries;
    unsigned int map_flags;
};

struct peer {
    // Cookie of the socket this one's bytes go to.
    __u64 peer;
    // Bytes handed on to the peer so far.
    __u64 moved;
    // Bytes kept on this socket because the peer was not (yet) in `sockets`.
    __u64 kept;
};

// Capacities are set by Harbor at load time (2 sockets per relayed connection).
SEC("maps") struct bpf_map_def sockets = {
    .type = BPF_MAP_TYPE_SOCKHASH,
    .key_size = sizeof(__u64),
    .value_size = sizeof(__u32),
    .max_entries = 65536,
};

SEC("maps") struct bpf_map_def peers = {
    .type = BPF_MAP_TYPE_HASH,
    .key_size = sizeof(__u64),
    .value_size = sizeof(struct peer),
    .max_entries = 65536,
};

SEC("sk_skb/stream_verdict")
int relay_verdict(struct __sk_buff *skb) {
    __u64 cookie = bpf_get_socket_cookie(skb);
    struct peer *p = bpf_map_lookup_elem(&peers, &cookie);
    if (!p) {
        return SK_PASS; // not a relayed socket: its bytes stay with it
    }
    if (skb->len == 0) {
        // The skb that carried a FIN and no data: TCP has taken the FIN already. Handed on,
        // it would reach the peer after Harbor's shutdown and fail there with EPIPE.
        return SK_DROP;
    }
    __u64 peer = p->peer;
    if (bpf_sk_redirect_hash(skb, &sockets, &peer, 0) != SK_PASS) {
        // The peer is not in `sockets` (yet, or any more): keep the bytes on this socket,
        // where Harbor sees them, rather than drop them.
        __sync_fetch_and_add(&p->kept, skb->len);
        return SK_PASS;
    }
    __sync_fetch_and_add(&p->moved, skb->len);
    return SK_PASS;
}

char _license[] SEC("license") = "GPL";
