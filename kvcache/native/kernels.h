/* The copy + checksum kernels, compiled once per instruction set.
 *
 * Included by kernels_generic.c (the compiler's baseline: SSE2 on x86-64, plain C elsewhere)
 * and kernels_avx2.c (x86-64 with `#pragma GCC target("avx2")`, chosen at run time by
 * copyhash.c). KERNEL(name) gives each copy its own symbol names; xxhash.h is included
 * with XXH_INLINE_ALL, so every XXH3 function is static to the translation unit and picks
 * its vector width from the target of that unit.
 *
 * Two copies, one pass over DRAM each (see copyhash.c for why each is shaped this way):
 *
 *   copy_hash_source   hash each chunk of the source while it is in L1, then stream the
 *                      same chunk to the destination (non-temporal stores: the destination
 *                      is not read back, so no read-for-ownership of its lines). The checksum
 *                      is of the bytes read; if the source changed under the copy, the
 *                      destination may differ from it, which its reader's verification
 *                      catches. For writers (put, save): the reader always verifies.
 *   copy_hash_exact    copy each chunk into a private L1 bounce buffer, hash the bounce
 *                      buffer, stream the bounce buffer to the destination: the checksum is
 *                      exactly of the bytes the destination received, whatever happens to
 *                      the source meanwhile. For readers (get, load, peer fetch landing).
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

/* The unit of work: small enough that a chunk stays in L1 between its two uses. */
#define SHOAL_CHUNK 4096
#define SHOAL_BOUNCE 2048

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
static inline void KERNEL(prefetch)(const uint8_t *next, const uint8_t *end, size_t len) {
    if (next + len > end) len = next < end ? (size_t)(end - next) : 0;
    for (size_t i = 0; i < len; i += 64) __builtin_prefetch(next + i, 0, 0);
}

static inline void KERNEL(fence)(void) {
#if SHOAL_HAVE_STREAM
    _mm_sfence(); /* streaming stores are weakly ordered: publish them before returning */
#endif
}

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
    XXH3_state_t state;
    XXH3_64bits_reset(&state);
    size_t head = KERNEL(head_bytes)(dst, n);
    if (head) {
        XXH3_64bits_update(&state, src, head);
        memcpy(dst, src, head);
    }
    size_t offset = head;
    while (n - offset >= 64) {
        size_t left = n - offset;
        size_t len = left < SHOAL_CHUNK ? (left & ~(size_t)63) : SHOAL_CHUNK;
        KERNEL(prefetch)(src + offset + len, src + n, SHOAL_CHUNK);
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
    _Alignas(64) uint8_t bounce[SHOAL_BOUNCE];
    XXH3_state_t state;
    XXH3_64bits_reset(&state);
    size_t head = KERNEL(head_bytes)(dst, n);
    if (head) {
        memcpy(bounce, src, head);
        XXH3_64bits_update(&state, bounce, head);
        memcpy(dst, bounce, head);
    }
    size_t offset = head;
    while (offset < n) {
        size_t left = n - offset;
        size_t len = left < SHOAL_BOUNCE ? left : SHOAL_BOUNCE;
        KERNEL(prefetch)(src + offset + len, src + n, SHOAL_BOUNCE);
        memcpy(bounce, src + offset, len);
        XXH3_64bits_update(&state, bounce, len);
        size_t whole = len & ~(size_t)63;
        KERNEL(stream_copy)(dst + offset, bounce, whole);
        if (whole < len) memcpy(dst + offset + whole, bounce + whole, len - whole);
        offset += len;
    }
    KERNEL(fence)();
    return XXH3_64bits_digest(&state);
}
