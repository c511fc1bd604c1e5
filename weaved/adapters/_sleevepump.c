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
 * Sealing (weaved.core.sleeveseal is the definition): the table carries each keyed neighbour's send key and
 * receive keys. Each key gets a slot with its own cipher state (AES-256-GCM, keyed once: a libgcrypt handle
 * where the build has libgcrypt and the CPU AES-NI and PCLMULQDQ, about two thirds of EVP's cost per chunk,
 * else an EVP_CIPHER_CTX; see `aead_names`) and its send counter or replay window; slots outlive tables (a
 * rebuilt table with the same key keeps its slot, so no counter restarts). A batch from a keyed neighbour is
 * opened in place first, datagram by datagram, the plain frames closed up at the start of the buffer (auth,
 * replay, unsealed counted here), and the fast path or Python then sees plain frames (inbound's `opened`
 * argument). What goes to a keyed neighbour is sealed into `tx`, one GSO send at a time (libgcrypt: each
 * chunk gathered there, then sealed in place); the Python path seals through Pump.seal, so every key has one
 * counter.
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

#include <openssl/crypto.h>
#include <openssl/evp.h>
#ifdef HAVE_GCRYPT
#include <gcrypt.h>
#endif

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
#define TABLE_MAGIC 0x57535432u /* "WST2" */
#define HEADER_SIZE 8
#define SEALED_V1 3
#define SEALED_V2 4
#define CLEAR_SIZE 20
#define TAG_SIZE 16
#define SEAL_OVERHEAD (CLEAR_SIZE - HEADER_SIZE + TAG_SIZE)
#define KEY_SIZE 32
#define REPLAY_WINDOW 4096
#define RING_WORDS 128 /* a power of two >= REPLAY_WINDOW / 64 + 1 */
#define COUNTER_LIMIT (UINT64_MAX - 8192u) /* seal.COUNTER_LIMIT: 2**64 - 2**13 - 1 */
#define MAX_SLOTS 1024
#define SENDER_SEALED 1
#define TX_BUFFER (UDP_MAX_PAYLOAD + MAX_GSO_SEGMENTS * SEAL_OVERHEAD + 64)

/* --- counters ------------------------------------------------------------------------------------------ */

enum counter {
    C_TX_PACKETS, C_TX_BYTES, C_TX_SUPERPACKETS, C_TX_CHUNKS,
    C_RX_PACKETS, C_RX_BYTES, C_RX_SUPERPACKETS, C_RX_CHUNKS,
    C_DROP_TUN_TOO_BIG, C_DROP_TUN_SEND_ERROR, C_DROP_UDP_TRUNCATED, C_DROP_UDP_BAD_LENGTH,
    C_DROP_UDP_TUN_WRITE_ERROR, C_TUN_READ_ERRORS, C_UDP_RECEIVE_ERRORS, C_NATIVE_TX, C_NATIVE_RX,
    C_TX_SEALED, C_RX_SEALED, C_DROP_UDP_AUTH, C_DROP_UDP_REPLAY, C_DROP_UDP_UNSEALED, C_DROP_UDP_SHORT, C_COUNT
};

static const char *const counter_names[C_COUNT] = {
    "tx_packets", "tx_bytes", "tx_superpackets", "tx_chunks",
    "rx_packets", "rx_bytes", "rx_superpackets", "rx_chunks",
    "drop_tun_too-big", "drop_tun_send-error", "drop_udp_truncated", "drop_udp_bad-length",
    "drop_udp_tun-write-error", "tun_read_errors", "udp_receive_errors", "native_tx_packets", "native_rx_packets",
    "tx_sealed", "rx_sealed", "drop_udp_auth", "drop_udp_replay", "drop_udp_unsealed", "drop_udp_short",
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
    uint16_t port, flags;  /* host order; SENDER_SEALED: we share keys, every frame is sealed */
} sender_t;

typedef struct {
    uint32_t ip;           /* the neighbour's sleeve address, network order */
    uint16_t port, dir;    /* host order; dir 0: we seal with it, 1: we open with it */
    uint32_t id;           /* the key id on the wire (SleeveKeys.send_id or recv_id) */
    uint8_t key[KEY_SIZE];
} key_entry_t;

typedef struct {
    uint32_t start, end;   /* address range [start, end) owned by short id `owner` (host order) */
    uint16_t owner, pad;
} owner_t;

