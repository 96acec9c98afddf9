// runtime.cpp: the CUDA execution model on the host.
//
// A launch runs on the host thread that called cuLaunchKernel, one block after another. Each
// CUDA thread of the block is a fiber with its own stack (a guard page below it); fibers
// switch only at barriers and warp collectives, which go through the scheduler below. After
// every barrier the scheduler picks the order in which the released threads run to their next
// barrier: thread order, reverse order, or a seeded random permutation (NKEMU_SCHEDULE), so a
// result that depends on the order of threads between two barriers (a race) changes with the
// schedule. Before every block, static and dynamic shared memory is filled with 0xff bytes
// (NaN in every float type, -1 in every integer), so a read before a write shows.
//
// Errors are never hangs: a __syncthreads reached by part of the block, two barriers met at
// different lines, a warp collective whose mask names an exited lane or a lane that waits
// elsewhere, a shuffle from a lane outside its mask, or no thread able to run (a deadlock)
// ends the launch with a message naming the kernel, block, thread and file:line.
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "nkemu.h"

namespace nkemu {
thread_local U3 tl_thread_idx, tl_block_idx, tl_block_dim, tl_grid_dim;
thread_local unsigned tl_lane;

// ---------------------------------------------------------------- configuration
namespace {
Config read_config() {
  Config c{Schedule::Forward, 1, 9, 0, 256 * 1024, false, false};
  if (const char* s = std::getenv("NKEMU_SCHEDULE")) {
    const std::string v = s;
    if (v == "forward" || v.empty()) c.schedule = Schedule::Forward;
    else if (v == "reverse") c.schedule = Schedule::Reverse;
    else if (v.rfind("random", 0) == 0) {
      c.schedule = Schedule::Random;
      if (v.size() > 7 && v[6] == ':') c.seed = std::strtoull(v.c_str() + 7, nullptr, 10);
    } else {
      std::fprintf(stderr, "nkemu: NKEMU_SCHEDULE=%s: expected forward, reverse or random[:SEED]\n", s);
      std::exit(2);
    }
  }
  if (const char* s = std::getenv("NKEMU_CC")) {
    const std::string v = s;
    if (v == "8.0" || v == "80") c.cc_major = 8, c.cc_minor = 0;
    else if (v == "9.0" || v == "90") c.cc_major = 9, c.cc_minor = 0;
    else {
      std::fprintf(stderr, "nkemu: NKEMU_CC=%s: expected 8.0 or 9.0\n", s);
      std::exit(2);
    }
  }
  if (const char* s = std::getenv("NKEMU_STACK_KB")) c.stack_bytes = (std::size_t)std::max(64, std::atoi(s)) * 1024;
  if (const char* s = std::getenv("NKEMU_TRACE")) c.trace = s[0] && s[0] != '0';
  if (const char* s = std::getenv("NKEMU_DIFFERENTIAL")) c.differential = s[0] && s[0] != '0';
  return c;
}
}  // namespace

namespace {
Config& mutable_config() {
  static Config c = read_config();
  return c;
}
}  // namespace

const Config& config() { return mutable_config(); }

void set_schedule(Schedule s, unsigned long long seed, bool differential) {
  mutable_config().schedule = s;
  mutable_config().seed = seed;
  mutable_config().differential = differential;
}

std::string Config::describe() const {
  char b[128];
  const char* s = schedule == Schedule::Forward ? "forward" : schedule == Schedule::Reverse ? "reverse" : "random";
  if (schedule == Schedule::Random)
    std::snprintf(b, sizeof b, "sm_%d%d, schedule %s:%llu", cc_major, cc_minor, s, seed);
  else
    std::snprintf(b, sizeof b, "sm_%d%d, schedule %s", cc_major, cc_minor, s);
  return differential ? std::string(b) + ", each launch also run forward and compared" : std::string(b);
}

// ---------------------------------------------------------------- context switch
// x86-64 System V: push the callee-saved registers, MXCSR and the x87 control word on the
// old stack, store its pointer in *save, load `next`, pop the same from there.
#if defined(__x86_64__)
asm(R"(
.text
.globl nkemu_switch
.hidden nkemu_switch
.type nkemu_switch,@function
nkemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size nkemu_switch, .-nkemu_switch
)");
extern "C" void nkemu_switch(void** save, void* next);
#else
#error "nkemu's fiber switch is written for x86-64"
#endif

// ---------------------------------------------------------------- the scheduler
namespace {
enum State : unsigned char { RUN, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };

struct Fiber {
  void* sp;
  State state;
  U3 tid;
  unsigned lane, warp;
};

struct Warp {
  unsigned live;     // lanes that have not exited
  unsigned arrived;  // lanes waiting at the pending warp barrier
  unsigned want;     // its mask
  Site site;         // where the first lane met it
  unsigned long long slots[32];
  void* ptrs[32];
};

struct Worker {  // one per host thread that launches
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<int> order;
  char* stacks = nullptr;
  std::size_t stack_bytes = 0, capacity = 0;
  char* dyn = nullptr;  // dynamic shared memory, ending at a guard page
  std::size_t dyn_bytes = 0, dyn_map = 0;
  void* sched_sp = nullptr;
  int n = 0, cur = -1, done = 0, arrived = 0;
  Site block_site{nullptr, 0};
  const Kernel* kernel = nullptr;
  void** params = nullptr;
  bool failed = false;
  std::string error;
  unsigned long long rng = 0, switches = 0;
};
thread_local Worker* tl_worker = nullptr;

Worker& worker() {
  if (!tl_worker) tl_worker = new Worker;  // lives as long as the host thread's launches do
  return *tl_worker;
}

std::string where(const Worker& w, int fiber) {
  char b[256];
  const U3 t = fiber >= 0 ? w.fibers[fiber].tid : U3{0, 0, 0};
  if (fiber >= 0)
    std::snprintf(b, sizeof b, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", w.kernel ? w.kernel->name : "?",
                  tl_block_idx.x, tl_block_idx.y, tl_block_idx.z, t.x, t.y, t.z);
  else
    std::snprintf(b, sizeof b, "kernel %s, block (%u,%u,%u)", w.kernel ? w.kernel->name : "?", tl_block_idx.x,
                  tl_block_idx.y, tl_block_idx.z);
  return b;
}

std::string at(Site s) {
  if (!s.file) return "?";
  const char* f = std::strrchr(s.file, '/');
  return std::string(f ? f + 1 : s.file) + ":" + std::to_string(s.line);
}

void record(Worker& w, int fiber, const std::string& what) {
  if (w.failed) return;  // the first error is the cause; later ones follow from it
  w.failed = true;
  w.error = where(w, fiber) + ": " + what;
}

// Back to the scheduler; returns when the scheduler switches to this fiber again.
inline void yield(Worker& w) {
  ++w.switches;
  nkemu_switch(&w.fibers[w.cur].sp, w.sched_sp);
}

[[noreturn]] void abandon(Worker& w) {  // a failed fiber is never resumed
  nkemu_switch(&w.fibers[w.cur].sp, w.sched_sp);
  std::abort();
}

[[noreturn]] void fail_here(Worker& w, const std::string& what) {
  record(w, w.cur, what);
  abandon(w);
}

std::string lanes_of(unsigned mask) {
  std::string s;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) s += (s.empty() ? "" : ",") + std::to_string(l);
  return "{" + s + "}";
}

void fiber_exit(Worker& w) {
  Fiber& f = w.fibers[w.cur];
  f.state = DONE;
  ++w.done;
  Warp& wp = w.warps[f.warp];
  wp.live &= ~(1u << f.lane);
  if (w.arrived > 0)
    record(w, w.cur,
           "exited while " + std::to_string(w.arrived) + " thread(s) wait at __syncthreads (" + at(w.block_site) +
               "): a barrier reached by part of the block");
  else if (wp.arrived && (wp.want >> f.lane & 1u))
    record(w, w.cur,
           "lane " + std::to_string(f.lane) + " exited while lanes " + lanes_of(wp.arrived) +
               " wait for it at a warp collective (" + at(wp.site) + ")");
  abandon(w);
}

void fiber_main() {
  Worker& w = *tl_worker;
  w.kernel->thunk(w.kernel->fn, w.params);  // one CUDA thread, start to end
  fiber_exit(w);
}

void* init_stack(char* base, std::size_t size) {
  const uintptr_t top = ((uintptr_t)(base + size)) & ~(uintptr_t)15;
  void** sp = (void**)(top - 80);  // = 0 mod 16: fiber_main starts with rsp = 8 mod 16, as after a call
  std::memset(sp, 0, 80);
  const unsigned short fpu_cw = 0x037f;
  const unsigned mxcsr = 0x1f80;
  std::memcpy((char*)sp, &fpu_cw, 2);
  std::memcpy((char*)sp + 8, &mxcsr, 4);
  sp[8] = (void*)&fiber_main;  // popped by `ret` after 16 + 6*8 bytes
  return sp;
}

unsigned long long next_random(Worker& w) {  // xorshift64*
  w.rng ^= w.rng >> 12;
  w.rng ^= w.rng << 25;
  w.rng ^= w.rng >> 27;
  return w.rng * 0x2545F4914F6CDD1DULL;
}

unsigned long long hash(const char* s) {
  unsigned long long h = 1469598103934665603ULL;
  for (; *s; ++s) h = (h ^ (unsigned char)*s) * 1099511628211ULL;
  return h;
}

void describe_deadlock(Worker& w) {
  std::string s = "deadlock: no thread can run;";
  int at_block = 0;
  for (const Fiber& f : w.fibers)
    if (f.state == AT_BLOCK_BARRIER) ++at_block;
  if (at_block) s += " " + std::to_string(at_block) + " thread(s) wait at __syncthreads (" + at(w.block_site) + ");";
  for (std::size_t i = 0; i < w.warps.size(); ++i) {
    const Warp& wp = w.warps[i];
    if (wp.arrived)
      s += " warp " + std::to_string(i) + ": lanes " + lanes_of(wp.arrived) + " wait at a warp collective (" +
           at(wp.site) + ") for lanes " + lanes_of(wp.want & ~wp.arrived) + ";";
  }
  record(w, -1, s);
}

void run_block(Worker& w, U3 bid, Schedule sched) {
  tl_block_idx = bid;
  const int n = w.n;
  w.done = 0;
  w.arrived = 0;
  w.block_site = Site{nullptr, 0};
  for (std::size_t i = 0; i < w.warps.size(); ++i) {
    Warp& wp = w.warps[i];
    const int lanes = std::min(32, n - 32 * (int)i);
    wp.live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    wp.arrived = wp.want = 0;
  }
  for (int i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    f.state = RUN;
    f.tid = U3{(unsigned)i % tl_block_dim.x, ((unsigned)i / tl_block_dim.x) % tl_block_dim.y,
               (unsigned)i / (tl_block_dim.x * tl_block_dim.y)};
    f.lane = (unsigned)i % 32;
    f.warp = (unsigned)i / 32;
    f.sp = init_stack(w.stacks + (std::size_t)i * w.stack_bytes + 4096, w.stack_bytes - 4096);
  }
  while (w.done < n && !w.failed) {
    w.order.clear();
    for (int i = 0; i < n; ++i)
      if (w.fibers[i].state == RUN) w.order.push_back(i);
    if (w.order.empty()) {
      describe_deadlock(w);
      break;
    }
    if (sched == Schedule::Reverse) std::reverse(w.order.begin(), w.order.end());
    else if (sched == Schedule::Random)
      for (std::size_t i = w.order.size(); i > 1; --i) std::swap(w.order[i - 1], w.order[next_random(w) % i]);
    for (int i : w.order) {
      if (w.failed) break;
      Fiber& f = w.fibers[i];
      if (f.state != RUN) continue;
      w.cur = i;
      tl_thread_idx = f.tid;
      tl_lane = f.lane;
      ++w.switches;
      nkemu_switch(&w.sched_sp, f.sp);
    }
  }
  w.cur = -1;
}

void ensure_stacks(Worker& w, int n) {
  const std::size_t want = config().stack_bytes;
  if (w.capacity >= (std::size_t)n && w.stack_bytes == want) return;
  if (w.stacks) munmap(w.stacks, w.capacity * w.stack_bytes);
  w.stack_bytes = want;
  w.capacity = (std::size_t)n;
  w.stacks = (char*)mmap(nullptr, w.capacity * w.stack_bytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (w.stacks == MAP_FAILED) {
    std::fprintf(stderr, "nkemu: cannot map %zu fiber stacks\n", w.capacity);
    std::abort();
  }
  for (std::size_t i = 0; i < w.capacity; ++i) mprotect(w.stacks + i * w.stack_bytes, 4096, PROT_NONE);
}

void ensure_dynamic_smem(Worker& w, std::size_t bytes) {
  if (w.dyn) munmap(w.dyn - (w.dyn_map - 4096 - w.dyn_bytes), w.dyn_map);
  w.dyn = nullptr;
  w.dyn_bytes = bytes;
  if (!bytes) return;
  // end the buffer at a guard page: an access past sharedMemBytes faults
  const std::size_t pages = (bytes + 4095) / 4096 * 4096;
  char* m = (char*)mmap(nullptr, pages + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  mprotect(m + pages, 4096, PROT_NONE);
  w.dyn_map = pages + 4096;
  w.dyn = m + pages - bytes;
}

// This host thread's copy of the module's static shared memory (its TLS block).
struct SharedBlock {
  const LoadedModule* module;
  char* data;
  std::size_t bytes;
};
thread_local std::vector<SharedBlock> tl_shared;

std::size_t tls_size_of(const std::string& path) {
  struct Query {
    const std::string* path;
    std::size_t bytes;
  } q{&path, 0};
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) -> int {
        Query* q = (Query*)data;
        if (!info->dlpi_name || *q->path != info->dlpi_name) return 0;
        for (int i = 0; i < info->dlpi_phnum; ++i)
          if (info->dlpi_phdr[i].p_type == PT_TLS) q->bytes = info->dlpi_phdr[i].p_memsz;
        return 1;
      },
      &q);
  return q.bytes;
}

SharedBlock shared_block(const LoadedModule& m) {
  for (const SharedBlock& b : tl_shared)
    if (b.module == &m) return b;
  m.table->touch_shared();
  void* data = nullptr;
  SharedBlock b{&m, nullptr, 0};
  if (dlinfo(m.handle, RTLD_DI_TLS_DATA, &data) == 0 && data) {
    b.data = (char*)data;
    b.bytes = tls_size_of(m.path);
  }
  tl_shared.push_back(b);
  return b;
}
}  // namespace

