// Just enough of the Metal Shading Language for `g++ -fsyntax-only` to read MLX's
// generated custom-kernel source: a lint for syntax and type errors, not a Metal compile.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

// Address spaces and function qualifiers carry no meaning for the lint.
#define device
#define constant
#define threadgroup
#define thread
#define kernel

typedef unsigned int uint;
typedef unsigned long ulong;
typedef unsigned short ushort;
typedef _Float16 half;
typedef half float16_t;

struct bfloat16_t {
  unsigned short bits;
  bfloat16_t() = default;
  bfloat16_t(float);
  operator float() const;
};

struct uint2 { uint x, y; };
struct uint3 { uint x, y, z; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };

enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);
float simd_sum(float);
float simd_max(float);
float simd_shuffle_xor(float, ushort);

namespace metal {
using ::mem_flags;
float exp(float);
float log(float);
float abs(float);
float rsqrt(float);
float sqrt(float);
float max(float, float);
float min(float, float);
float fast_exp(float);
float precise_exp(float);
namespace precise {
float log(float);
float tanh(float);
}  // namespace precise
}  // namespace metal

using namespace metal;
