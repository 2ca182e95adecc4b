/* Build switches for kernels/_cy_xent.pyx: OpenMP, function multiversioning, and the
 * few C helpers Cython cannot spell (aligned allocation, a write prefetch).
 *
 * FX_HOT marks the per-block kernels. When setup.py found that the compiler builds and
 * links `target_clones` (GCC >= 12 on x86-64 Linux/glibc, which resolves the clone once
 * at load time through an ifunc), it defines FASTXENT_MULTIVERSION and every FX_HOT
 * function is compiled three times: x86-64-v4 (AVX-512 + FMA), x86-64-v3 (AVX2 + FMA)
 * and the baseline (SSE2); the loader picks the best one the CPU supports. `flatten`
 * inlines every per-row helper into each clone (gcc's size heuristics otherwise leave
 * the big ones out of line, compiled for the baseline ISA only), so they are vectorised
 * for that clone's ISA. Without multiversioning, FX_HOT is `flatten` alone (GCC/Clang).
 *
 * Cython cannot put an attribute on a cdef function; the .pyx uses the return type
 * `fx_hot_void`, declared there as the C text "FX_HOT void", to carry it.
 */
#ifndef FASTXENT_CY_XENT_SIMD_H
#define FASTXENT_CY_XENT_SIMD_H

#ifdef _OPENMP
#include <omp.h>
#define FX_OPENMP 1
static int fx_get_max_threads(void) { return omp_get_max_threads(); }
static void fx_set_num_threads(int n) { omp_set_num_threads(n); }
#else
#define FX_OPENMP 0
static int fx_get_max_threads(void) { return 1; }
static void fx_set_num_threads(int n) { (void)n; }
#endif

#if defined(FASTXENT_MULTIVERSION) && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define FX_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#define FX_MULTIVERSIONED 1
/* The clone the loader picks (the same test as the ifunc resolver). */
static const char *fx_simd_level(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
    if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
    return "baseline";
}
#else
#if defined(__GNUC__)
#define FX_HOT __attribute__((flatten))
#else
#define FX_HOT
#endif
#define FX_MULTIVERSIONED 0
static const char *fx_simd_level(void) { return "baseline"; }
#endif

/* Per-thread scratch of the kernels: cache-line aligned (the caller pads it by a line, so
 * no two threads write one line). NULL for size 0 or when out of memory. */
#if defined(_WIN32)
#include <malloc.h>
static void *fx_aligned_alloc(size_t size) { return size ? _aligned_malloc(size, 64) : NULL; }
static void fx_aligned_free(void *pointer) { _aligned_free(pointer); }
#else
#include <stdlib.h>
static void *fx_aligned_alloc(size_t size) {
    void *pointer = NULL;
    if (size == 0 || posix_memalign(&pointer, 64, size) != 0) return NULL;
    return pointer;
}
static void fx_aligned_free(void *pointer) { free(pointer); }
#endif

/* A hint that the cache line of `address` is about to be written (prefetchw where the ISA
 * has it): takes the write-allocate miss off the path of the stores that follow. */
#if defined(__GNUC__)
#define fx_prefetch_for_write(address) __builtin_prefetch((address), 1, 3)
#else
#define fx_prefetch_for_write(address) ((void)(address))
#endif

/* The value `x`, opaque to the optimiser: it may no longer be treated as the product that
 * produced it, so a following addition cannot be contracted with that product into one
 * fused multiply-add. Used for the gradient's target term grad_scale (1-eps) w_y: whether
 * gcc fused its product into `g_y - y_term` depended on the code around the call (loss+grad
 * and in place differed in the last bit of g_y, float64 with weights). */
/* The local array `lanes`, opaque to the optimiser from here on: its elements must be read
 * back as whatever values they hold. fx_opaque for a whole array (the lanes layout's target
 * terms), without a store and reload per element. */
#if defined(__GNUC__)
#define fx_launder_lanes(lanes) __asm__("" : "+m"(lanes))
#else
#define fx_launder_lanes(lanes) ((void)(lanes))
#endif

#if defined(__GNUC__)
#define fx_opaque(x) __extension__({ __typeof__(x) fx_opaque_value = (x); __asm__("" : "+m"(fx_opaque_value)); fx_opaque_value; })
#else
#define fx_opaque(x) (x)
#endif


