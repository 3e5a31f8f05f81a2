// Host emulation (see ../../cuda_runtime.h): kernel launches cannot fail.
#pragma once
#define C10_CUDA_KERNEL_LAUNCH_CHECK()
