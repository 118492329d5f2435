/* The copy + checksum kernels, compiled once per instruction set.
 *
 * Included by kernels_generic.c (the compiler's baseline: SSE2 on x86-64, plain C elsewhere)
 * and kernels_avx2.c (x86-64 with `#pragma GCC target("avx2")`, chosen at run time by
 * copyhash.c). KERNEL(name) gives each copy its own symbol names; xxhash.h is included
 * with XXH_INLINE_ALL, so every XXH3 function is static to the translation unit and picks
 * its vector width from the target of that unit.
 *
 * With AVX2 both copies below run the fused kernel (copy_hash_fused: one load per stripe,
 * stored and hashed from the same registers) for inputs over 240 bytes; the chunked
 * versions are the SSE2 / other-ISA path and the small-input path.
 *
 * Two copies, one pass over DRAM each (see copyhash.c for why each is shaped this way):
 *
 *   copy_hash_source   hash each chunk of the source while it is in L1, then stream the
 *                      same chunk to the destination (non-temporal stores: the destination
 *                      is not read back, so no read-for-ownership of its lines). The checksum
 *                      is of the bytes read; if the source changed under the copy, the
 *                      destination may differ from it, which its reader's verification
 *                      catches. For writers (put, save): the reader always verifies.
 *   copy_hash_exact    load each 64 bytes once into registers and store them twice: into a
 *                      private L1 bounce buffer and (streaming) into the destination; then
 *                      hash the bounce buffer. The checksum is exactly of the bytes the
 *                      destination received, whatever happens to the source meanwhile. For
 *                      readers (get, load, peer fetch landing).
 */
#ifndef KERNEL
#error "define KERNEL(name) before including kernels.h"
#endif

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#define XXH_STATIC_LINKING_ONLY
#include "xxhash.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SHOAL_HAVE_STREAM 1
#else
#define SHOAL_HAVE_STREAM 0
#endif

/* The unit of work: small enough that a chunk stays in L1 between its two uses; and how
 * many chunks ahead the source is prefetched, so DRAM reads stay in flight while a chunk
 * is hashed and written (measured on the standard machine: distance 2 of 4 KiB chunks
 * beat 1-8 KiB chunks at distances 1-8, and no prefetch by ~10 points). */
#define SHOAL_CHUNK 4096
#define SHOAL_PREFETCH_CHUNKS 2

/* dst[0:n] = src[0:n] with stores that bypass the cache where the ISA has them;
 * dst must be 32-byte aligned and n a multiple of 64 (the caller splits off the rest). */
static inline void KERNEL(stream_copy)(uint8_t *dst, const uint8_t *src, size_t n) {
#if SHOAL_HAVE_STREAM && defined(__AVX2__)
    for (size_t i = 0; i < n; i += 64) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        _mm256_stream_si256((__m256i *)(dst + i), a);
        _mm256_stream_si256((__m256i *)(dst + i + 32), b);
    }
#elif SHOAL_HAVE_STREAM
    for (size_t i = 0; i < n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
#else
    memcpy(dst, src, n);
#endif
}

/* Ask for the next chunk's lines now, so they stream in from DRAM while this chunk is
 * hashed and written out (reads and writes overlap instead of alternating). */
static inline void KERNEL(prefetch)(const uint8_t *start, size_t offset, size_t len,
                                    size_t n) {
    if (offset >= n) return;
    if (len > n - offset) len = n - offset;
    for (size_t i = 0; i < len; i += 64) __builtin_prefetch(start + offset + i, 0, 0);
}

/* dst[0:n] = bounce[0:n] = src[0:n] from the same registers: the bounce buffer (L1) then
 * holds exactly the bytes the destination received. Same alignment rules as stream_copy,
 * bounce 32-byte aligned. */
static inline void KERNEL(tee_copy)(uint8_t *dst, uint8_t *bounce, const uint8_t *src, size_t n) {
#if SHOAL_HAVE_STREAM && defined(__AVX2__)
    for (size_t i = 0; i < n; i += 64) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        _mm256_store_si256((__m256i *)(bounce + i), a);
        _mm256_store_si256((__m256i *)(bounce + i + 32), b);
        _mm256_stream_si256((__m256i *)(dst + i), a);
        _mm256_stream_si256((__m256i *)(dst + i + 32), b);
    }
