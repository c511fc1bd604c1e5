/*
 * _sleevepump: the offload sleeve's hot loop in C, with the Python loop as its slow path.
 *
 * Theory of operation
 * -------------------
 * weaved.adapters.sleeve_offload.OffloadLoop is the whole, correct data path in Python. Profiled, a third of
 * the sleeve's CPU per byte was that Python: a trip through the interpreter for every super-packet and for
 * every ACK. This module runs the same loop (poll both descriptors, drain each, spin briefly after the last
 * packet) without the GIL and handles the two cases that carry nearly all traffic itself:
 *
 *   TUN -> UDP  a packet or TSO super-packet for a neighbour that takes version-2 chunks, cut into chunks
 *               and sent with UDP_SEGMENT exactly as OffloadLoop._outbound does (same prefixes, same iovec);
 *   UDP -> TUN  a datagram or GRO batch from an established neighbour that is exactly one whole frame for us,
 *               checked as superframe.decode_chunk and is_whole_frame check it, and written with one writev.
 *
 * Everything else (version-1 peers, relays, frames that lost chunks, anything malformed or unknown) is
 * handed, in the same buffers, to OffloadLoop._outbound(n) or ._inbound(n, segment, source) with the GIL
 * held. So this file decides only "fast or not"; every drop reason, every fix-up and every relay stays in
 * the tested Python, and a packet this code is unsure of costs time, never correctness.
 *
 * The forwarding table arrives as a packed blob (sleeve_native.pack_table) through set_table() from any
 * thread; the loop thread picks it up at its next turn (a mutex guards only the hand-over), so it never sees
 * half a table and never takes the GIL to read one. Frame ids made here have bit 47 set and those made by
 * the Python path have it clear, so the two never reuse an id within a sender.
 *
 * The buffers are the Python loop's own bytearrays, held (PyBUF_WRITABLE) for the pump's lifetime so they
 * cannot be resized under the loop. Counters are per-name uint64 written by the loop thread only and read
 * with relaxed atomics; their names are the Python loop's, so the two sets add up.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#define UDP_SEGMENT_OPT 103
#define UDP_GRO_OPT 104

#define VNET_SIZE 10
#define CHUNK_HEADER_SIZE 16
#define PREFIX (CHUNK_HEADER_SIZE + VNET_SIZE)
#define IPV4_HEADER 20
#define MAGIC 0x5753
#define VERSION2 2
#define DEFAULT_TTL 16
#define MAX_SHORT_ID 0x0FFF
#define MAX_CHUNKS 255
#define UDP_MAX_PAYLOAD 65507
#define MAX_GSO_SEGMENTS 64
#define GSO_NONE 0
#define GSO_TCPV4 1
#define F_NEEDS_CSUM 1
#define MIN_GSO_SIZE 536 /* superframe.MIN_GSO_SIZE */
#define DRAIN 32
#define NATIVE_FRAME_BIT (1ULL << 47)
#define TABLE_MAGIC 0x57535431u /* "WST1" */

/* --- counters ------------------------------------------------------------------------------------------ */

enum counter {
    C_TX_PACKETS, C_TX_BYTES, C_TX_SUPERPACKETS, C_TX_CHUNKS,
    C_RX_PACKETS, C_RX_BYTES, C_RX_SUPERPACKETS, C_RX_CHUNKS,
    C_DROP_TUN_TOO_BIG, C_DROP_TUN_SEND_ERROR, C_DROP_UDP_TRUNCATED, C_DROP_UDP_BAD_LENGTH,
    C_DROP_UDP_TUN_WRITE_ERROR, C_TUN_READ_ERRORS, C_UDP_RECEIVE_ERRORS, C_NATIVE_TX, C_NATIVE_RX, C_COUNT
};

static const char *const counter_names[C_COUNT] = {
    "tx_packets", "tx_bytes", "tx_superpackets", "tx_chunks",
    "rx_packets", "rx_bytes", "rx_superpackets", "rx_chunks",
    "drop_tun_too-big", "drop_tun_send-error", "drop_udp_truncated", "drop_udp_bad-length",
    "drop_udp_tun-write-error", "tun_read_errors", "udp_receive_errors", "native_tx_packets", "native_rx_packets",
};

/* --- the forwarding table as the loop reads it ------------------------------------------------------- */

