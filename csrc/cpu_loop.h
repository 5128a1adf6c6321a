// Helpers for the CPU kernels: parallel loops over fixed chunks (deterministic results whatever the
// thread count) and the optional x86 FMA code path.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Functions compiled for AVX2+FMA, called only when the running CPU has them.
#define RESALIGN_TARGET_FMA __attribute__((target("avx2,fma")))
#define RESALIGN_X86_DISPATCH 1
#else
#define RESALIGN_TARGET_FMA
#define RESALIGN_X86_DISPATCH 0
#endif

namespace resalign {

// Elements per chunk of the CPU loops: large enough to amortise a task (at::internal::GRAIN_SIZE is
// 32768 too), small enough to split a 1M buffer over 2-64 threads.
constexpr int64_t kChunk = 32768;

inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Calls body(begin, end) for chunks [c * kChunk, min(n, (c + 1) * kChunk)) in parallel.
template <typename F>
void for_each_chunk(int64_t n, const F& body) {
  at::parallel_for(0, num_chunks(n), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(c, c * kChunk, std::min(n, (c + 1) * kChunk));
  });
}

// True when the CPU executes FMA instructions (so the FMA path needs no software fma()).
inline bool cpu_has_fma() {
#if RESALIGN_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace resalign
