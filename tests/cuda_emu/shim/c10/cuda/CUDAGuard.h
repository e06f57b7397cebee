// Stand-in for c10/cuda/CUDAGuard.h in the CUDA emulation.
#pragma once
#include "../../../cuemu.h"
