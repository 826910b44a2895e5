// parallel_for over XLA's intra-op thread pool, shared by the kernels of this directory.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxlm {

// Runs body(t) for t in [0, tasks) on this thread and on helpers from XLA's intra-op pool; returns when all
// are done. XLA may run independent custom calls at once on that pool, so the caller never waits for a helper
// that has not started (it could be queued behind the caller itself): it claims tasks too, then marks the work
// closed, and waits only for helpers already inside. A helper that starts later finds it closed and leaves,
// touching nothing but the state it co-owns. (jaxlib 0.10's CPU runtime mostly runs what a handler schedules
// inline, so this is mostly one thread; worker threads of our own measured slower: they contend with XLA's.)
struct Shared {
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t inside = 0;   // helpers running tasks (guarded by mu)
  bool closed = false;  // no helper may start (guarded by mu)
};

template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t tasks, F body) {
  const int64_t helpers = std::min<int64_t>(tasks, std::max<int64_t>(1, pool.num_threads())) - 1;
  if (helpers <= 0) {
    for (int64_t t = 0; t < tasks; ++t) body(t);
    return;
  }
  auto shared = std::make_shared<Shared>();
  F* fn = &body;
  for (int64_t h = 0; h < helpers; ++h)
    pool.Schedule([shared, fn, tasks] {
      {
        std::lock_guard<std::mutex> lock(shared->mu);
        if (shared->closed) return;
        ++shared->inside;
      }
      for (int64_t t; (t = shared->next.fetch_add(1)) < tasks;) (*fn)(t);
      std::lock_guard<std::mutex> lock(shared->mu);
      if (--shared->inside == 0) shared->cv.notify_all();
    });
  for (int64_t t; (t = shared->next.fetch_add(1)) < tasks;) body(t);
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->closed = true;
  shared->cv.wait(lock, [&] { return shared->inside == 0; });
}

}  // namespace jaxlm
