// A process-wide pool of worker threads for the CPU kernels. Work is split into tasks by the
// caller (so results never depend on which thread ran a task); the pool only runs them.
#pragma once

#include <cstdint>
#include <functional>

namespace tqattn::cpu {

// Number of threads a call should use: requested > 0 is taken as is (capped at 256), else the
// hardware concurrency.
int resolve_threads(int requested);

// Runs fn(task) for task in [0, n_tasks) on up to num_threads threads (the caller's included) and
// returns when all are done. Exceptions from fn are rethrown in the caller (the first one).
// Nested calls from inside a task run serially on the calling thread.
void parallel_for(int64_t n_tasks, int num_threads, const std::function<void(int64_t)>& fn);

}  // namespace tqattn::cpu
