/*
 * aead_per_chunk: nanoseconds per sealed sleeve chunk (AES-256-GCM, 12-byte nonce = 4 zero bytes + 64-bit LE
 * counter, 20 bytes of AAD, a 1,424-byte body, 16-byte tag) through each well-kept library this machine has.
 *
 * Why: the encrypted sleeve seals every GSO chunk on its own (weaved/core/sleeveseal.py), so what counts is
 * the cost of one small message -- set the nonce, hash the AAD, encrypt, make the tag -- not the bulk rate
 * `openssl speed` reports. The "bulk" rows seal one 64 KiB message and give its cost per 1,424 bytes, so the
 * per-call overhead of each library is the difference. Every library's output is checked byte for byte
 * against OpenSSL's before it is timed, and every open must verify (a flipped tag bit must not).
 *
 * Built and run by bench/aead_per_chunk.py (it compiles with whatever of libsodium, GnuTLS, libgcrypt and
 * nettle has headers: -DHAVE_SODIUM etc.). A benchmark, not a test: it asserts only equality of bytes.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#ifdef HAVE_SODIUM
#include <sodium.h>
#endif
#ifdef HAVE_GNUTLS
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#endif
#ifdef HAVE_GCRYPT
#include <gcrypt.h>
#endif
#ifdef HAVE_NETTLE
#include <nettle/gcm.h>
#endif

#define BODY 1424
#define BULK 65536
#define AAD 20
#define TAG 16

static uint8_t key[32], aad[AAD], plain[BULK], sealed[BULK + TAG], opened[BULK], ref[BODY + TAG];

static void make_nonce(uint8_t nonce[12], uint64_t counter) {
    memset(nonce, 0, 4);
    for (int i = 0; i < 8; i++) nonce[4 + i] = (uint8_t)(counter >> (8 * i));
}

static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One library: seal `len` bytes of `in` with `counter` into out (ciphertext) + tag, and open back. */
typedef struct {
    const char *name;
    int (*setup)(void);
    int (*seal)(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, uint8_t *tag);
    int (*open)(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, const uint8_t *tag);
} impl_t;

/* (a) EVP, today's sequence in _sleevepump.c. */
static EVP_CIPHER_CTX *ectx, *dctx;

static int evp_setup(void) {
    ectx = EVP_CIPHER_CTX_new();
    dctx = EVP_CIPHER_CTX_new();
    return EVP_EncryptInit_ex(ectx, EVP_aes_256_gcm(), NULL, key, NULL)
           && EVP_DecryptInit_ex(dctx, EVP_aes_256_gcm(), NULL, key, NULL);
}

static int evp_seal(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, uint8_t *tag) {
    uint8_t nonce[12];
    int l;
    make_nonce(nonce, counter);
    return EVP_EncryptInit_ex(ectx, NULL, NULL, NULL, nonce) && EVP_EncryptUpdate(ectx, NULL, &l, aad, AAD)
           && EVP_EncryptUpdate(ectx, out, &l, in, (int)len) && EVP_EncryptFinal_ex(ectx, out + len, &l)
           && EVP_CIPHER_CTX_ctrl(ectx, EVP_CTRL_AEAD_GET_TAG, TAG, tag);
}

static int evp_open(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, const uint8_t *tag) {
    uint8_t nonce[12];
    int l;
    make_nonce(nonce, counter);
    return EVP_DecryptInit_ex(dctx, NULL, NULL, NULL, nonce) && EVP_DecryptUpdate(dctx, NULL, &l, aad, AAD)
           && EVP_DecryptUpdate(dctx, out, &l, in, (int)len)
           && EVP_CIPHER_CTX_ctrl(dctx, EVP_CTRL_AEAD_SET_TAG, TAG, (void *)tag)
           && EVP_DecryptFinal_ex(dctx, out + len, &l) > 0;
}

/* (b) EVP, the leanest sequence found: EVP_CipherInit_ex with the nonce only, EVP_Cipher() (the provider's
 * cipher function without EVP_*Update's checks) for AAD, body and final, the tag through prebuilt params. */
static int lean_seal(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, uint8_t *tag) {
    uint8_t nonce[12];
    make_nonce(nonce, counter);
    OSSL_PARAM params[2] = {OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, TAG),
                            OSSL_PARAM_construct_end()};
    return EVP_CipherInit_ex(ectx, NULL, NULL, NULL, nonce, -1) && EVP_Cipher(ectx, NULL, aad, AAD) >= 0
           && EVP_Cipher(ectx, out, in, (unsigned)len) >= 0 && EVP_Cipher(ectx, NULL, NULL, 0) >= 0
           && EVP_CIPHER_CTX_get_params(ectx, params);
}