// ---------------------------------------------------------------- device-side entry points
void sync_block(Site s) {
  Worker& w = *tl_worker;
  if (w.done > 0)
    fail_here(w, "__syncthreads at " + at(s) + " after " + std::to_string(w.done) +
                     " thread(s) of the block exited: a barrier reached by part of the block");
  if (w.arrived == 0) w.block_site = s;
  else if (s.line != w.block_site.line || std::strcmp(s.file, w.block_site.file) != 0)
    fail_here(w, "__syncthreads at " + at(s) + " while other threads wait at " + at(w.block_site));
  Fiber& f = w.fibers[w.cur];
  f.state = AT_BLOCK_BARRIER;
  if (++w.arrived == w.n) {
    for (Fiber& g : w.fibers)
      if (g.state == AT_BLOCK_BARRIER) g.state = RUN;
    w.arrived = 0;
  }
  yield(w);  // even the last to arrive: the scheduler picks the order past the barrier
}

void sync_warp(Site s, unsigned mask) {
  Worker& w = *tl_worker;
  Fiber& f = w.fibers[w.cur];
  Warp& wp = w.warps[f.warp];
  if (!(mask >> f.lane & 1u))
    fail_here(w, "warp collective at " + at(s) + " with mask " + lanes_of(mask) + " excluding the calling lane " +
                     std::to_string(f.lane));
  if (mask & ~wp.live)
    fail_here(w, "warp collective at " + at(s) + " names exited lanes " + lanes_of(mask & ~wp.live));
  if (wp.arrived == 0) {
    wp.want = mask;
    wp.site = s;
  } else if (wp.want != mask) {
    fail_here(w, "warp collective at " + at(s) + " with mask " + lanes_of(mask) + " while lanes " +
                     lanes_of(wp.arrived) + " wait at " + at(wp.site) + " with mask " + lanes_of(wp.want));
  }
  f.state = AT_WARP_BARRIER;
  wp.arrived |= 1u << f.lane;
  if (wp.arrived == wp.want) {
    const unsigned base = f.warp * 32;
    for (int l = 0; l < 32; ++l)
      if (wp.arrived >> l & 1u) w.fibers[base + l].state = RUN;
    wp.arrived = 0;
  }
  yield(w);
}