#elif SHOAL_HAVE_STREAM
    for (size_t i = 0; i < n; i += 32) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        _mm_store_si128((__m128i *)(bounce + i), a);
        _mm_store_si128((__m128i *)(bounce + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
    }
#else
    memcpy(bounce, src, n);
    memcpy(dst, bounce, n);
#endif
}

static inline void KERNEL(fence)(void) {
#if SHOAL_HAVE_STREAM
    _mm_sfence(); /* streaming stores are weakly ordered: publish them before returning */
#endif
}

#if SHOAL_HAVE_STREAM && defined(__AVX2__) && !defined(SHOAL_NO_FUSED)
/* -- AVX2: copy and hash from the same registers ---------------------------------------
 *
 * XXH3's long-input loop (XXH3_hashLong_internal_loop in xxhash.h) with its accumulate step
 * written out so that each 64-byte stripe is loaded once and used twice: streamed to the
 * destination and mixed into the accumulators. The DRAM loads of the copy and the hash's
 * arithmetic then sit in one instruction window, and the hash costs almost nothing on top
 * of the copy (two passes, even from L1, cost ~20%). The digest equals XXH3_64bits(): the
 * blocks, scrambles, last stripe and merge are xxhash's, in its order (tests compare every
 * length class with the xxhash package).
 *
 * Exact for readers: the bulk is hashed from the registers that were stored; the final
 * stripe (which overlaps the bulk) is hashed from a private copy, whose uncovered tail is
 * what the destination receives. If the source changed meanwhile, the digest is of bytes
 * that differ from the original and fails the block's checksum. */
/* How a stripe reaches the destination: which stores its alignment allows. */
enum { SHOAL_STORE_STREAM32 = 0, SHOAL_STORE_STREAM16 = 1, SHOAL_STORE_PLAIN = 2 };

static inline __attribute__((always_inline)) void KERNEL(store_stripe)(uint8_t *dst, __m256i d0,
                                                                   __m256i d1, int how) {
    if (how == SHOAL_STORE_STREAM32) {
        _mm256_stream_si256((__m256i *)dst, d0);
        _mm256_stream_si256((__m256i *)(dst + 32), d1);
    } else if (how == SHOAL_STORE_STREAM16) {
        _mm_stream_si128((__m128i *)dst, _mm256_castsi256_si128(d0));
        _mm_stream_si128((__m128i *)(dst + 16), _mm256_extracti128_si256(d0, 1));
        _mm_stream_si128((__m128i *)(dst + 32), _mm256_castsi256_si128(d1));
        _mm_stream_si128((__m128i *)(dst + 48), _mm256_extracti128_si256(d1, 1));
    } else {
        _mm256_storeu_si256((__m256i *)dst, d0);
        _mm256_storeu_si256((__m256i *)(dst + 32), d1);
    }
}

static inline __attribute__((always_inline)) void KERNEL(fused_stripes)(
    uint64_t *acc, const uint8_t *src, uint8_t *dst, const uint8_t *secret, size_t nb_stripes,
    int how) {
    __m256i *xacc = (__m256i *)acc;
    __m256i acc0 = xacc[0], acc1 = xacc[1];
    for (size_t s = 0; s < nb_stripes; s++) {
        const uint8_t *in = src + s * 64;
        __m256i d0 = _mm256_loadu_si256((const __m256i *)in);
        __m256i d1 = _mm256_loadu_si256((const __m256i *)(in + 32));
        KERNEL(store_stripe)(dst + s * 64, d0, d1, how);
        const uint8_t *key = secret + s * XXH_SECRET_CONSUME_RATE;
        __m256i k0 = _mm256_loadu_si256((const __m256i *)key);
        __m256i k1 = _mm256_loadu_si256((const __m256i *)(key + 32));
        __m256i dk0 = _mm256_xor_si256(d0, k0);
        __m256i dk1 = _mm256_xor_si256(d1, k1);
        __m256i p0 = _mm256_mul_epu32(dk0, _mm256_srli_epi64(dk0, 32));
        __m256i p1 = _mm256_mul_epu32(dk1, _mm256_srli_epi64(dk1, 32));
        __m256i s0 = _mm256_add_epi64(acc0, _mm256_shuffle_epi32(d0, _MM_SHUFFLE(1, 0, 3, 2)));
        __m256i s1 = _mm256_add_epi64(acc1, _mm256_shuffle_epi32(d1, _MM_SHUFFLE(1, 0, 3, 2)));
        acc0 = _mm256_add_epi64(p0, s0);
        acc1 = _mm256_add_epi64(p1, s1);
    }
    xacc[0] = acc0;
    xacc[1] = acc1;
}

