// Stand-in for c10/cuda/CUDAStream.h in the CUDA emulation.
#pragma once
#include "../../../cuemu.h"
