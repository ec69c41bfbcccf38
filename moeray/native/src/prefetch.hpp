// moeray's prefetcher: moves the bytes of experts' weights into memory ahead of use and drops
// those of evicted experts, over read-only memory mappings of a node's shard files.
//
// One background thread serves a FIFO queue of experts. Populating an expert reads its byte
// ranges (MADV_WILLNEED) and maps every page with madvise(MADV_POPULATE_READ) (Linux >= 5.14),
// or, where the kernel refuses that, with a read of one byte per page. Mappings are
// MADV_RANDOM: fault readahead would pull neighbouring experts in. Releasing an expert
// unmaps its pages from this process (MADV_DONTNEED) and drops them from the page cache
// (posix_fadvise DONTNEED), so that the hot set bounds resident memory; only pages that lie
// wholly inside the expert's ranges are released, never a neighbour's shared boundary page.
// resident_bytes() asks mincore(), which for a file mapping reports page-cache residency.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

namespace moeray {

struct ByteRange {
  int32_t file;    // index into the prefetcher's files
  int64_t offset;  // from the start of the file
  int64_t length;
};

struct PrefetchStats {
  int64_t bytes_populated = 0;
  int64_t bytes_released = 0;
  int64_t prefetches_completed = 0;
  int64_t in_time = 0;  // waits that found the expert ready
  int64_t late = 0;     // waits that had to block, or populate themselves
  int64_t queue_wait_ns = 0;  // enqueue to start of populating, summed
};

class Prefetcher {
 public:
  Prefetcher(const std::vector<std::string>& paths, int64_t num_experts)
      : page_(sysconf(_SC_PAGESIZE)),
        state_(static_cast<size_t>(num_experts), State::kCold),
        generation_(static_cast<size_t>(num_experts), 0),
        ranges_(static_cast<size_t>(num_experts)) {
    for (const auto& path : paths) map_file(path);
    worker_ = std::thread([this] { serve(); });
  }

  ~Prefetcher() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    wake_.notify_all();
    worker_.join();
    for (auto& f : files_) {
      if (f.size > 0) munmap(f.base, static_cast<size_t>(f.size));
      close(f.fd);
    }
  }

  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  int64_t num_experts() const { return static_cast<int64_t>(state_.size()); }
  int64_t num_files() const { return static_cast<int64_t>(files_.size()); }
  int64_t file_size(int32_t file) const { return files_[file].size; }

  // Ranges are checked by the caller (bindings) against num_files() and file_size().
  void set_ranges(int64_t expert, std::vector<ByteRange> ranges) {
    std::lock_guard<std::mutex> lock(mu_);
    ranges_[expert] = std::move(ranges);
  }

  int64_t expert_bytes(int64_t expert) const {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t total = 0;
    for (const auto& r : ranges_[expert]) total += r.length;
    return total;
  }

