// The kernels' own thread pool: persistent workers that spin briefly between jobs (a decode step runs
// ~170 small matmuls back to back), then sleep.
#pragma once
#include <cstdint>
#include <functional>

namespace qk {
// Run fn(i) for i in [0, n) on the pool (the calling thread takes part). n < 2^24.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);
int num_threads();
}  // namespace qk