typedef struct {
    uint32_t start, end;   /* address range [start, end), host order */
    uint32_t ip;           /* next hop's sleeve address, network order */
    uint16_t port;         /* host order */
    uint16_t dst;          /* destination short id */
    uint16_t limit;        /* chunk size the next hop takes, already min() with ours; 0: version 1 only */
    uint16_t routable;     /* 0: a drop reason or anything else the Python path decides */
} segment_t;

typedef struct {
    uint32_t ip;           /* network order */
    uint16_t port, pad;    /* host order */
} sender_t;

typedef struct {
    uint32_t start, end;   /* address range [start, end) owned by short id `owner` (host order) */
    uint16_t owner, pad;
} owner_t;

typedef struct {
    uint32_t magic, own, n_segments, n_senders, n_owners, pad;
    uint8_t known[512];    /* bit s set: short id s is known unambiguously */
} table_head_t;

typedef struct {
    table_head_t head;
    const segment_t *segments;
    const sender_t *senders;
    const owner_t *owners;
    char data[];           /* the blob, copied */
} table_t;

static table_t *table_parse(const char *blob, Py_ssize_t size) {
    if ((size_t)size < sizeof(table_head_t)) return NULL;
    table_head_t head;
    memcpy(&head, blob, sizeof head);
    if (head.magic != TABLE_MAGIC || head.n_segments > 1u << 20 || head.n_senders > 1u << 16
        || head.n_owners > 1u << 20)
        return NULL;
    size_t want = sizeof head + head.n_segments * sizeof(segment_t) + head.n_senders * sizeof(sender_t)
                  + head.n_owners * sizeof(owner_t);
    if ((size_t)size != want) return NULL;
    table_t *t = malloc(sizeof(table_t) + want);
    if (t == NULL) return NULL;
    memcpy(t->data, blob, want);
    memcpy(&t->head, blob, sizeof head);
    t->segments = (const segment_t *)(t->data + sizeof head);
    t->senders = (const sender_t *)(t->data + sizeof head + head.n_segments * sizeof(segment_t));
    t->owners = (const owner_t *)((const char *)t->senders + head.n_senders * sizeof(sender_t));
    return t;
}

static const segment_t *table_lookup(const table_t *t, uint32_t address) {
    /* The last segment whose start <= address (bisect_right - 1), if address is inside it. */
    uint32_t lo = 0, hi = t->head.n_segments;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (t->segments[mid].start <= address) lo = mid + 1;
        else hi = mid;
    }
    if (lo == 0) return NULL;
    const segment_t *s = &t->segments[lo - 1];
    return address < s->end ? s : NULL;
}

/* ForwardingTable.owner: the short id owning `address`, -1 when none. */
static int table_owner(const table_t *t, uint32_t address) {
    uint32_t lo = 0, hi = t->head.n_owners;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (t->owners[mid].start <= address) lo = mid + 1;
        else hi = mid;
    }
    if (lo == 0) return -1;
    const owner_t *o = &t->owners[lo - 1];
    return address < o->end ? (int)o->owner : -1;
}

static int table_is_sender(const table_t *t, uint32_t ip, uint16_t port) {
    for (uint32_t i = 0; i < t->head.n_senders; i++)
        if (t->senders[i].ip == ip && t->senders[i].port == port) return 1;
    return 0;
}

static int table_knows(const table_t *t, unsigned short_id) {
    return short_id <= MAX_SHORT_ID && (t->head.known[short_id >> 3] >> (short_id & 7)) & 1;
}

/* --- the pump object ------------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Py_buffer read, rx;          /* the Python loop's buffers, held */
    uint64_t counters[C_COUNT];
    uint64_t frame;
    int interrupted;             /* atomic: run() returns at its next turn */
    int table_pending;           /* atomic: set_table() left a table in `pending` */
    pthread_mutex_t lock;        /* guards `pending` */
    table_t *pending, *current;  /* `current` belongs to the loop thread */
    uint8_t prefixes[CHUNK_HEADER_SIZE + (MAX_CHUNKS - 1) * (PREFIX + 60 + 60)];
    struct iovec iov[2 * MAX_CHUNKS];
    int running;
} Pump;

static inline void count(Pump *p, enum counter c, uint64_t by) {
    __atomic_store_n(&p->counters[c], p->counters[c] + by, __ATOMIC_RELAXED);
}

