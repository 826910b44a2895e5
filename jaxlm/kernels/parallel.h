// parallel_for over XLA's intra-op thread pool, shared by the kernels of this directory.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxlm {

// A contiguous range of tasks [lo, hi), claimed one at a time from either end: its owner takes the front, a
// thread whose own range is done takes the back. lo and hi share one word, so a claim is one compare-exchange.
struct alignas(64) Range {
  std::atomic<uint64_t> bounds{0};  // lo in the low 32 bits, hi in the high 32

  void set(int64_t lo, int64_t hi) { bounds.store(static_cast<uint64_t>(hi) << 32 | static_cast<uint64_t>(lo)); }

  int64_t front() {  // the next task from the front, or -1 when none is left
    uint64_t b = bounds.load();
    for (;;) {
      const uint32_t lo = static_cast<uint32_t>(b), hi = static_cast<uint32_t>(b >> 32);
      if (lo >= hi) return -1;
      if (bounds.compare_exchange_weak(b, b + 1)) return lo;
    }
  }

  int64_t back() {  // the last task left, or -1
    uint64_t b = bounds.load();
    for (;;) {
      const uint32_t lo = static_cast<uint32_t>(b), hi = static_cast<uint32_t>(b >> 32);
      if (lo >= hi) return -1;
      if (bounds.compare_exchange_weak(b, static_cast<uint64_t>(hi - 1) << 32 | lo)) return hi - 1;
    }
  }
};

struct Shared {
  Shared(int64_t tasks, int64_t parts) : parts(parts), ranges(new Range[parts]) {
    for (int64_t p = 0; p < parts; ++p) ranges[p].set(tasks * p / parts, tasks * (p + 1) / parts);
  }
  const int64_t parts;
  std::unique_ptr<Range[]> ranges;
  std::mutex mu;
  std::condition_variable cv;
  int64_t joined = 0;   // helpers that have started (guarded by mu): helper i owns range i
  std::atomic<int64_t> inside{0};  // helpers running tasks (changed under mu)
  bool closed = false;  // no helper may start (guarded by mu)
};

constexpr std::chrono::microseconds kSpin{100};

inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Participant `me` runs its own range from the front, then the other ranges from their backs.
template <typename F>
void run_part(Shared& s, int64_t me, F& body) {
  for (int64_t t; (t = s.ranges[me].front()) >= 0;) body(t);
  for (int64_t o = 1; o < s.parts; ++o) {
    Range& r = s.ranges[(me + o) % s.parts];
    for (int64_t t; (t = r.back()) >= 0;) body(t);
  }
}

// Runs body(t) for t in [0, tasks) on this thread and on helpers from XLA's intra-op pool; returns when all
// are done. The tasks are split into one contiguous range a thread, so that each streams adjacent memory (a
// weight's strips lie one after another): strips dealt out one at a time, alternating between two threads, ran
// 1.5x slower than halves over a model's NF4 weights (57 MB), as each core's prefetcher then sees every
// other strip. A thread done with its range takes tasks from the back of another's, so a helper that starts
// late (or never) costs nothing but its share. XLA may run independent custom calls at once on that pool, so
// the caller never waits for a helper that has not started (it could be queued behind the caller itself): it
// marks the work closed once every task is claimed, and waits only for helpers already inside. A helper that
// starts later finds it closed and leaves, touching nothing but the state it co-owns.
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t tasks, F body) {
  const int64_t helpers = std::min<int64_t>(tasks, std::max<int64_t>(1, pool.num_threads())) - 1;
  if (helpers <= 0) {
    for (int64_t t = 0; t < tasks; ++t) body(t);
    return;
  }
  auto shared = std::make_shared<Shared>(tasks, helpers + 1);
  F* fn = &body;
  for (int64_t h = 0; h < helpers; ++h)
    pool.Schedule([shared, fn] {
      int64_t me;
      {
        std::lock_guard<std::mutex> lock(shared->mu);
        if (shared->closed) return;
        ++shared->inside;
        me = ++shared->joined;
      }
      run_part(*shared, me, *fn);
      std::lock_guard<std::mutex> lock(shared->mu);
      if (--shared->inside == 0) shared->cv.notify_all();
    });
  run_part(*shared, 0, body);
  // Every task is claimed; a helper still inside is finishing its last one. Spin up to kSpin rather than sleep
  // on the condition variable at once: waking from a sleep costs more than a decode step's strip takes.
  const auto until = std::chrono::steady_clock::now() + kSpin;
  while (shared->inside.load() > 0 && std::chrono::steady_clock::now() < until) pause();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->closed = true;
  shared->cv.wait(lock, [&] { return shared->inside == 0; });
}

}  // namespace jaxlm
