// Every header the CPU kernel files include from outside csrc/cpu. The generated AVX2 wrappers
// (setup.py) include this first, compiled for the baseline ISA, then switch the target to AVX2 and
// include the kernel file: only code defined after the switch (our kernels, in namespace
// dabnet::cpu::avx2) is compiled for AVX2, so no AVX2 copy of a shared inline function (ATen's,
// the standard library's, checks.h's) can be picked by the linker for the baseline build.
// A kernel file that needs another outside header must add it here.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // bf16_store.cpp
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../layout.h"
#include "alloc.h"  // shared by both builds (namespace dabnet::cpu, not ::avx2)