static inline uint16_t be16(const uint8_t *b) { return (uint16_t)(b[0] << 8 | b[1]); }
static inline uint16_t le16(const uint8_t *b) { return (uint16_t)(b[0] | b[1] << 8); }
static inline uint32_t be32(const uint8_t *b) {
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}
static inline uint64_t be64(const uint8_t *b) { return (uint64_t)be32(b) << 32 | be32(b + 4); }

static void put_chunk_header(uint8_t *at, unsigned src, unsigned dst, uint64_t word) {
    at[0] = MAGIC >> 8; at[1] = MAGIC & 0xFF; at[2] = VERSION2; at[3] = DEFAULT_TTL;
    at[4] = src >> 8; at[5] = src & 0xFF; at[6] = dst >> 8; at[7] = dst & 0xFF;
    for (int i = 0; i < 8; i++) at[8 + i] = (uint8_t)(word >> (56 - 8 * i));
}

static uint64_t chunk_word(uint64_t frame, unsigned index, unsigned chunks) {
    return (frame & 0xFFFFFFFFFFFFULL) << 16 | (uint64_t)index << 8 | chunks;
}

static void send_datagrams(Pump *p, int sock, const segment_t *route, struct iovec *iov, int iovcnt, int segment) {
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(route->port)};
    to.sin_addr.s_addr = route->ip;
    union { char buf[CMSG_SPACE(sizeof(uint16_t))]; struct cmsghdr align; } control;
    struct msghdr msg = {.msg_name = &to, .msg_namelen = sizeof to, .msg_iov = iov, .msg_iovlen = (size_t)iovcnt};
    if (segment) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_UDP;
        cm->cmsg_type = UDP_SEGMENT_OPT;
        cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t size = (uint16_t)segment;
        memcpy(CMSG_DATA(cm), &size, sizeof size);
    }
    ssize_t sent;
    do sent = sendmsg(sock, &msg, 0); while (sent < 0 && errno == EINTR);
    if (sent < 0) count(p, errno == EMSGSIZE || errno == EINVAL ? C_DROP_TUN_TOO_BIG : C_DROP_TUN_SEND_ERROR, 1);
}

/* TUN -> UDP for the packet of n bytes in the read buffer. Returns 1 when handled, 0 for the Python path. */
static int outbound_fast(Pump *p, int sock, size_t n) {
    const table_t *t = p->current;
    uint8_t *buf = p->read.buf;
    if (t == NULL || n < VNET_SIZE + IPV4_HEADER || buf[VNET_SIZE] >> 4 != 4) return 0;
    const segment_t *route = table_lookup(t, be32(buf + VNET_SIZE + 16));
    if (route == NULL || !route->routable || route->limit == 0) return 0;
    unsigned gso_type = buf[1], mss = le16(buf + 4), limit = route->limit;
    unsigned own = t->head.own;
    if (gso_type == GSO_NONE) {
        if (CHUNK_HEADER_SIZE + n > limit) return 0;
        uint64_t frame = ++p->frame | NATIVE_FRAME_BIT;
        put_chunk_header(p->prefixes, own, route->dst, chunk_word(frame, 0, 1));
        struct iovec iov[2] = {{p->prefixes, CHUNK_HEADER_SIZE}, {buf, n}};
        send_datagrams(p, sock, route, iov, 2, 0);
        count(p, C_TX_PACKETS, 1);
        count(p, C_TX_BYTES, n - VNET_SIZE);
        count(p, C_NATIVE_TX, 1);
        return 1;
    }
    if (gso_type != GSO_TCPV4 || mss < MIN_GSO_SIZE) return 0; /* small MSS: Python segments it (v1) */
    size_t ihl = (size_t)(buf[VNET_SIZE] & 0x0F) * 4;
    if (ihl < IPV4_HEADER || VNET_SIZE + ihl + 13 > n) return 0;
    size_t headers = ihl + (size_t)(buf[VNET_SIZE + ihl + 12] >> 4) * 4;
    if (VNET_SIZE + headers >= n || headers > 120) return 0;
    size_t payload = n - VNET_SIZE - headers;
    size_t chunks = (payload + mss - 1) / mss;
    size_t size = PREFIX + headers + mss;
    if (size > limit || chunks > MAX_CHUNKS) return 0;
    uint64_t frame = ++p->frame | NATIVE_FRAME_BIT;
    size_t prefix = PREFIX + headers, first = VNET_SIZE + headers + mss;
    uint8_t *table = p->prefixes;
    struct iovec *iov = p->iov;
    put_chunk_header(table, own, route->dst, chunk_word(frame, 0, (unsigned)chunks));
    iov[0] = (struct iovec){table, CHUNK_HEADER_SIZE};
    iov[1] = (struct iovec){buf, chunks == 1 ? n : first};
    for (size_t i = 1; i < chunks; i++) {
        uint8_t *at = table + CHUNK_HEADER_SIZE + (i - 1) * prefix;
        put_chunk_header(at, own, route->dst, chunk_word(frame, (unsigned)i, (unsigned)chunks));
        memcpy(at + CHUNK_HEADER_SIZE, buf, VNET_SIZE + headers);
        size_t from = first + (i - 1) * mss;
        iov[2 * i] = (struct iovec){at, prefix};
        iov[2 * i + 1] = (struct iovec){buf + from, (i + 1 == chunks ? n : from + mss) - from};
    }
    size_t per_send = UDP_MAX_PAYLOAD / size;
    if (per_send > MAX_GSO_SEGMENTS) per_send = MAX_GSO_SEGMENTS;
    if (per_send < 1) per_send = 1;
    for (size_t start = 0; start < chunks; start += per_send) {
        size_t these = chunks - start < per_send ? chunks - start : per_send;
        send_datagrams(p, sock, route, iov + 2 * start, (int)(2 * these), (int)size);
    }
    count(p, C_TX_PACKETS, 1);
    count(p, C_TX_BYTES, n - VNET_SIZE);
    count(p, C_TX_SUPERPACKETS, 1);
    count(p, C_TX_CHUNKS, chunks);
    count(p, C_NATIVE_TX, 1);
    return 1;
}