unsigned long long warp_exchange(Site s, unsigned mask, unsigned long long value, int src) {
  Worker& w = *tl_worker;
  const unsigned lane = w.fibers[w.cur].lane;
  unsigned long long* slots = w.warps[w.fibers[w.cur].warp].slots;
  slots[lane] = value;
  sync_warp(s, mask);
  if (src < 0 || src > 31 || !(mask >> src & 1u))
    fail_here(w, "shuffle at " + at(s) + " reads lane " + std::to_string(src) + ", outside its mask " + lanes_of(mask));
  const unsigned long long r = slots[src];
  sync_warp(s, mask);  // every lane has read before any lane publishes again
  return r;
}

unsigned ballot(Site s, unsigned mask, int pred) {
  Worker& w = *tl_worker;
  const unsigned lane = w.fibers[w.cur].lane;
  unsigned long long* slots = w.warps[w.fibers[w.cur].warp].slots;
  slots[lane] = pred ? 1 : 0;
  sync_warp(s, mask);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && slots[l]) r |= 1u << l;
  sync_warp(s, mask);
  return r;
}

void* const* warp_gather(Site s, void* mine) {
  Worker& w = *tl_worker;
  Warp& wp = w.warps[w.fibers[w.cur].warp];
  if (wp.live != 0xffffffffu)
    fail_here(w, "tensor-core operation at " + at(s) + " in a warp without all 32 lanes " + lanes_of(wp.live));
  wp.ptrs[w.fibers[w.cur].lane] = mine;
  sync_warp(s, 0xffffffffu);
  return wp.ptrs;
}