/* 16-bit logits (Params.storage 1 = bfloat16, 2 = float16): a block of words widened into
 * the thread's float32 rows, and the float32 gradient rounded back to the nearest even
 * word. bfloat16 is the top half of a float32 (widening is exact; a NaN narrows to 0x7FC0,
 * as torch's .to(bfloat16) and the numba kernels' narrow_brain); float16 through the
 * compiler's _Float16 (F16C's vcvtph2ps / vcvtps2ph in the x86-64-v3 and v4 clones). Where
 * the compiler has no _Float16, FX_FLOAT16 is 0 and the extension reads no 16-bit words
 * (the API then casts to float32 first). */
#include <stdint.h>
#include <string.h>
#if defined(__FLT16_MAX__)
#define FX_FLOAT16 1
typedef _Float16 fx_half;
#else
#define FX_FLOAT16 0
#endif

FX_HOT static void fx_widen_words(const uint16_t *words, float *out, ptrdiff_t count, int storage) {
    ptrdiff_t i;
    if (storage == 1) {
        for (i = 0; i < count; i++) {
            uint32_t u = (uint32_t)words[i] << 16;
            float v;
            memcpy(&v, &u, sizeof v);
            out[i] = v;
        }
    }
#if FX_FLOAT16
    else {
        for (i = 0; i < count; i++) {
            fx_half h;
            memcpy(&h, &words[i], sizeof h);
            out[i] = (float)h;
        }
    }
#endif
}

FX_HOT static void fx_narrow_words(const float *values, uint16_t *out, ptrdiff_t count, int storage) {
    ptrdiff_t i;
    if (storage == 1) {
        for (i = 0; i < count; i++) {
            float v = values[i];
            uint32_t u;
            memcpy(&u, &v, sizeof u);
            uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
            out[i] = v == v ? rounded : (uint16_t)0x7FC0;
        }
    }
#if FX_FLOAT16
    else {
        for (i = 0; i < count; i++) {
            fx_half h = (fx_half)values[i];
            memcpy(&out[i], &h, sizeof h);
        }
    }
#endif
}

/* The small-C layout's transposes (float32), 16 rows at a time, in registers: rows
 * r0..r0+15 of a row-major (., C) block <-> buf[c * lanes + r] for C <= 32. Each 16-class
 * part of the 16 rows is loaded as 16 vectors (one unaligned load per row), transposed by
 * the classic four stages of two-source shuffles (64 vpermt2ps / vunpck / vshuff for a
 * 16 x 16 tile, AVX-512), and stored as C whole vectors. The scalar transposes they replace
 * were bound by one scalar store per logit each way (C = 10: 6 ns a row of the kernel's
 * 16 on one Zen 4 core; these take 3.5).
 *
 * A row's 16-float window may run past the row into the next ones: on the way in, the
 * extra lanes are read and never used; on the way out the stores go in increasing row
 * order (and, with two parts, the second part first), so each row's own store lands after
 * the spill of the rows before it. Only a window that would leave the 16-row tile is cut
 * to the row's own elements (element by element), so nothing outside the tile is read or
 * written.
 *
 * GCC's generic vector extension (__builtin_shuffle) so that each target_clones clone gets
 * its own instructions; fx_vector_lanes() says whether to take this path at all (AVX-512F,
 * where it was measured; the scalar loops of the .pyx stay for the other CPUs, for
 * float64, for partial lane groups and for compilers without the extension). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
typedef float fx_v16sf __attribute__((vector_size(64), aligned(64)));
typedef int32_t fx_v16si __attribute__((vector_size(64), aligned(64)));

static int fx_vector_lanes(void) { return __builtin_cpu_supports("avx512f"); }

/* v[r][c] -> v[c][r] */
static inline __attribute__((always_inline)) void fx_transpose16(fx_v16sf *v) {
    fx_v16sf t[16];
    int i, j, k;
    /* (a) rows 2i, 2i+1 interleaved per 128-bit lane: a0 b0 a1 b1 | a4 b4 a5 b5 | ... */
    const fx_v16si lo1 = {0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29};
    const fx_v16si hi1 = {2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31};
    /* (b) as pairs: v[4i + k], lane L = column 4L + k of rows 4i..4i+3 */
    const fx_v16si lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
    const fx_v16si hi2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
    /* (c), (d) whole 128-bit lanes: the four row groups of each column side by side */
    const fx_v16si lo3 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const fx_v16si hi3 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const fx_v16si lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const fx_v16si hi4 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    for (i = 0; i < 8; i++) {
        t[2 * i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo1);
        t[2 * i + 1] = __builtin_shuffle(v[2 * i], v[2 * i + 1], hi1);
    }
    for (i = 0; i < 4; i++)
        for (j = 0; j < 2; j++) {
            v[4 * i + 2 * j] = __builtin_shuffle(t[4 * i + j], t[4 * i + 2 + j], lo2);
            v[4 * i + 2 * j + 1] = __builtin_shuffle(t[4 * i + j], t[4 * i + 2 + j], hi2);
        }
    for (i = 0; i < 2; i++)
        for (k = 0; k < 4; k++) {
            t[8 * i + k] = __builtin_shuffle(v[8 * i + k], v[8 * i + 4 + k], lo3);
            t[8 * i + 4 + k] = __builtin_shuffle(v[8 * i + k], v[8 * i + 4 + k], hi3);
        }
    for (i = 0; i < 2; i++)
        for (k = 0; k < 4; k++) {
            v[8 * i + k] = __builtin_shuffle(t[4 * i + k], t[8 + 4 * i + k], lo4);
            v[8 * i + 4 + k] = __builtin_shuffle(t[4 * i + k], t[8 + 4 * i + k], hi4);
        }
}