static int lean_open(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, const uint8_t *tag) {
    uint8_t nonce[12];
    make_nonce(nonce, counter);
    OSSL_PARAM params[2] = {OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, (void *)tag, TAG),
                            OSSL_PARAM_construct_end()};
    return EVP_CipherInit_ex(dctx, NULL, NULL, NULL, nonce, -1) && EVP_Cipher(dctx, NULL, aad, AAD) >= 0
           && EVP_Cipher(dctx, out, in, (unsigned)len) >= 0 && EVP_CIPHER_CTX_set_params(dctx, params)
           && EVP_Cipher(dctx, NULL, NULL, 0) >= 0;
}

#ifdef HAVE_SODIUM
/* (c) libsodium: crypto_aead_aes256gcm with the key schedule and GHASH powers computed once (beforenm). */
static crypto_aead_aes256gcm_state sodium_state;

static int sodium_setup(void) {
    if (sodium_init() < 0 || !crypto_aead_aes256gcm_is_available()) return 0;
    return crypto_aead_aes256gcm_beforenm(&sodium_state, key) == 0;
}

static int sodium_seal(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, uint8_t *tag) {
    uint8_t nonce[12];
    make_nonce(nonce, counter);
    return crypto_aead_aes256gcm_encrypt_detached_afternm(out, tag, NULL, in, len, aad, AAD, NULL, nonce,
                                                          &sodium_state) == 0;
}

static int sodium_open(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, const uint8_t *tag) {
    uint8_t nonce[12];
    make_nonce(nonce, counter);
    return crypto_aead_aes256gcm_decrypt_detached_afternm(out, NULL, in, len, tag, aad, AAD, nonce,
                                                          &sodium_state) == 0;
}
#endif

#ifdef HAVE_GNUTLS
/* (d1) GnuTLS's AEAD API (its own AES-NI/PCLMUL GCM); encryptv2 works in place on iovecs, which would let the
 * sleeve seal a chunk where it lies, so it is timed that way: copy in, seal in place. */
static gnutls_aead_cipher_hd_t gnutls_handle;

static int gnutls_setup(void) {
    gnutls_datum_t k = {key, sizeof key};
    return gnutls_aead_cipher_init(&gnutls_handle, GNUTLS_CIPHER_AES_256_GCM, &k) == 0;
}

static int gnutls_seal(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, uint8_t *tag) {
    uint8_t nonce[12];
    make_nonce(nonce, counter);
    memcpy(out, in, len);
    giovec_t a = {aad, AAD}, d = {out, len};
    size_t tag_size = TAG;
    return gnutls_aead_cipher_encryptv2(gnutls_handle, nonce, 12, &a, 1, &d, 1, tag, &tag_size) == 0;
}

static int gnutls_open(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, const uint8_t *tag) {
    uint8_t nonce[12];
    make_nonce(nonce, counter);
    memcpy(out, in, len);
    giovec_t a = {aad, AAD}, d = {out, len};
    return gnutls_aead_cipher_decryptv2(gnutls_handle, nonce, 12, &a, 1, &d, 1, (void *)tag, TAG) == 0;
}
#endif

#ifdef HAVE_GCRYPT
/* (d2) libgcrypt: one cipher handle, setiv / authenticate / encrypt / gettag per message. */
static gcry_cipher_hd_t gcry_handle;

static int gcry_setup(void) {
    if (!gcry_check_version(NULL)) return 0;
    gcry_control(GCRYCTL_INITIALIZATION_FINISHED, 0);
    return gcry_cipher_open(&gcry_handle, GCRY_CIPHER_AES256, GCRY_CIPHER_MODE_GCM, 0) == 0
           && gcry_cipher_setkey(gcry_handle, key, sizeof key) == 0;
}

static int gcry_seal(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, uint8_t *tag) {
    uint8_t nonce[12];
    make_nonce(nonce, counter);
    return gcry_cipher_setiv(gcry_handle, nonce, 12) == 0 && gcry_cipher_authenticate(gcry_handle, aad, AAD) == 0
           && gcry_cipher_final(gcry_handle) == 0 && gcry_cipher_encrypt(gcry_handle, out, len, in, len) == 0
           && gcry_cipher_gettag(gcry_handle, tag, TAG) == 0;
}

static int gcry_open(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, const uint8_t *tag) {
    uint8_t nonce[12];
    make_nonce(nonce, counter);
    return gcry_cipher_setiv(gcry_handle, nonce, 12) == 0 && gcry_cipher_authenticate(gcry_handle, aad, AAD) == 0
           && gcry_cipher_final(gcry_handle) == 0 && gcry_cipher_decrypt(gcry_handle, out, len, in, len) == 0
           && gcry_cipher_checktag(gcry_handle, tag, TAG) == 0;
}
#endif

#ifdef HAVE_NETTLE
/* (d3) nettle: gcm_aes256 (set_iv / update / encrypt / digest). */
static struct gcm_aes256_ctx nettle_ctx;

static int nettle_setup(void) {
    gcm_aes256_set_key(&nettle_ctx, key);
    return 1;
}