/* superframe.check_vnet: the virtio header at `at` describes the IPv4 packet after it (`length` bytes for
 * both). */
static int vnet_ok(const uint8_t *at, size_t length) {
    if (length < VNET_SIZE + IPV4_HEADER) return 0;
    unsigned flags = at[0], gso_type = at[1], mss = le16(at + 4);
    size_t csum_start = le16(at + 6), csum_offset = le16(at + 8), inner = length - VNET_SIZE;
    uint8_t first = at[VNET_SIZE];
    if (first >> 4 != 4) return 0;
    size_t ihl = (size_t)(first & 0x0F) * 4;
    if (ihl < IPV4_HEADER || ihl > inner) return 0;
    if ((gso_type != GSO_NONE && gso_type != GSO_TCPV4) || (flags & ~(unsigned)F_NEEDS_CSUM)) return 0;
    if ((flags & F_NEEDS_CSUM) && (csum_start < ihl || csum_start + csum_offset + 2 > inner)) return 0;
    if (gso_type == GSO_TCPV4 && (mss < MIN_GSO_SIZE || !(flags & F_NEEDS_CSUM) || at[VNET_SIZE + 9] != 6 || ihl + 20 > inner))
        return 0;
    return 1;
}

/* superframe.decode_chunk plus the known-source check, for the chunk of `length` bytes at `at`: 1 when it
 * is well formed and from a peer we know, with its short ids and count. */
static int chunk_ok(const table_t *t, const uint8_t *at, size_t length, unsigned *dst, unsigned *count) {
    if (length < PREFIX + IPV4_HEADER || be16(at) != MAGIC || at[2] != VERSION2) return 0;
    unsigned src = be16(at + 4), d = be16(at + 6), index = at[14], c = at[15];
    if (src > MAX_SHORT_ID || d > MAX_SHORT_ID || c == 0 || index >= c) return 0;
    if (!vnet_ok(at + CHUNK_HEADER_SIZE, length - CHUNK_HEADER_SIZE)) return 0;
    if (c > 1 && at[CHUNK_HEADER_SIZE + 1] != GSO_TCPV4) return 0;
    if (!table_knows(t, src)) return 0;
    /* ForwardingTable.check_inner: src owns the inner source, d the inner destination. */
    const uint8_t *ip = at + PREFIX;
    if (table_owner(t, be32(ip + 12)) != (int)src || table_owner(t, be32(ip + 16)) != (int)d) return 0;
    *dst = d;
    *count = c;
    return 1;
}

/* superframe.is_whole_frame: the `count` chunks of `size` bytes (the last may be shorter) in the first n
 * bytes are exactly chunks 0..count-1 of one frame, in order. */