#define SHOAL_HAVE_FUSED 1
/* n > XXH3_MIDSIZE_MAX (the callers check); ``how`` from dst's alignment. */
static inline __attribute__((always_inline)) uint64_t KERNEL(fused_with)(const uint8_t *src,
                                                                     uint8_t *dst, size_t n,
                                                                     int how) {
    XXH_ALIGN(XXH_ACC_ALIGN) xxh_u64 acc[XXH_ACC_NB] = XXH3_INIT_ACC;
    const uint8_t *secret = XXH3_kSecret;
    size_t const secret_size = sizeof(XXH3_kSecret);
    size_t const stripes_per_block = (secret_size - XXH_STRIPE_LEN) / XXH_SECRET_CONSUME_RATE;
    size_t const block_len = XXH_STRIPE_LEN * stripes_per_block;
    size_t const nb_blocks = (n - 1) / block_len;
    size_t const ahead = SHOAL_PREFETCH_CHUNKS * SHOAL_CHUNK;
    KERNEL(prefetch)(src, 0, ahead, n);
    for (size_t b = 0; b < nb_blocks; b++) {
        KERNEL(prefetch)(src, b * block_len + ahead, block_len, n);
        KERNEL(fused_stripes)(acc, src + b * block_len, dst + b * block_len, secret,
                              stripes_per_block, how);
        XXH3_scrambleAcc(acc, secret + secret_size - XXH_STRIPE_LEN);
    }
    size_t const nb_stripes = ((n - 1) - block_len * nb_blocks) / XXH_STRIPE_LEN;
    size_t const covered = nb_blocks * block_len + nb_stripes * XXH_STRIPE_LEN;
    KERNEL(fused_stripes)(acc, src + nb_blocks * block_len, dst + nb_blocks * block_len,
                          secret, nb_stripes, how);
    /* covered is in [n - 64, n - 1]: the last stripe overlaps it by 0-63 bytes */
    _Alignas(64) uint8_t last[XXH_STRIPE_LEN];
    memcpy(last, src + n - XXH_STRIPE_LEN, XXH_STRIPE_LEN);
    memcpy(dst + covered, last + (covered - (n - XXH_STRIPE_LEN)), n - covered);
    XXH3_accumulate_512(acc, last,
                        secret + secret_size - XXH_STRIPE_LEN - XXH_SECRET_LASTACC_START);
    KERNEL(fence)();
    return XXH3_mergeAccs(acc, secret + XXH_SECRET_MERGEACCS_START, (xxh_u64)n * XXH_PRIME64_1);
}

static uint64_t KERNEL(copy_hash_fused)(const uint8_t *src, uint8_t *dst, size_t n) {
    uintptr_t const align = (uintptr_t)dst;
    if ((align & 31) == 0) return KERNEL(fused_with)(src, dst, n, SHOAL_STORE_STREAM32);
    if ((align & 15) == 0) return KERNEL(fused_with)(src, dst, n, SHOAL_STORE_STREAM16);
    return KERNEL(fused_with)(src, dst, n, SHOAL_STORE_PLAIN);
}
#endif

uint64_t KERNEL(hash)(const void *data, size_t n) { return XXH3_64bits(data, n); }

/* Streaming: the state lives in the caller's (64-byte aligned) memory. */
size_t KERNEL(state_size)(void) { return sizeof(XXH3_state_t); }
void KERNEL(state_reset)(void *state) { XXH3_64bits_reset((XXH3_state_t *)state); }
void KERNEL(state_update)(void *state, const void *data, size_t n) {
    XXH3_64bits_update((XXH3_state_t *)state, data, n);
}
uint64_t KERNEL(state_digest)(const void *state) {
    return XXH3_64bits_digest((const XXH3_state_t *)state);
}

