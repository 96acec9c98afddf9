// memory.cpp: device memory and the fault handler.
//
// Every allocation gets its own pages with an inaccessible guard page before and after it;
// the buffer ends exactly at the upper guard page (so its start is aligned to the largest power
// of two, up to 4096, that divides its size: every element keeps its natural alignment). So a
// kernel's read or write past either end faults at once, and the handler names the launch
// (kernel, block, thread) and the allocation the address is nearest to. Fresh allocations are
// filled with 0xff bytes (NaN in every float type), so a kernel that reads memory nobody
// wrote shows it in its output. Freed memory is unmapped: a later access faults.
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "nkemu.h"

namespace nkemu {
namespace {
constexpr std::size_t kPage = 4096;
struct Allocation {
  char* map;  // the mapping, guard pages included
  std::size_t map_bytes, bytes;
};
std::mutex mu;
std::map<uintptr_t, Allocation>& allocations() {
  static auto* m = new std::map<uintptr_t, Allocation>;  // never destroyed: the handler may read it at exit
  return *m;
}
std::size_t in_use = 0;

}  // namespace

void* device_alloc(std::size_t bytes) {
  const std::size_t body = (bytes + kPage - 1) / kPage * kPage;
  const std::size_t map_bytes = body + 2 * kPage;
  char* m = (char*)mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  mprotect(m, kPage, PROT_NONE);
  mprotect(m + kPage + body, kPage, PROT_NONE);
  // the end at the upper guard page: the start keeps the alignment of the largest power of two
  // (up to the page) that divides the size, so every element keeps its natural alignment
  char* p = m + kPage + body - bytes;
  std::memset(p, 0xff, bytes);  // fresh device memory is garbage, not zeros
  std::lock_guard<std::mutex> lock(mu);
  allocations()[(uintptr_t)p] = Allocation{m, map_bytes, bytes};
  in_use += bytes;
  return p;
}

bool device_free(void* p) {
  Allocation a;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = allocations().find((uintptr_t)p);
    if (it == allocations().end()) return false;
    a = it->second;
    in_use -= a.bytes;
    allocations().erase(it);
  }
  munmap(a.map, a.map_bytes);
  return true;
}

bool device_range_ok(const void* p, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = allocations().upper_bound((uintptr_t)p);
  if (it == allocations().begin()) return false;
  --it;
  return (uintptr_t)p + bytes <= it->first + it->second.bytes;
}

bool device_allocation_of(const void* p, void** base, std::size_t* bytes) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = allocations().upper_bound((uintptr_t)p);
  if (it == allocations().begin()) return false;
  --it;
  if ((uintptr_t)p >= it->first + it->second.bytes) return false;
  *base = (void*)it->first;
  *bytes = it->second.bytes;
  return true;
}

std::size_t device_bytes_in_use() {
  std::lock_guard<std::mutex> lock(mu);
  return in_use;
}

namespace {
struct sigaction previous_segv, previous_bus;

// Where `addr` lies relative to the allocations (no lock: we are in a signal handler and about
// to die; the map is not being changed by this thread).
void describe(uintptr_t addr, char* out, std::size_t n) {
  const auto& all = allocations();
  auto it = all.upper_bound(addr);
  if (it != all.begin()) {
    auto before = std::prev(it);
    const uintptr_t end = before->first + before->second.bytes;
    if (addr >= end && addr < end + kPage) {
      std::snprintf(out, n, "%zu bytes past the end of a %zu-byte allocation at 0x%lx", (std::size_t)(addr - end),
                    before->second.bytes, (unsigned long)before->first);
      return;
    }
  }
  if (it != all.end() && addr < it->first && addr + kPage >= it->first) {
    std::snprintf(out, n, "%zu bytes before the start of a %zu-byte allocation at 0x%lx", (std::size_t)(it->first - addr),
                  it->second.bytes, (unsigned long)it->first);
    return;
  }
  std::snprintf(out, n, "not near any live device allocation (freed memory, a host pointer, or a wild index)");
}

void on_fault(int sig, siginfo_t* info, void* uctx) {
  const std::string launch = current_launch();
  if (launch.empty()) {  // not ours: hand it on (Rust's stack-overflow handler, or the default)
    struct sigaction& prev = sig == SIGSEGV ? previous_segv : previous_bus;
    if (prev.sa_flags & SA_SIGINFO) {
      prev.sa_sigaction(sig, info, uctx);
      return;
    }
    if (prev.sa_handler == SIG_IGN) return;
    if (prev.sa_handler != SIG_DFL) {
      prev.sa_handler(sig);
      return;
    }
    signal(sig, SIG_DFL);
    return;  // the faulting instruction runs again and takes the default action
  }
  char what[256];
  describe((uintptr_t)info->si_addr, what, sizeof what);
  const void* pc = (const void*)((ucontext_t*)uctx)->uc_mcontext.gregs[REG_RIP];
  Dl_info dl{};
  const bool found = dladdr(pc, &dl) && dl.dli_fname;
  char message[1536];
  const int n = std::snprintf(message, sizeof message, "nkemu: %s: invalid %s access at address %p: %s\n",
                              launch.c_str(), sig == SIGSEGV ? "memory" : "bus", info->si_addr, what);
  if (n > 0 && write(2, message, std::min((size_t)n, sizeof message - 1)) < 0) std::abort();
  if (found) {  // the source line, from the module's line tables (nkcc compiles with -g1)
    char offset[32];
    std::snprintf(offset, sizeof offset, "0x%lx", (unsigned long)((uintptr_t)pc - (uintptr_t)dl.dli_fbase));
    const char head[] = "nkemu: the faulting instruction (function, then file:line, innermost first):\n";
    if (write(2, head, sizeof head - 1) < 0) std::abort();
    const pid_t pid = fork();
    if (pid == 0) {
      dup2(2, 1);
      execlp("addr2line", "addr2line", "-f", "-i", "-C", "-e", dl.dli_fname, offset, (char*)nullptr);
      _exit(127);
    }
    if (pid > 0) waitpid(pid, nullptr, 0);
  }
  signal(SIGABRT, SIG_DFL);
  std::abort();
}
}  // namespace

void ensure_signal_stack() {
  // The handler needs more room than the alternate stacks threads usually get (Rust's is a few
  // KiB): give a launching thread a 256 KiB one.
  constexpr std::size_t kBytes = 256 * 1024;
  static thread_local bool done = false;
  if (done) return;
  done = true;
  stack_t old{};
  if (sigaltstack(nullptr, &old) == 0 && !(old.ss_flags & SS_DISABLE) && old.ss_size >= kBytes) return;
  stack_t st{};
  st.ss_sp = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);  // kept for the thread's life
  if (st.ss_sp == MAP_FAILED) return;
  st.ss_size = kBytes;
  sigaltstack(&st, nullptr);
}

void install_fault_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &previous_segv);
    sigaction(SIGBUS, &sa, &previous_bus);
  });
}
}  // namespace nkemu