static int whole_frame(const uint8_t *rx, size_t n, size_t count, size_t size) {
    if (count == 1) return (be64(rx + 8) & 0xFFFF) == 1;
    if (n - (count - 1) * size < PREFIX + IPV4_HEADER) return 0;
    uint64_t first = be64(rx + 8);
    if ((first & 0xFFFF) != count) return 0;
    for (size_t i = 1; i < count; i++)
        if (be64(rx + i * size + 8) != first + (i << 8)) return 0;
    return 1;
}

/* OffloadLoop._deliver: one packet or super-packet of `length` bytes into the TUN. */
static void deliver(Pump *p, int tun, struct iovec *iov, int iovcnt, size_t length, size_t chunks) {
    const uint8_t *head = iov[0].iov_base;
    if (iov[0].iov_len < VNET_SIZE + 4 || be16(head + VNET_SIZE + 2) != length) {
        count(p, C_DROP_UDP_BAD_LENGTH, 1);
        return;
    }
    ssize_t written;
    do written = writev(tun, iov, iovcnt); while (written < 0 && errno == EINTR);
    if (written < 0) {
        count(p, C_DROP_UDP_TUN_WRITE_ERROR, 1);
        return;
    }
    count(p, C_RX_PACKETS, 1);
    count(p, C_RX_BYTES, length);
    count(p, C_NATIVE_RX, 1);
    if (chunks > 1) {
        count(p, C_RX_SUPERPACKETS, 1);
        count(p, C_RX_CHUNKS, chunks);
    }
}

/* UDP -> TUN for the n bytes (GRO segment size `segment`, 0: none) from `from`. 1 when handled. */
static int inbound_fast(Pump *p, int tun, size_t n, size_t segment, const struct sockaddr_in *from) {
    const table_t *t = p->current;
    const uint8_t *rx = p->rx.buf;
    if (t == NULL || from->sin_family != AF_INET || !table_is_sender(t, from->sin_addr.s_addr, ntohs(from->sin_port)))
        return 0;
    if (n < PREFIX + IPV4_HEADER) return 0; /* before the division: an empty datagram has no GRO segment */
    if (segment == 0 || segment > n) segment = n;
    size_t count_ = (n + segment - 1) / segment;
    /* A frame has at most 255 chunks; a bigger batch (never made by GRO today) goes to Python, and p->iov
     * holds 2 * 255 entries. */
    if (count_ > MAX_CHUNKS || rx[2] != VERSION2 || !whole_frame(rx, n, count_, segment)) return 0;
    unsigned dst, chunks;
    if (!chunk_ok(t, rx, segment, &dst, &chunks) || dst != t->head.own) return 0;
    if (count_ == 1) {
        struct iovec iov = {(void *)(rx + CHUNK_HEADER_SIZE), n - CHUNK_HEADER_SIZE};
        deliver(p, tun, &iov, 1, n - PREFIX, 0);
        return 1;
    }
    size_t ihl = (size_t)(rx[PREFIX] & 0x0F) * 4;
    size_t headers = ihl + (size_t)(rx[PREFIX + ihl + 12] >> 4) * 4;
    size_t skip = PREFIX + headers, last = (count_ - 1) * segment;
    if (skip > n - last) return 0;
    struct iovec *iov = p->iov;
    iov[0] = (struct iovec){(void *)(rx + CHUNK_HEADER_SIZE), segment - CHUNK_HEADER_SIZE};
    for (size_t i = 1; i < count_; i++) {
        size_t at = i * segment, end = i + 1 == count_ ? n : at + segment;
        iov[i] = (struct iovec){(void *)(rx + at + skip), end - at - skip};
    }
    deliver(p, tun, iov, (int)count_, n - count_ * skip + headers, count_);
    return 1;
}

/* --- the loop ------------------------------------------------------------------------------------------- */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void take_pending_table(Pump *p) {
    if (!__atomic_load_n(&p->table_pending, __ATOMIC_ACQUIRE)) return;
    pthread_mutex_lock(&p->lock);
    table_t *fresh = p->pending;
    p->pending = NULL;
    __atomic_store_n(&p->table_pending, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->lock);
    if (fresh != NULL) {
        free(p->current);
        p->current = fresh;
    }
}

