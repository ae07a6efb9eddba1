// Just enough of CUDA for a kernel unit of mlx_lm_xlstm/kernels/cuda.py to run on the CPU:
// every thread of a threadgroup is a std::thread, threadgroups run one after the other,
// __shared__ arrays are statics (one threadgroup at a time uses them), __syncthreads() is a
// barrier of the threadgroup and a warp shuffle a barrier of its 32 threads. A test of the
// kernels' logic (indexing, barriers, arithmetic) without a GPU, not of their speed, nor of
// races the hardware's scheduling would expose. A thread that returns early must take its
// whole warp with it and leave no __syncthreads behind, or the others wait forever (the
// kernels' early returns do so).
#pragma once
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct emulated_dim3 {
  unsigned int x, y, z;
};
static thread_local emulated_dim3 threadIdx, blockIdx;
static emulated_dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __shared__ static
#define __launch_bounds__(threads, blocks)

static std::unique_ptr<std::barrier<>> emulated_block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> emulated_warp_barriers;
static std::vector<float> emulated_warp_lanes;
#define __syncthreads() emulated_block_barrier->arrive_and_wait()

inline unsigned int emulated_thread_index() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// The value `x` of the lane whose index differs from this one's by `lanes` (XOR), as
// __shfl_xor_sync over a whole warp.
inline float shuffle_xor(float x, unsigned int lanes) {
  const unsigned int t = emulated_thread_index();
  emulated_warp_lanes[t] = x;
  emulated_warp_barriers[t / 32]->arrive_and_wait();
  const float other = emulated_warp_lanes[t ^ lanes];
  emulated_warp_barriers[t / 32]->arrive_and_wait();
  return other;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

union emulated_f32_bits {
  float f;
  unsigned int u;
};

// Round to nearest even, NaN kept, as the hardware converts.
struct bfloat16_t {
  unsigned short bits;
  bfloat16_t() = default;
  bfloat16_t(float x) {
    emulated_f32_bits b;
    b.f = x;
    bits = (b.u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((b.u >> 16) | 0x40u)
                                              : (unsigned short)((b.u + 0x7fffu + ((b.u >> 16) & 1u)) >> 16);
  }
  operator float() const {
    emulated_f32_bits b;
    b.u = ((unsigned int)bits) << 16;
    return b.f;
  }
};

struct float16_t {
  _Float16 value;
  float16_t() = default;
  float16_t(float x) : value((_Float16)x) {}
  operator float() const { return (float)value; }
};

// Runs `thread` (a call of the kernel) on every thread of a grid of `grid` threadgroups of
// `block` threads.
template <typename F>
void emulated_launch(emulated_dim3 grid, emulated_dim3 block, F thread) {
  gridDim = grid;
  blockDim = block;
  const unsigned int threads = block.x * block.y * block.z;
  emulated_warp_lanes.assign(threads, 0.0f);
  for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        emulated_block_barrier = std::make_unique<std::barrier<>>(threads);
        emulated_warp_barriers.clear();
        for (unsigned int w = 0; w < (threads + 31) / 32; ++w) {
          emulated_warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
        }
        std::vector<std::thread> pool;
        for (unsigned int tz = 0; tz < block.z; ++tz)
          for (unsigned int ty = 0; ty < block.y; ++ty)
            for (unsigned int tx = 0; tx < block.x; ++tx)
              pool.emplace_back([=] {
                blockIdx = {bx, by, bz};
                threadIdx = {tx, ty, tz};
                thread();
              });
        for (auto& t : pool) t.join();
      }
}
