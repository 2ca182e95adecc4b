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

#endif /* FASTXENT_CY_XENT_SIMD_H */