typedef struct {
    uint32_t magic, own, n_segments, n_senders, n_owners, n_keys;
    uint8_t known[512];    /* bit s set: short id s is known unambiguously */
} table_head_t;

typedef struct {
    table_head_t head;
    const segment_t *segments;
    const sender_t *senders;
    const owner_t *owners;
    const key_entry_t *keys;
    size_t size;           /* of data */
    char data[];           /* the blob, copied */
} table_t;

static table_t *table_parse(const char *blob, Py_ssize_t size) {
    if ((size_t)size < sizeof(table_head_t)) return NULL;
    table_head_t head;
    memcpy(&head, blob, sizeof head);
    if (head.magic != TABLE_MAGIC || head.n_segments > 1u << 20 || head.n_senders > 1u << 16
        || head.n_owners > 1u << 20 || head.n_keys > MAX_SLOTS)
        return NULL;
    size_t want = sizeof head + head.n_segments * sizeof(segment_t) + head.n_senders * sizeof(sender_t)
                  + head.n_owners * sizeof(owner_t) + head.n_keys * sizeof(key_entry_t);
    if ((size_t)size != want) return NULL;
    table_t *t = malloc(sizeof(table_t) + want);
    if (t == NULL) return NULL;
    memcpy(t->data, blob, want);
    t->size = want;
    memcpy(&t->head, blob, sizeof head);
    t->segments = (const segment_t *)(t->data + sizeof head);
    t->senders = (const sender_t *)(t->data + sizeof head + head.n_segments * sizeof(segment_t));
    t->owners = (const owner_t *)((const char *)t->senders + head.n_senders * sizeof(sender_t));
    t->keys = (const key_entry_t *)((const char *)t->owners + head.n_owners * sizeof(owner_t));
    return t;
}