/* buf[c * lanes + r] = x[r * n_classes + c] for r < 16, c < n_classes <= 32 */
static inline __attribute__((always_inline)) void fx_rows_to_lanes16(const float *x, ptrdiff_t n_classes, float *buf,
                                                                  ptrdiff_t lanes) {
    ptrdiff_t part, r, c, width;
    fx_v16sf v[16];
    for (part = 0; part * 16 < n_classes; part++) {
        width = n_classes - part * 16 < 16 ? n_classes - part * 16 : 16;
        for (r = 0; r < 16; r++) {
            const float *source = x + r * n_classes + part * 16;
            if (r * n_classes + part * 16 + 16 <= 16 * n_classes) {
                memcpy(&v[r], source, sizeof v[r]);
            } else {
                v[r] = (fx_v16sf){0};
                for (c = 0; c < width; c++) v[r][c] = source[c];
            }
        }
        fx_transpose16(v);
        for (c = 0; c < width; c++) memcpy(buf + (part * 16 + c) * lanes, &v[c], sizeof v[c]);
    }
}

/* g[r * n_classes + c] = buf[c * lanes + r] for r < 16, c < n_classes <= 32 */
static inline __attribute__((always_inline)) void fx_lanes_to_rows16(const float *buf, ptrdiff_t lanes,
                                                                  ptrdiff_t n_classes, float *g) {
    ptrdiff_t part, r, c, width;
    fx_v16sf v[16];
    for (part = (n_classes - 1) / 16; part >= 0; part--) {  /* the second part first: see above */
        width = n_classes - part * 16 < 16 ? n_classes - part * 16 : 16;
        for (c = 0; c < 16; c++) memcpy(&v[c], buf + (part * 16 + (c < width ? c : 0)) * lanes, sizeof v[c]);
        fx_transpose16(v);
        for (r = 0; r < 16; r++) {
            float *target = g + r * n_classes + part * 16;
            if (r * n_classes + part * 16 + 16 <= 16 * n_classes) {
                memcpy(target, &v[r], sizeof v[r]);
            } else {
                for (c = 0; c < width; c++) target[c] = v[r][c];
            }
        }
    }
}
#else
static int fx_vector_lanes(void) { return 0; }
static void fx_rows_to_lanes16(const float *x, ptrdiff_t n_classes, float *buf, ptrdiff_t lanes) {
    (void)x; (void)n_classes; (void)buf; (void)lanes;
}
static void fx_lanes_to_rows16(const float *buf, ptrdiff_t lanes, ptrdiff_t n_classes, float *g) {
    (void)buf; (void)lanes; (void)n_classes; (void)g;
}
#endif

#endif /* FASTXENT_CY_XENT_SIMD_H */
