// The CPU kernels compiled for AVX2 (x86 with GCC; ops.cpp picks them at run time when the CPU has AVX2). No FMA:
// the target adds AVX2 only, and the build passes -ffp-contract=off, so results equal the baseline copy's bit for bit.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

#include <cstdint>

#include "cpu_kernels.h"

#pragma GCC target("avx2")
#define LSFUSED_AVX2
#define LSFUSED_TABLE kCpuAvx2
#define LSFUSED_ISA_NAME "avx2"
#include "cpu_kernels_impl.h"
#endif