void warp_release(Site s) { sync_warp(s, 0xffffffffu); }

void* dynamic_smem() { return tl_worker->dyn; }

void fail(Site s, const char* what) { fail_here(*tl_worker, std::string(what) + " at " + at(s)); }

std::string current_launch() {
  Worker* w = tl_worker;
  if (!w || w->cur < 0) return "";
  return where(*w, w->cur);
}

// ---------------------------------------------------------------- modules
LoadedModule* load_module(const void* image, std::string* error) {
  const char* p = (const char*)image;
  if (std::memcmp(p, "NKEMUSO\0", 8) != 0) {
    *error = "the image is not an nkcc module (was the crate built with the emulator's nkcc?)";
    return nullptr;
  }
  unsigned long long len;
  std::memcpy(&len, p + 8, 8);
  // One file per distinct image, kept for addr2line. dlopen of a path it has seen returns that
  // library again; that is what we want: a module has no state besides its shared memory.
  char hex[17];
  unsigned long long h = 1469598103934665603ULL;
  for (unsigned long long i = 0; i < len; ++i) h = (h ^ (unsigned char)p[16 + i]) * 1099511628211ULL;
  std::snprintf(hex, sizeof hex, "%016llx", h);
  const char* dir = std::getenv("NKEMU_MODULE_DIR");
  std::string path = std::string(dir && *dir ? dir : "/tmp") + "/nkemu-module-" + hex + ".so";
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (access(path.c_str(), R_OK) != 0) {
    const std::string tmp = path + "." + std::to_string(getpid()) + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f || std::fwrite(p + 16, 1, len, f) != len || std::fclose(f) != 0 || std::rename(tmp.c_str(), path.c_str())) {
      *error = "cannot write " + path;
      return nullptr;
    }
  }
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    *error = std::string("dlopen: ") + dlerror();
    return nullptr;
  }
  auto table_fn = (const Module* (*)())dlsym(handle, "nkemu_module");
  const Module* table = table_fn ? table_fn() : nullptr;
  if (!table || table->abi != kAbi) {
    *error = "module " + path + " has no nkemu table of this ABI";
    return nullptr;
  }
  return new LoadedModule{handle, table, path};
}