static PyObject *source_tuple(const struct sockaddr_in *from) {
    char text[INET_ADDRSTRLEN];
    if (inet_ntop(AF_INET, &from->sin_addr, text, sizeof text) == NULL) text[0] = 0;
    return Py_BuildValue("(si)", text, (int)ntohs(from->sin_port));
}

PyDoc_STRVAR(run_doc,
"run(tun_fd, sock_fd, outbound, inbound, spin_seconds, poll_ms)\n--\n\n"
"Serve both directions until interrupt() (or an exception from a callback). ``outbound(n)`` and\n"
"``inbound(n, segment, source)`` are the Python loop's slow paths, called with the GIL for what the\n"
"fast paths leave; they find the packet in the pump's buffers.");

static PyObject *Pump_run(Pump *p, PyObject *args) {
    int tun, sock, poll_ms;
    double spin;
    PyObject *outbound, *inbound;
    if (!PyArg_ParseTuple(args, "iiOOdi", &tun, &sock, &outbound, &inbound, &spin, &poll_ms)) return NULL;
    if (p->read.obj == NULL || p->rx.obj == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the pump was not initialised with its buffers");
        return NULL;
    }
    if (p->running) {
        PyErr_SetString(PyExc_RuntimeError, "the pump is already running");
        return NULL;
    }
    p->running = 1;
    struct pollfd fds[2] = {{.fd = tun, .events = POLLIN}, {.fd = sock, .events = POLLIN}};
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
    PyObject *failed = NULL;
    double busy_until = 0;
    PyThreadState *state = PyEval_SaveThread();
    while (!__atomic_load_n(&p->interrupted, __ATOMIC_ACQUIRE)) {
        take_pending_table(p);
        int worked = 0;
        for (int i = 0; i < DRAIN; i++) {
            ssize_t n = read(tun, p->read.buf, (size_t)p->read.len);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) break;
                count(p, C_TUN_READ_ERRORS, 1); /* the device was deleted: wait to be reattached */
                struct timespec pause = {0, 500 * 1000 * 1000};
                nanosleep(&pause, NULL);
                break;
            }
            worked = 1;
            if (outbound_fast(p, sock, (size_t)n)) continue;
            PyEval_RestoreThread(state);
            PyObject *r = PyObject_CallFunction(outbound, "n", (Py_ssize_t)n);
            Py_XDECREF(r);
            state = PyEval_SaveThread();
            if (r == NULL) goto out;
        }
        for (int i = 0; i < DRAIN; i++) {
            struct sockaddr_in from;
            struct iovec iov = {p->rx.buf, (size_t)p->rx.len};
            struct msghdr msg = {.msg_name = &from, .msg_namelen = sizeof from, .msg_iov = &iov, .msg_iovlen = 1,
                                 .msg_control = control.buf, .msg_controllen = sizeof control.buf};
            ssize_t n = recvmsg(sock, &msg, MSG_DONTWAIT);
            if (n < 0) {
                if (errno != EAGAIN && errno != EINTR) count(p, C_UDP_RECEIVE_ERRORS, 1);
                break;
            }
            worked = 1;
            if (msg.msg_flags & MSG_TRUNC) {
                count(p, C_DROP_UDP_TRUNCATED, 1);
                continue;
            }
            size_t segment = (size_t)n;
            for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm != NULL; cm = CMSG_NXTHDR(&msg, cm))
                if (cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_GRO_OPT) {
                    int gro;
                    memcpy(&gro, CMSG_DATA(cm), sizeof gro);
                    segment = (size_t)gro;
                }
            if (inbound_fast(p, tun, (size_t)n, segment, &from)) continue;
            PyEval_RestoreThread(state);
            PyObject *source = source_tuple(&from);
            PyObject *r = source ? PyObject_CallFunction(inbound, "nnO", (Py_ssize_t)n, (Py_ssize_t)segment, source)
                                 : NULL;
            Py_XDECREF(source);
            Py_XDECREF(r);
            state = PyEval_SaveThread();
            if (r == NULL) goto out;
        }
        if (worked) {
            busy_until = now() + spin;
        } else if (now() < busy_until) {
            sched_yield(); /* keep the CPU awake, but let the pod, the peer's daemon or the kernel run */
        } else {
            poll(fds, 2, poll_ms);
        }
    }
    __atomic_store_n(&p->interrupted, 0, __ATOMIC_RELEASE);
    failed = Py_None;
