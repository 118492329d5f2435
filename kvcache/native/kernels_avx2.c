/* The kernels with AVX2 (x86-64 only; copyhash.c calls them only where the CPU has it). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2")
#define KERNEL(name) shoal_avx2_##name
#include "kernels.h"
#endif