  // Queues the expert unless it is ready or already queued.
  void prefetch(int64_t expert) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (state_[expert] != State::kCold) return;
      state_[expert] = State::kQueued;
      queue_.push_back({expert, generation_[expert], Clock::now()});
    }
    wake_.notify_one();
  }

  bool ready(int64_t expert) const {
    std::lock_guard<std::mutex> lock(mu_);
    return state_[expert] == State::kReady;
  }

  // Returns once the expert's bytes are in memory: true if they already were (in time). A
  // cold expert is populated on the calling thread: the consumer would fault them in anyway.
  bool wait(int64_t expert) {
    std::unique_lock<std::mutex> lock(mu_);
    if (state_[expert] == State::kReady) {
      ++stats_.in_time;
      return true;
    }
    ++stats_.late;
    if (state_[expert] == State::kQueued) {
      done_.wait(lock, [&] { return state_[expert] != State::kQueued; });
      if (state_[expert] == State::kReady) return false;
    }
    const auto ranges = ranges_[expert];
    const uint64_t generation = generation_[expert];
    lock.unlock();
    const int64_t bytes = populate(ranges);
    lock.lock();
    stats_.bytes_populated += bytes;
    if (generation_[expert] == generation) state_[expert] = State::kReady;
    return false;
  }

  // Drops the expert's pages; a populate in flight for it finds its generation changed and
  // releases what it brought in.
  void release(int64_t expert) {
    std::vector<ByteRange> ranges;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++generation_[expert];
      state_[expert] = State::kCold;
      ranges = ranges_[expert];
    }
    const int64_t bytes = drop(ranges);
    std::lock_guard<std::mutex> lock(mu_);
    stats_.bytes_released += bytes;
  }

  // Bytes of the expert's pages (those overlapping its ranges) resident in memory.
  int64_t resident_bytes(int64_t expert) const {
    std::vector<ByteRange> ranges;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ranges = ranges_[expert];
    }
    int64_t total = 0;
    std::vector<unsigned char> vec;
    for (const auto& r : ranges) {
      if (r.length <= 0) continue;
      const auto& f = files_[r.file];
      const auto [start, end] = outer_pages(r);
      const size_t pages = static_cast<size_t>((end - start + page_ - 1) / page_);
      vec.assign(pages, 0);
      if (mincore(f.base + start, static_cast<size_t>(end - start), vec.data()) != 0) continue;
      for (size_t i = 0; i < pages; ++i) {
        if (vec[i] & 1) total += std::min(page_, end - (start + static_cast<int64_t>(i) * page_));
      }
    }
    return total;
  }

  // Issues cache-line prefetches for the first `bytes` of the expert on the calling thread:
  // the consumer calls it just before reading the weights.
  void read_ahead(int64_t expert, int64_t bytes) const {
    std::vector<ByteRange> ranges;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ranges = ranges_[expert];
    }
    for (const auto& r : ranges) {
      const char* p = files_[r.file].base + r.offset;
      const int64_t n = std::min(bytes, r.length);
      for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(p + i, 0, 3);
      bytes -= n;
      if (bytes <= 0) break;
    }
  }

  PrefetchStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

  const char* data(int32_t file) const { return files_[file].base; }

 private:
  enum class State : uint8_t { kCold, kQueued, kReady };
  using Clock = std::chrono::steady_clock;
  struct Job {
    int64_t expert;
    uint64_t generation;
    Clock::time_point queued;
  };
  struct File {
    int fd = -1;
    char* base = nullptr;
    int64_t size = 0;
  };

  void map_file(const std::string& path) {
    File f;
    f.fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (f.fd < 0) throw std::runtime_error(path + ": " + std::strerror(errno));
    struct stat st;
    if (fstat(f.fd, &st) != 0) {
      const int err = errno;
      close(f.fd);
      throw std::runtime_error(path + ": " + std::strerror(err));
    }
    f.size = st.st_size;
    if (f.size > 0) {
      void* p = mmap(nullptr, static_cast<size_t>(f.size), PROT_READ, MAP_SHARED, f.fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        close(f.fd);
        throw std::runtime_error(path + ": mmap: " + std::strerror(err));
      }
      f.base = static_cast<char*>(p);
      // no readahead on faults: it would pull neighbouring experts into the page cache, and
      // the hot set would no longer bound what is resident; populate() asks for exact ranges
      madvise(p, static_cast<size_t>(f.size), MADV_RANDOM);
    }
    files_.push_back(f);
  }

  void serve() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      const Job job = queue_.front();
      queue_.pop_front();
      if (generation_[job.expert] != job.generation) continue;  // released while queued
      stats_.queue_wait_ns +=
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - job.queued).count();
      const auto ranges = ranges_[job.expert];
      lock.unlock();
      const int64_t bytes = populate(ranges);
      lock.lock();
      stats_.bytes_populated += bytes;
      if (generation_[job.expert] == job.generation) {
        state_[job.expert] = State::kReady;
        ++stats_.prefetches_completed;
      } else {  // released meanwhile: do not leave its pages behind
        lock.unlock();
        drop(ranges);
        lock.lock();
      }
      done_.notify_all();
    }
  }

  // [start, end) of the pages a range touches, within its file.
  std::pair<int64_t, int64_t> outer_pages(const ByteRange& r) const {
    return {r.offset / page_ * page_,
            std::min(files_[r.file].size, (r.offset + r.length + page_ - 1) / page_ * page_)};
  }

  // Faults in every page overlapping the ranges; returns the bytes of those ranges.
  int64_t populate(const std::vector<ByteRange>& ranges) {
    int64_t bytes = 0;
    for (const auto& r : ranges) {
      if (r.length <= 0) continue;
      const auto& f = files_[r.file];
      const auto [start, end] = outer_pages(r);
      char* base = f.base + start;
      const size_t len = static_cast<size_t>(end - start);
      madvise(base, len, MADV_WILLNEED);  // one large read of exactly this range
      if (!populate_unsupported_.load(std::memory_order_relaxed) &&
          madvise(base, len, MADV_POPULATE_READ) == 0) {
        bytes += r.length;
        continue;
      }
      if (errno == EINVAL) populate_unsupported_.store(true, std::memory_order_relaxed);
      volatile char sink = 0;
      for (int64_t i = 0; i < end - start; i += page_) sink = sink + base[i];
      (void)sink;
      bytes += r.length;
    }
    return bytes;
  }

  // Releases the pages wholly inside the ranges; returns the bytes released.
  int64_t drop(const std::vector<ByteRange>& ranges) {
    int64_t bytes = 0;
    for (const auto& r : ranges) {
      const auto& f = files_[r.file];
      const int64_t start = (r.offset + page_ - 1) / page_ * page_;
      int64_t end = (r.offset + r.length) / page_ * page_;
      if (r.offset + r.length >= f.size) end = r.offset + r.length;  // the file's last page
      if (end <= start) continue;
      madvise(f.base + start, static_cast<size_t>(end - start), MADV_DONTNEED);
      posix_fadvise(f.fd, start, end - start, POSIX_FADV_DONTNEED);
      bytes += end - start;
    }
    return bytes;
  }

  const int64_t page_;
  std::vector<File> files_;
  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::deque<Job> queue_;
  std::vector<State> state_;
  std::vector<uint64_t> generation_;
  std::vector<std::vector<ByteRange>> ranges_;
  PrefetchStats stats_;
  std::atomic<bool> populate_unsupported_{false};
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace moeray
