// Stand-in for c10/cuda/CUDAException.h in the CUDA emulation.
#pragma once
#include "../../../cuemu.h"
