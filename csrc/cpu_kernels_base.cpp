// The CPU kernels at the baseline ISA of the build (x86-64: SSE2), used where AVX2 is missing.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cstdint>

#include "cpu_kernels.h"

#define LSFUSED_TABLE kCpuBaseline
#define LSFUSED_ISA_NAME "baseline"
#include "cpu_kernels_impl.h"
