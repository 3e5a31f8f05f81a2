// The selective-scan kernels for x86-64 CPUs with AVX2 and FMA, chosen at run time (scan_cpu.cpp), so that the
// extension needs no -march flag and runs on any x86-64 CPU. Only this unit's own functions get the target options:
// the standard headers are included before them, and no torch header is included at all.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "scan_params.h"

#ifdef DEFMAMBA_SCAN_HAVE_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define DEFMAMBA_SCAN_NS avx2
#include "scan_kernel.h"
#pragma GCC pop_options
#endif
