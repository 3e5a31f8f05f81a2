// The selective-scan kernels for the baseline instruction set of the build (SSE2 on x86-64, NEON on aarch64).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "scan_params.h"

#define DEFMAMBA_SCAN_NS generic
#include "scan_kernel.h"