static void table_free(table_t *t) {
    if (t == NULL) return;
    OPENSSL_cleanse(t->data, t->size); /* the blob holds key material */
    free(t);
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

static const sender_t *table_sender(const table_t *t, uint32_t ip, uint16_t port) {
    for (uint32_t i = 0; i < t->head.n_senders; i++)
        if (t->senders[i].ip == ip && t->senders[i].port == port) return &t->senders[i];
    return NULL;
}

/* --- sealing (weaved.core.sleeveseal, the definition) --------------------------------------------------- */

/* Which library seals. Measured per 1,424-byte chunk (bench/aead_per_chunk.py, this machine class, loaded):
 * libgcrypt ~650-700 ns, OpenSSL 3.0 EVP ~750-1,000 ns (its bulk rate is as good; the difference is EVP's
 * per-message set-up: init with the nonce, AAD, final, tag through OSSL_PARAMs), GnuTLS ~900, nettle ~1,250,
 * libsodium 1.0.18 ~1,350-1,800. So libgcrypt when the build found it (setup.py: HAVE_GCRYPT) and the CPU
 * has AES-NI and PCLMULQDQ (its constant-time paths; without them EVP is no worse), EVP otherwise. Both are
 * standard AES-256-GCM, byte for byte what weaved.core.sleeveseal makes (tests check each one). */
enum { AEAD_OPENSSL, AEAD_GCRYPT, AEAD_COUNT };
static const char *const aead_names[AEAD_COUNT] = {"openssl", "libgcrypt"};
static int aead_usable[AEAD_COUNT] = {1, 0}; /* set by the module's init */

/* One key's state: the cipher context (keyed once), the send counter or the replay window. Slots outlive
 * tables: a table rebuilt with the same key keeps its slot, so no counter restarts and no window forgets.
 * The EVP context is always made (it marks the slot used and is the fallback); `gh`, a libgcrypt handle
 * keyed once, only when the pump seals with libgcrypt, and then it does all the work. */
typedef struct {
    EVP_CIPHER_CTX *ctx;   /* NULL: a free slot */
#ifdef HAVE_GCRYPT
    gcry_cipher_hd_t gh;   /* NULL: this slot uses ctx */
#endif
    int live;
    uint32_t ip;
    uint16_t port, dir;
    uint32_t id;
    uint8_t key[KEY_SIZE];
    uint64_t counter;      /* dir 0: the next counter to seal with */
    uint64_t highest;      /* dir 1: highest counter accepted (valid when `any`) */
    int any;
    uint64_t bits[RING_WORDS]; /* bit c % 64 of word (c / 64) % RING_WORDS: counter c accepted (slot_mark) */
} slot_t;

static void slot_free(slot_t *s) {
    EVP_CIPHER_CTX_free(s->ctx);
#ifdef HAVE_GCRYPT
    if (s->gh != NULL) gcry_cipher_close(s->gh);
#endif
    OPENSSL_cleanse(s, sizeof *s);
}

/* The replay window (seal.ReplayWindow: counters up to REPLAY_WINDOW - 1 behind the highest accepted, each
 * once) as a ring of bits indexed by the counter itself (RFC 6479), not by its distance from the highest:
 * accepting the next counter then sets one bit and clears at most the word it enters, where a bitmap shifted
 * on every new highest counter cost a pass over all REPLAY_WINDOW / 64 words per datagram (measured: about
 * as much as the memmove that closes the opened frames up). RING_WORDS is a power of two with room for
 * REPLAY_WINDOW + 64 counters, so every counter the window still accepts has its own bit. */
static inline uint64_t *ring_word(slot_t *s, uint64_t counter) { return &s->bits[(counter / 64) % RING_WORDS]; }

static int slot_fresh(const slot_t *s, uint64_t counter) {
    if (counter >= COUNTER_LIMIT) return 0;
    if (!s->any || counter > s->highest) return 1;
    if (s->highest - counter >= REPLAY_WINDOW) return 0;
    return !((s->bits[(counter / 64) % RING_WORDS] >> (counter % 64)) & 1);
}

static void slot_mark(slot_t *s, uint64_t counter) {
    if (!s->any || counter > s->highest) {
        uint64_t from = s->highest / 64, to = counter / 64;
        if (!s->any || to - from >= RING_WORDS) {
            memset(s->bits, 0, sizeof s->bits);
        } else {
            for (uint64_t w = from + 1; w <= to; w++) s->bits[w % RING_WORDS] = 0; /* words entered anew */
        }
        s->highest = counter;
        s->any = 1;
    }
    *ring_word(s, counter) |= 1ULL << (counter % 64);
}

static void put_be32(uint8_t *b, uint32_t v) {
    b[0] = (uint8_t)(v >> 24); b[1] = (uint8_t)(v >> 16); b[2] = (uint8_t)(v >> 8); b[3] = (uint8_t)v;
}

static void make_nonce(uint8_t nonce[12], uint64_t counter) { /* seal.nonce: 4 zero bytes, counter LE */
    memset(nonce, 0, 4);
    for (int i = 0; i < 8; i++) nonce[4 + i] = (uint8_t)(counter >> (8 * i));
}

/* A read position in a stream of iovecs. */
typedef struct {
    const struct iovec *iov;
    int cnt, i;
    size_t off;
} cursor_t;

static void cursor_copy(cursor_t *c, uint8_t *dst, size_t n) {
    while (n > 0 && c->i < c->cnt) {
        size_t avail = c->iov[c->i].iov_len - c->off, take = avail < n ? avail : n;
        memcpy(dst, (const uint8_t *)c->iov[c->i].iov_base + c->off, take);
        dst += take; n -= take; c->off += take;
        if (c->off == c->iov[c->i].iov_len) { c->i++; c->off = 0; }
    }
}

static int cursor_encrypt(cursor_t *c, EVP_CIPHER_CTX *ctx, uint8_t *dst, size_t n) {
    while (n > 0 && c->i < c->cnt) {
        size_t avail = c->iov[c->i].iov_len - c->off, take = avail < n ? avail : n;
        int len;
        if (!EVP_EncryptUpdate(ctx, dst, &len, (const uint8_t *)c->iov[c->i].iov_base + c->off, (int)take))
            return 0;
        dst += len; n -= take; c->off += take;
        if (c->off == c->iov[c->i].iov_len) { c->i++; c->off = 0; }
    }
    return n == 0;
}

/* Sealer.seal_batch: the plain frames in `iov` (`total` bytes, each `segment` bytes, the last may be shorter;
 * 0: one frame), each sealed on its own into `out` (room for total + frames * SEAL_OVERHEAD). Returns the
 * bytes written, or -1 when the key's counter would run out (nothing sealed then) or the cipher failed. */
static ssize_t seal_stream(slot_t *s, const struct iovec *iov, int iovcnt, size_t total, size_t segment,
                           uint8_t *out) {
    size_t step = segment && segment < total ? segment : total, frames = step ? (total + step - 1) / step : 0;
    if (frames == 0 || s->counter >= COUNTER_LIMIT - frames) return -1;
    cursor_t c = {iov, iovcnt, 0, 0};
    uint8_t *at = out;
    for (size_t done = 0; done < total; done += step) {
        size_t len = total - done < step ? total - done : step;
        if (len < HEADER_SIZE) return -1;
        uint8_t head[HEADER_SIZE], nonce[12];
        cursor_copy(&c, head, HEADER_SIZE);
        uint64_t counter = s->counter++;
        memcpy(at, head, HEADER_SIZE);
        at[2] = (uint8_t)(head[2] + 2);
        put_be32(at + 8, s->id);
        put_be32(at + 12, (uint32_t)(counter >> 32));
        put_be32(at + 16, (uint32_t)counter);
        make_nonce(nonce, counter);
        int l;
        size_t body = len - HEADER_SIZE;
#ifdef HAVE_GCRYPT
        if (s->gh != NULL) { /* gather the body, then seal it in place: one call, no EVP set-up */
            cursor_copy(&c, at + CLEAR_SIZE, body);
            if (gcry_cipher_setiv(s->gh, nonce, sizeof nonce) || gcry_cipher_authenticate(s->gh, at, CLEAR_SIZE)
                || gcry_cipher_final(s->gh) || gcry_cipher_encrypt(s->gh, at + CLEAR_SIZE, body, NULL, 0)
                || gcry_cipher_gettag(s->gh, at + CLEAR_SIZE + body, TAG_SIZE))
                return -1;
            at += CLEAR_SIZE + body + TAG_SIZE;
            continue;
        }
#endif
        if (!EVP_EncryptInit_ex(s->ctx, NULL, NULL, NULL, nonce) || !EVP_EncryptUpdate(s->ctx, NULL, &l, at, CLEAR_SIZE)
            || !cursor_encrypt(&c, s->ctx, at + CLEAR_SIZE, body)
            || !EVP_EncryptFinal_ex(s->ctx, at + CLEAR_SIZE + body, &l)
            || !EVP_CIPHER_CTX_ctrl(s->ctx, EVP_CTRL_AEAD_GET_TAG, TAG_SIZE, at + CLEAR_SIZE + body))
            return -1;
        at += CLEAR_SIZE + body + TAG_SIZE;
    }
    return at - out;
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
    pthread_t loop_thread;       /* valid while running */
    slot_t *slots;               /* MAX_SLOTS, owned by the loop thread (see Pump_seal) */
    slot_t *live[MAX_SLOTS];     /* the keyed slots, so a lookup walks a few, not all MAX_SLOTS */
    int n_live;
    int aead;                    /* AEAD_*: the library new slots seal with */
    uint8_t tx[TX_BUFFER];       /* sealed datagrams of one GSO send */
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

static slot_t *send_slot(Pump *p, uint32_t ip, uint16_t port) {
    for (int i = 0; i < p->n_live; i++) {
        slot_t *s = p->live[i];
        if (s->dir == 0 && s->ip == ip && s->port == port) return s;
    }
    return NULL;
}

static slot_t *receive_slot(Pump *p, uint32_t id) {
    for (int i = 0; i < p->n_live; i++) {
        slot_t *s = p->live[i];
        if (s->dir == 1 && s->id == id) return s;
    }
    return NULL;
}

/* Sealer.update: keep the slots of keys the table still has, key new ones once, free the rest. */
static void slots_reconcile(Pump *p, const table_t *t) {
    for (int i = 0; i < MAX_SLOTS; i++) p->slots[i].live = 0;
    for (uint32_t k = 0; k < t->head.n_keys; k++) {
        const key_entry_t *e = &t->keys[k];
        slot_t *free_slot = NULL, *found = NULL;
        for (int i = 0; i < MAX_SLOTS && found == NULL; i++) {
            slot_t *s = &p->slots[i];
            if (s->ctx == NULL) {
                if (free_slot == NULL) free_slot = s;
            } else if (s->ip == e->ip && s->port == e->port && s->dir == e->dir && s->id == e->id
                       && CRYPTO_memcmp(s->key, e->key, KEY_SIZE) == 0) {
                found = s;
            }
        }
        if (found == NULL && free_slot != NULL) {
            EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
            if (ctx == NULL || !EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, e->key, NULL, e->dir == 0)) {
                EVP_CIPHER_CTX_free(ctx);
                continue; /* that key cannot be used: its frames go to Python, which drops them (auth) */
            }
            found = free_slot;
            memset(found, 0, sizeof *found);
            found->ctx = ctx;
#ifdef HAVE_GCRYPT
            gcry_cipher_hd_t gh = NULL;
            if (p->aead == AEAD_GCRYPT
                && (gcry_cipher_open(&gh, GCRY_CIPHER_AES256, GCRY_CIPHER_MODE_GCM, 0)
                    || gcry_cipher_setkey(gh, e->key, KEY_SIZE))) {
                if (gh != NULL) gcry_cipher_close(gh);
                gh = NULL; /* this key seals with EVP */
            }
            found->gh = gh;
#endif
            found->ip = e->ip; found->port = e->port; found->dir = e->dir; found->id = e->id;
            memcpy(found->key, e->key, KEY_SIZE);
        }
        if (found != NULL) found->live = 1;
    }
    p->n_live = 0;
    for (int i = 0; i < MAX_SLOTS; i++) {
        if (p->slots[i].ctx == NULL) continue;
        if (p->slots[i].live) p->live[p->n_live++] = &p->slots[i];
        else slot_free(&p->slots[i]);
    }
}

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

/* send_datagrams of the plain frames in `iov` (each `segment` bytes; 0: one frame), sealed with `s`. */
static void send_sealed(Pump *p, int sock, const segment_t *route, slot_t *s, struct iovec *iov, int iovcnt,
                        size_t segment) {
    size_t total = 0;
    for (int i = 0; i < iovcnt; i++) total += iov[i].iov_len;
    ssize_t sealed = seal_stream(s, iov, iovcnt, total, segment, p->tx);
    if (sealed < 0) {
        count(p, C_DROP_TUN_SEND_ERROR, 1);
        return;
    }
    struct iovec out = {p->tx, (size_t)sealed};
    size_t frames = segment && segment < total ? (total + segment - 1) / segment : 1;
    send_datagrams(p, sock, route, &out, 1, frames > 1 ? (int)(segment + SEAL_OVERHEAD) : 0);
    count(p, C_TX_SEALED, frames);
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
    slot_t *seal = send_slot(p, route->ip, route->port);
    if (seal != NULL) {
        if (limit <= SEAL_OVERHEAD || seal->counter >= COUNTER_LIMIT - 2 * MAX_CHUNKS) return 0;
        limit -= SEAL_OVERHEAD;
    }
    if (gso_type == GSO_NONE) {
        if (CHUNK_HEADER_SIZE + n > limit) return 0;
        uint64_t frame = ++p->frame | NATIVE_FRAME_BIT;
        put_chunk_header(p->prefixes, own, route->dst, chunk_word(frame, 0, 1));
        struct iovec iov[2] = {{p->prefixes, CHUNK_HEADER_SIZE}, {buf, n}};
        if (seal != NULL) send_sealed(p, sock, route, seal, iov, 2, 0);
        else send_datagrams(p, sock, route, iov, 2, 0);
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
    size_t per_send = UDP_MAX_PAYLOAD / (size + (seal != NULL ? SEAL_OVERHEAD : 0));
    if (per_send > MAX_GSO_SEGMENTS) per_send = MAX_GSO_SEGMENTS;
    if (per_send < 1) per_send = 1;
    for (size_t start = 0; start < chunks; start += per_send) {
        size_t these = chunks - start < per_send ? chunks - start : per_send;
        if (seal != NULL) send_sealed(p, sock, route, seal, iov + 2 * start, (int)(2 * these), size);
        else send_datagrams(p, sock, route, iov + 2 * start, (int)(2 * these), (int)size);
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

/* OffloadLoop._open_batch: open every datagram of a batch (`segment` bytes apart, 0: one) from the
 * neighbour at ip:port we share keys with, in place, the plain frames closed up from the start of rx. Returns
 * their bytes and sets *segment to their stride; a datagram that does not open is counted and left out. */
static size_t open_batch(Pump *p, uint8_t *rx, size_t n, size_t *segment, uint32_t ip, uint16_t port) {
    size_t step = *segment && *segment < n ? *segment : n, out = 0;
    slot_t *last = NULL;
    for (size_t at = 0; at < n; at += step) {
        size_t len = n - at < step ? n - at : step;
        uint8_t *d = rx + at;
        if (len < 3 || (d[2] != SEALED_V1 && d[2] != SEALED_V2)) { count(p, C_DROP_UDP_UNSEALED, 1); continue; }
        if (len < CLEAR_SIZE + TAG_SIZE) { count(p, C_DROP_UDP_SHORT, 1); continue; }
        uint32_t id = be32(d + 8);
        slot_t *s = be16(d) != MAGIC ? NULL : last != NULL && last->id == id ? last : (last = receive_slot(p, id));
        if (s == NULL || s->ip != ip || s->port != port) { count(p, C_DROP_UDP_AUTH, 1); continue; }
        uint64_t counter = be64(d + 12);
        if (!slot_fresh(s, counter)) { count(p, C_DROP_UDP_REPLAY, 1); continue; }
        uint8_t nonce[12], tag[TAG_SIZE], head[HEADER_SIZE];
        size_t body = len - CLEAR_SIZE - TAG_SIZE;
        make_nonce(nonce, counter);
        memcpy(tag, d + CLEAR_SIZE + body, TAG_SIZE);
        int l, failed = -1;
#ifdef HAVE_GCRYPT
        if (s->gh != NULL) /* checktag compares in constant time */
            failed = gcry_cipher_setiv(s->gh, nonce, sizeof nonce) || gcry_cipher_authenticate(s->gh, d, CLEAR_SIZE)
                     || gcry_cipher_final(s->gh) || gcry_cipher_decrypt(s->gh, d + CLEAR_SIZE, body, NULL, 0)
                     || gcry_cipher_checktag(s->gh, tag, TAG_SIZE);
#endif
        if (failed < 0)
            failed = !EVP_DecryptInit_ex(s->ctx, NULL, NULL, NULL, nonce)
                     || !EVP_DecryptUpdate(s->ctx, NULL, &l, d, CLEAR_SIZE)
                     || !EVP_DecryptUpdate(s->ctx, d + CLEAR_SIZE, &l, d + CLEAR_SIZE, (int)body)
                     || !EVP_CIPHER_CTX_ctrl(s->ctx, EVP_CTRL_AEAD_SET_TAG, TAG_SIZE, tag)
                     || EVP_DecryptFinal_ex(s->ctx, d + CLEAR_SIZE + body, &l) <= 0;
        if (failed) {
            count(p, C_DROP_UDP_AUTH, 1);
            continue;
        }
        slot_mark(s, counter); /* only now: a forged counter must not move the window */
        memcpy(head, d, HEADER_SIZE);
        head[2] = (uint8_t)(head[2] - 2);
        memmove(rx + out + HEADER_SIZE, d + CLEAR_SIZE, body);
        memcpy(rx + out, head, HEADER_SIZE);
        out += HEADER_SIZE + body;
        count(p, C_RX_SEALED, 1);
    }
    size_t opened = step > SEAL_OVERHEAD ? step - SEAL_OVERHEAD : 0;
    *segment = out > opened ? opened : out;
    return out;
}

/* UDP -> TUN for the *np bytes (GRO segment size *segp, 0: none) from `from`. 1 when handled. A batch from a
 * neighbour we share keys with is opened first (*opened = 1, *np and *segp then describe the plain frames),
 * also when the rest is left to Python. */
static int inbound_fast(Pump *p, int tun, size_t *np, size_t *segp, const struct sockaddr_in *from, int *opened) {
    const table_t *t = p->current;
    uint8_t *rx = p->rx.buf;
    size_t n = *np, segment = *segp;
    if (t == NULL || from->sin_family != AF_INET) return 0;
    uint32_t ip = from->sin_addr.s_addr;
    uint16_t port = ntohs(from->sin_port);
    const sender_t *sender = table_sender(t, ip, port);
    if (sender == NULL) return 0;
    if (sender->flags & SENDER_SEALED) {
        if (n < HEADER_SIZE) return 0;
        n = *np = open_batch(p, rx, n, &segment, ip, port);
        *segp = segment;
        *opened = 1;
        if (n == 0) return 1;
    }
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
        slots_reconcile(p, fresh);
        table_free(p->current);
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
    p->loop_thread = pthread_self();
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
            size_t length = (size_t)n;
            int opened = 0;
            if (inbound_fast(p, tun, &length, &segment, &from, &opened)) continue;
            PyEval_RestoreThread(state);
            PyObject *source = source_tuple(&from);
            PyObject *r = source ? PyObject_CallFunction(inbound, "nnOO", (Py_ssize_t)length, (Py_ssize_t)segment,
                                                         source, opened ? Py_True : Py_False)
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
    table_free(p->pending);
    p->pending = fresh;
    __atomic_store_n(&p->table_pending, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->lock);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(counters_doc, "counters() -> dict\n--\n\nThe pump's own counts (only those above zero).");

PyDoc_STRVAR(seal_doc,
"seal(address, data, segment) -> bytes | None\n--\n\n"
"Sealer.seal_batch with the pump's own keys and counters (the Python path's sends, tests): the plain frames\n"
"in ``data`` (``segment`` bytes each, 0: one) sealed for the neighbour at ``address`` ((ip, port)), or None\n"
"when we share no keys with it. Only from the loop thread (its callbacks) or while the pump is not running.");

static PyObject *Pump_seal(Pump *p, PyObject *args) {
    const char *host;
    int port;
    Py_buffer data;
    Py_ssize_t segment;
    if (!PyArg_ParseTuple(args, "(si)y*n", &host, &port, &data, &segment)) return NULL;
    if (p->running && !pthread_equal(pthread_self(), p->loop_thread)) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_RuntimeError, "seal() from another thread than the running loop's");
        return NULL;
    }
    take_pending_table(p);
    struct in_addr address;
    slot_t *s = inet_pton(AF_INET, host, &address) == 1 && port > 0 && port < 65536
                    ? send_slot(p, address.s_addr, (uint16_t)port) : NULL;
    size_t total = (size_t)data.len, step = segment > 0 && (size_t)segment < total ? (size_t)segment : total;
    if (s == NULL || total == 0) {
        PyBuffer_Release(&data);
        Py_RETURN_NONE;
    }
    size_t frames = (total + step - 1) / step;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(total + frames * SEAL_OVERHEAD));
    if (out == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    struct iovec iov = {data.buf, total};
    ssize_t sealed = seal_stream(s, &iov, 1, total, step, (uint8_t *)PyBytes_AS_STRING(out));
    PyBuffer_Release(&data);
    if (sealed < 0) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    return out;
}

PyDoc_STRVAR(open_doc,
"open(address, data, segment) -> bytes\n--\n\n"
"Open a batch of sealed datagrams (``segment`` bytes apart, 0: one) from the neighbour at ``address`` the way\n"
"the loop opens what it receives (replay window, drop counters): the plain frames that opened, laid end to\n"
"end. For tests (every AEAD the pump can use, byte for byte against Python); same thread rule as seal().");

static PyObject *Pump_open(Pump *p, PyObject *args) {
    const char *host;
    int port;
    Py_buffer data;
    Py_ssize_t segment;
    if (!PyArg_ParseTuple(args, "(si)y*n", &host, &port, &data, &segment)) return NULL;
    struct in_addr address;
    if ((p->running && !pthread_equal(pthread_self(), p->loop_thread)) || segment < 0
        || inet_pton(AF_INET, host, &address) != 1 || port <= 0 || port > 65535) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "open() needs an IPv4 address, a segment >= 0 and the loop's thread");
        return NULL;
    }
    take_pending_table(p);
    PyObject *out = PyBytes_FromStringAndSize(data.buf, data.len); /* opened in place in this new copy */
    PyBuffer_Release(&data);
    if (out == NULL) return NULL;
    size_t seg = (size_t)segment;
    size_t n = open_batch(p, (uint8_t *)PyBytes_AS_STRING(out), (size_t)PyBytes_GET_SIZE(out), &seg,
                          address.s_addr, (uint16_t)port);
    if (_PyBytes_Resize(&out, (Py_ssize_t)n) < 0) return NULL;
    return out;
}

PyDoc_STRVAR(aead_doc, "aead() -> str\n--\n\nThe library this pump seals with: 'libgcrypt' or 'openssl'.");

static PyObject *Pump_aead(Pump *p, PyObject *Py_UNUSED(ignored)) { return PyUnicode_FromString(aead_names[p->aead]); }

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
    static char *keywords[] = {"read_buffer", "receive_buffer", "aead", NULL};
    PyObject *read, *rx;
    const char *aead = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|z", keywords, &read, &rx, &aead)) return -1;
    if (p->read.obj != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a pump is initialised once");
        return -1;
    }
    p->aead = AEAD_COUNT;
    for (int a = AEAD_COUNT; a-- > 0;) /* None: the fastest usable (the last of aead_names) */
        if (aead_usable[a] && (aead == NULL ? p->aead == AEAD_COUNT : strcmp(aead, aead_names[a]) == 0)) p->aead = a;
    if (p->aead == AEAD_COUNT) {
        PyErr_Format(PyExc_ValueError, "aead %s is not in this build or not usable on this CPU (see AEADS)", aead);
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
    if (p == NULL) return NULL;
    pthread_mutex_init(&p->lock, NULL);
    p->slots = calloc(MAX_SLOTS, sizeof(slot_t));
    if (p->slots == NULL) {
        Py_DECREF(p);
        return PyErr_NoMemory();
    }
    return (PyObject *)p;
}

static void Pump_dealloc(Pump *p) {
    if (p->read.obj != NULL) PyBuffer_Release(&p->read);
    if (p->rx.obj != NULL) PyBuffer_Release(&p->rx);
    table_free(p->pending);
    table_free(p->current);
    if (p->slots != NULL) {
        for (int i = 0; i < MAX_SLOTS; i++)
            if (p->slots[i].ctx != NULL) slot_free(&p->slots[i]);
        free(p->slots);
    }
    pthread_mutex_destroy(&p->lock);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyMethodDef Pump_methods[] = {
    {"run", (PyCFunction)Pump_run, METH_VARARGS, run_doc},
    {"interrupt", (PyCFunction)Pump_interrupt, METH_NOARGS, interrupt_doc},
    {"set_table", (PyCFunction)Pump_set_table, METH_O, set_table_doc},
    {"counters", (PyCFunction)Pump_counters, METH_NOARGS, counters_doc},
    {"seal", (PyCFunction)Pump_seal, METH_VARARGS, seal_doc},
    {"open", (PyCFunction)Pump_open, METH_VARARGS, open_doc},
    {"aead", (PyCFunction)Pump_aead, METH_NOARGS, aead_doc},
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

/* libgcrypt is used where the CPU has AES-NI and PCLMULQDQ and the library initialises; a library inside a
 * process that may hold other users of libgcrypt initialises it only when nobody has (libgcrypt's manual). */
static void choose_aeads(void) {
#if defined(HAVE_GCRYPT) && defined(__x86_64__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("aes") || !__builtin_cpu_supports("pclmul")) return;
    if (gcry_check_version(GCRYPT_VERSION) == NULL) return;
    if (!gcry_control(GCRYCTL_INITIALIZATION_FINISHED_P)) {
        gcry_control(GCRYCTL_DISABLE_SECMEM, 0); /* keys live in our slots, not in libgcrypt's secure heap */
        gcry_control(GCRYCTL_INITIALIZATION_FINISHED, 0);
    }
    aead_usable[AEAD_GCRYPT] = 1;
#endif
}

PyMODINIT_FUNC PyInit__sleevepump(void) {
    if (PyType_Ready(&PumpType) < 0) return NULL;
    choose_aeads();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_ssize_t usable = 0;
    for (int a = 0; a < AEAD_COUNT; a++) usable += aead_usable[a];
    PyObject *aeads = PyTuple_New(usable); /* fastest first */
    for (int a = 0; aeads != NULL && a < AEAD_COUNT; a++) { /* aead_names: slowest first */
        if (!aead_usable[a]) continue;
        PyObject *name = PyUnicode_FromString(aead_names[a]);
        if (name == NULL) {
            Py_CLEAR(aeads);
            break;
        }
        PyTuple_SET_ITEM(aeads, --usable, name);
    }
    if (aeads == NULL || PyModule_AddObject(m, "AEADS", aeads) < 0) {
        Py_XDECREF(aeads);
        Py_DECREF(m);
        return NULL;
    }
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