/* Bytes before dst is 32-byte aligned: copied and hashed with ordinary stores. */
static inline size_t KERNEL(head_bytes)(const uint8_t *dst, size_t n) {
    size_t head = (size_t)((32 - ((uintptr_t)dst & 31)) & 31);
    return head < n ? head : n;
}

uint64_t KERNEL(copy_hash_source)(const void *src_, void *dst_, size_t n) {
    const uint8_t *src = (const uint8_t *)src_;
    uint8_t *dst = (uint8_t *)dst_;
#ifdef SHOAL_HAVE_FUSED
    if (n > XXH3_MIDSIZE_MAX) return KERNEL(copy_hash_fused)(src, dst, n);
#endif
    XXH3_state_t state;
    XXH3_64bits_reset(&state);
    size_t head = KERNEL(head_bytes)(dst, n);
    if (head) {
        XXH3_64bits_update(&state, src, head);
        memcpy(dst, src, head);
    }
    size_t offset = head;
    KERNEL(prefetch)(src, offset, SHOAL_PREFETCH_CHUNKS * SHOAL_CHUNK, n);
    while (n - offset >= 64) {
        size_t left = n - offset;
        size_t len = left < SHOAL_CHUNK ? (left & ~(size_t)63) : SHOAL_CHUNK;
        KERNEL(prefetch)(src, offset + SHOAL_PREFETCH_CHUNKS * SHOAL_CHUNK, SHOAL_CHUNK, n);
        XXH3_64bits_update(&state, src + offset, len);
        KERNEL(stream_copy)(dst + offset, src + offset, len);
        offset += len;
    }
    if (offset < n) {
        XXH3_64bits_update(&state, src + offset, n - offset);
        memcpy(dst + offset, src + offset, n - offset);
    }
    KERNEL(fence)();
    return XXH3_64bits_digest(&state);
}

/* A plain copy with streaming stores and no checksum: what memcpy does for copies larger
 * than its non-temporal threshold, at every size. Benchmarks use it as the copy limit. */
void KERNEL(copy_stream)(const void *src_, void *dst_, size_t n) {
    const uint8_t *src = (const uint8_t *)src_;
    uint8_t *dst = (uint8_t *)dst_;
    size_t head = KERNEL(head_bytes)(dst, n);
    memcpy(dst, src, head);
    size_t whole = (n - head) & ~(size_t)63;
    KERNEL(stream_copy)(dst + head, src + head, whole);
    memcpy(dst + head + whole, src + head + whole, n - head - whole);
    KERNEL(fence)();
}

uint64_t KERNEL(copy_hash_exact)(const void *src_, void *dst_, size_t n) {
    const uint8_t *src = (const uint8_t *)src_;
    uint8_t *dst = (uint8_t *)dst_;
#ifdef SHOAL_HAVE_FUSED
    if (n > XXH3_MIDSIZE_MAX) return KERNEL(copy_hash_fused)(src, dst, n);
#endif
    _Alignas(64) uint8_t bounce[SHOAL_CHUNK];
    XXH3_state_t state;
    XXH3_64bits_reset(&state);
    size_t head = KERNEL(head_bytes)(dst, n);
    if (head) {
        memcpy(bounce, src, head);
        XXH3_64bits_update(&state, bounce, head);
        memcpy(dst, bounce, head);
    }
    size_t offset = head;
    KERNEL(prefetch)(src, offset, SHOAL_PREFETCH_CHUNKS * SHOAL_CHUNK, n);
    while (n - offset >= 64) {
        size_t left = n - offset;
        size_t len = left < SHOAL_CHUNK ? (left & ~(size_t)63) : SHOAL_CHUNK;
        KERNEL(prefetch)(src, offset + SHOAL_PREFETCH_CHUNKS * SHOAL_CHUNK, SHOAL_CHUNK, n);
        KERNEL(tee_copy)(dst + offset, bounce, src + offset, len);
        XXH3_64bits_update(&state, bounce, len);
        offset += len;
    }
    if (offset < n) {
        memcpy(bounce, src + offset, n - offset);
        XXH3_64bits_update(&state, bounce, n - offset);
        memcpy(dst + offset, bounce, n - offset);
    }
    KERNEL(fence)();
    return XXH3_64bits_digest(&state);
}