const Kernel* find_kernel(const LoadedModule* m, const char* name) {
  for (int i = 0; i < m->table->nkernels; ++i)
    if (std::strcmp(m->table->kernels[i].name, name) == 0) return &m->table->kernels[i];
  return nullptr;
}

// ---------------------------------------------------------------- launches
namespace {
struct Region {
  char* base;
  std::size_t bytes;
  int param;
};
// True when two buffers hold the same 32-bit words, in whatever order.
bool same_words(const char* a, const char* b, std::size_t bytes) {
  if (bytes % 4) return false;
  std::vector<uint32_t> x(bytes / 4), y(bytes / 4);
  std::memcpy(x.data(), a, bytes);
  std::memcpy(y.data(), b, bytes);
  std::sort(x.begin(), x.end());
  std::sort(y.begin(), y.end());
  return x == y;
}

// The device allocations a launch can reach: those an 8-byte word of a parameter points into.
std::vector<Region> reachable_regions(void** params, const Kernel& k) {
  std::vector<Region> out;
  for (int i = 0; i < k.nparams; ++i)
    for (std::size_t off = 0; off + 8 <= k.param_size[i]; off += 8) {
      uintptr_t word;
      std::memcpy(&word, (const char*)params[i] + off, 8);
      void* base;
      std::size_t bytes;
      if (!device_allocation_of((const void*)word, &base, &bytes)) continue;
      bool seen = false;
      for (const Region& r : out) seen |= r.base == (char*)base;
      if (!seen) out.push_back(Region{(char*)base, bytes, i});
    }
  return out;
}

// NKEMU_COVERAGE=FILE: the names of the kernels this process launched, appended at exit.
struct Coverage {
  std::mutex mu;
  std::vector<std::string> names;
  ~Coverage() {
    const char* path = std::getenv("NKEMU_COVERAGE");
    if (!path || !*path || names.empty()) return;
    if (FILE* f = std::fopen(path, "a")) {
      for (const std::string& n : names) std::fprintf(f, "%s\n", n.c_str());
      std::fclose(f);
    }
  }
  void add(const char* name) {
    std::lock_guard<std::mutex> lock(mu);
    for (const std::string& n : names)
      if (n == name) return;
    names.emplace_back(name);
  }
};
Coverage coverage;
}  // namespace