static int nettle_seal(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, uint8_t *tag) {
    uint8_t nonce[12];
    make_nonce(nonce, counter);
    gcm_aes256_set_iv(&nettle_ctx, 12, nonce);
    gcm_aes256_update(&nettle_ctx, AAD, aad);
    gcm_aes256_encrypt(&nettle_ctx, len, out, in);
    gcm_aes256_digest(&nettle_ctx, TAG, tag);
    return 1;
}

static int nettle_open(uint64_t counter, const uint8_t *in, size_t len, uint8_t *out, const uint8_t *tag) {
    uint8_t nonce[12], want[TAG];
    make_nonce(nonce, counter);
    gcm_aes256_set_iv(&nettle_ctx, 12, nonce);
    gcm_aes256_update(&nettle_ctx, AAD, aad);
    gcm_aes256_decrypt(&nettle_ctx, len, out, in);
    gcm_aes256_digest(&nettle_ctx, TAG, want);
    return memcmp(want, tag, TAG) == 0; /* a benchmark: the real code would compare in constant time */
}
#endif

static const impl_t impls[] = {
    {"openssl EVP, today's sequence", evp_setup, evp_seal, evp_open},
    {"openssl EVP, EVP_Cipher lean", evp_setup, lean_seal, lean_open},
#ifdef HAVE_SODIUM
    {"libsodium aes256gcm afternm", sodium_setup, sodium_seal, sodium_open},
#endif
#ifdef HAVE_GNUTLS
    {"gnutls aead v2 (copy + in place)", gnutls_setup, gnutls_seal, gnutls_open},
#endif
#ifdef HAVE_GCRYPT
    {"libgcrypt gcm", gcry_setup, gcry_seal, gcry_open},
#endif
#ifdef HAVE_NETTLE
    {"nettle gcm_aes256", nettle_setup, nettle_seal, nettle_open},
#endif
};

/* Best of `reps` runs of `n` calls: ns per call. */
static double timed(int (*fn)(uint64_t, const uint8_t *, size_t, uint8_t *, uint8_t *), int open, size_t len,
                    long n, int reps, const impl_t *impl) {
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double start = seconds();
        for (long i = 0; i < n; i++) {
            int ok = open ? impl->open(7, sealed, len, opened, sealed + len)
                          : fn((uint64_t)i, plain, len, sealed, sealed + len);
            if (!ok) {
                fprintf(stderr, "%s: %s failed\n", impl->name, open ? "open" : "seal");
                exit(1);
            }
        }
        double ns = (seconds() - start) * 1e9 / (double)n;
        if (ns < best) best = ns;
    }
    return best;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 200000;
    int reps = argc > 2 ? atoi(argv[2]) : 5;
    for (size_t i = 0; i < sizeof key; i++) key[i] = (uint8_t)(i * 7 + 1);
    for (size_t i = 0; i < sizeof aad; i++) aad[i] = (uint8_t)(0xA0 + i);
    for (size_t i = 0; i < sizeof plain; i++) plain[i] = (uint8_t)(i * 31 + 3);
    if (!evp_setup() || !evp_seal(7, plain, BODY, ref, ref + BODY)) return 1;
    printf("%-34s %9s %9s %11s %11s\n", "AES-256-GCM, 1,424 B + 20 B AAD", "seal ns", "open ns", "bulk ns/1424",
           "seal GB/s");
    for (size_t k = 0; k < sizeof impls / sizeof impls[0]; k++) {
        const impl_t *impl = &impls[k];
        if (!impl->setup()) {
            printf("%-34s unavailable (setup failed: CPU or library)\n", impl->name);
            continue;
        }
        /* Byte identity with OpenSSL, a verifying open, and a refused forged tag. */
        if (!impl->seal(7, plain, BODY, sealed, sealed + BODY) || memcmp(sealed, ref, BODY + TAG) != 0
            || !impl->open(7, sealed, BODY, opened, sealed + BODY) || memcmp(opened, plain, BODY) != 0) {
            printf("%-34s DIFFERS from OpenSSL or does not open\n", impl->name);
            return 1;
        }
        sealed[BODY] ^= 1;
        int forged = impl->open(7, sealed, BODY, opened, sealed + BODY);
        sealed[BODY] ^= 1;
        if (forged) {
            printf("%-34s accepted a forged tag\n", impl->name);
            return 1;
        }
        double seal = timed(impl->seal, 0, BODY, n, reps, impl);
        impl->seal(7, plain, BODY, sealed, sealed + BODY);
        double open = timed(NULL, 1, BODY, n, reps, impl);
        double bulk = timed(impl->seal, 0, BULK, n / 40 + 1, reps, impl) * BODY / BULK;
        printf("%-34s %9.0f %9.0f %11.0f %11.2f\n", impl->name, seal, open, bulk, BODY / seal);
    }
    return 0;
}