out:
    PyEval_RestoreThread(state);
    p->running = 0;
    if (failed == NULL) return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(interrupt_doc, "interrupt()\n--\n\nMake run() return at its next turn (within poll_ms).");

static PyObject *Pump_interrupt(Pump *p, PyObject *Py_UNUSED(ignored)) {
    __atomic_store_n(&p->interrupted, 1, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(set_table_doc, "set_table(blob)\n--\n\nThe forwarding table to use from the loop's next turn on.");

static PyObject *Pump_set_table(Pump *p, PyObject *arg) {
    Py_buffer blob;
    if (PyObject_GetBuffer(arg, &blob, PyBUF_SIMPLE) < 0) return NULL;
    table_t *fresh = table_parse(blob.buf, blob.len);
    PyBuffer_Release(&blob);
    if (fresh == NULL) {
        PyErr_SetString(PyExc_ValueError, "not a packed forwarding table");
        return NULL;
    }
    pthread_mutex_lock(&p->lock);
    free(p->pending);
    p->pending = fresh;
    __atomic_store_n(&p->table_pending, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->lock);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(counters_doc, "counters() -> dict\n--\n\nThe pump's own counts (only those above zero).");

static PyObject *Pump_counters(Pump *p, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyDict_New();
    if (out == NULL) return NULL;
    for (int i = 0; i < C_COUNT; i++) {
        uint64_t value = __atomic_load_n(&p->counters[i], __ATOMIC_RELAXED);
        if (value == 0) continue;
        PyObject *number = PyLong_FromUnsignedLongLong(value);
        if (number == NULL || PyDict_SetItemString(out, counter_names[i], number) < 0) {
            Py_XDECREF(number);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(number);
    }
    return out;
}

static int Pump_init(Pump *p, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"read_buffer", "receive_buffer", NULL};
    PyObject *read, *rx;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO", keywords, &read, &rx)) return -1;
    if (p->read.obj != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a pump is initialised once");
        return -1;
    }
    if (PyObject_GetBuffer(read, &p->read, PyBUF_WRITABLE) < 0) return -1;
    if (PyObject_GetBuffer(rx, &p->rx, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&p->read);
        return -1;
    }
    if (p->read.len < VNET_SIZE + 65535 || p->rx.len < 65536) {
        PyBuffer_Release(&p->read);
        PyBuffer_Release(&p->rx);
        PyErr_SetString(PyExc_ValueError, "buffers too small for a super-packet and a GRO batch");
        return -1;
    }
    return 0;
}

static PyObject *Pump_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    (void)args;
    (void)kwargs;
    Pump *p = (Pump *)type->tp_alloc(type, 0); /* zeroed */
    if (p != NULL) pthread_mutex_init(&p->lock, NULL);
    return (PyObject *)p;
}

static void Pump_dealloc(Pump *p) {
    if (p->read.obj != NULL) PyBuffer_Release(&p->read);
    if (p->rx.obj != NULL) PyBuffer_Release(&p->rx);
    free(p->pending);
    free(p->current);
    pthread_mutex_destroy(&p->lock);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyMethodDef Pump_methods[] = {
    {"run", (PyCFunction)Pump_run, METH_VARARGS, run_doc},
    {"interrupt", (PyCFunction)Pump_interrupt, METH_NOARGS, interrupt_doc},
    {"set_table", (PyCFunction)Pump_set_table, METH_O, set_table_doc},
    {"counters", (PyCFunction)Pump_counters, METH_NOARGS, counters_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "weaved.adapters._sleevepump.Pump",
    .tp_doc = PyDoc_STR("Pump(read_buffer, receive_buffer): the offload sleeve's hot loop (module docstring)."),
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Pump_new,
    .tp_init = (initproc)Pump_init,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_sleevepump",
    .m_doc = "The offload sleeve's hot loop in C (see the source's header).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__sleevepump(void) {
    if (PyType_Ready(&PumpType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&PumpType);
    if (PyModule_AddObject(m, "Pump", (PyObject *)&PumpType) < 0
        || PyModule_AddIntConstant(m, "TABLE_MAGIC", (long)TABLE_MAGIC) < 0
        || PyModule_AddIntConstant(m, "NATIVE_FRAME_BIT", (long)NATIVE_FRAME_BIT) < 0) {
        Py_DECREF(&PumpType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