void note_call(const char* name) {
  if (std::getenv("NKEMU_COVERAGE")) coverage.add(name);
  if (config().trace) std::fprintf(stderr, "nkemu: %s\n", name);
}

std::string launch(const LoadedModule& m, const Kernel& k, Dim grid, Dim block, std::size_t dynamic_smem,
                   void** params) {
  Worker& w = worker();
  if (w.cur >= 0) return "a launch from inside a kernel";
  if (std::getenv("NKEMU_COVERAGE")) coverage.add(k.name);
  ensure_signal_stack();
  const auto t0 = std::chrono::steady_clock::now();
  const int n = (int)(block.x * block.y * block.z);
  ensure_stacks(w, n);
  ensure_dynamic_smem(w, dynamic_smem);
  const SharedBlock shared = shared_block(m);
  tl_block_idx = U3{0, 0, 0};
  w.n = n;
  w.fibers.assign((std::size_t)n, Fiber{});
  w.warps.assign((std::size_t)(n + 31) / 32, Warp{});
  w.kernel = &k;
  w.params = params;
  w.failed = false;
  w.error.clear();
  w.switches = 0;
  tl_grid_dim = U3{grid.x, grid.y, grid.z};
  tl_block_dim = U3{block.x, block.y, block.z};
  auto run_grid = [&](Schedule sched, unsigned long long seed) {
    // blocks in the schedule's order too: a GPU runs them in any order, at once
    const unsigned long long total = (unsigned long long)grid.x * grid.y * grid.z;
    std::vector<unsigned long long> order;
    if (sched == Schedule::Random) {
      order.resize(total);
      for (unsigned long long i = 0; i < total; ++i) order[i] = i;
      w.rng = (seed * 0x9E3779B97F4A7C15ULL) ^ hash(k.name) ^ 7;
      for (unsigned long long i = total; i > 1; --i) std::swap(order[i - 1], order[next_random(w) % i]);
    }
    for (unsigned long long i = 0; i < total && !w.failed; ++i) {
      const unsigned long long b = sched == Schedule::Random ? order[i] : sched == Schedule::Reverse ? total - 1 - i : i;
      const U3 bid{(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y),
                   (unsigned)(b / ((unsigned long long)grid.x * grid.y))};
      if (shared.data) std::memset(shared.data, 0xff, shared.bytes);
      if (w.dyn) std::memset(w.dyn, 0xff, w.dyn_bytes);
      w.rng = (seed * 0x9E3779B97F4A7C15ULL) ^ hash(k.name) ^ (b * 0xBF58476D1CE4E5B9ULL) ^ 1;
      run_block(w, bid, sched);
    }
  };
  const Config& c = config();
  if (!c.differential) {
    run_grid(c.schedule, c.seed);
  } else {
    // The same launch under two schedules from the same memory: every byte of every buffer
    // the kernel can reach (an allocation a parameter points into) must come out the same.
    const Schedule second = c.schedule == Schedule::Forward ? Schedule::Reverse : c.schedule;
    std::vector<Region> regions = reachable_regions(params, k);
    std::vector<std::vector<char>> before, first;
    for (const Region& r : regions) before.emplace_back(r.base, r.base + r.bytes);
    run_grid(Schedule::Forward, c.seed);
    if (!w.failed) {
      for (const Region& r : regions) first.emplace_back(r.base, r.base + r.bytes);
      for (std::size_t i = 0; i < regions.size(); ++i) std::memcpy(regions[i].base, before[i].data(), regions[i].bytes);
      run_grid(second, c.seed);
    }
    for (std::size_t i = 0; i < regions.size() && !w.failed; ++i) {
      const Region& r = regions[i];
      if (std::memcmp(r.base, first[i].data(), r.bytes) == 0) continue;
      if (same_words(r.base, first[i].data(), r.bytes)) {
        // the same values in another order: what an atomicAdd'ed cursor gives a buffer that a
        // later pass sorts (the tests compare final outputs with the CPU's)
        if (c.trace) std::fprintf(stderr, "nkemu: %s: parameter %d holds the same words in another order\n", k.name, r.param);
        continue;
      }
      std::size_t at = 0, differ = 0;
      for (std::size_t j = r.bytes; j-- > 0;)
        if (r.base[j] != first[i][j]) ++differ, at = j;
      char msg[320];
      std::snprintf(msg, sizeof msg,
                    "the result depends on the order threads and blocks run (a race): under the forward and the %s "
                    "schedule, %zu of the %zu bytes of the buffer at %p (parameter %d) differ, the first at byte %zu",
                    second == Schedule::Reverse ? "reverse" : "random", differ, r.bytes, (void*)r.base, r.param, at);
      record(w, -1, msg);
    }
  }
  if (config().trace)
    std::fprintf(stderr, "nkemu: %s grid (%u,%u,%u) block (%u,%u,%u) dyn smem %zu: %.4f s, %llu switches%s\n", k.name,
                 grid.x, grid.y, grid.z, block.x, block.y, block.z, dynamic_smem,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), w.switches,
                 w.failed ? " FAILED" : "");
  w.kernel = nullptr;
  return w.failed ? w.error : std::string();
}
}  // namespace nkemu
