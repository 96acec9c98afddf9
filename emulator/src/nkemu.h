// nkemu.h: the host-side interface of libnkemu.so (the execution model, device memory and
// module loading), used by the driver, cuBLAS and cuSOLVER stand-ins.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "nkemu_abi.h"

namespace nkemu {
// ---- configuration, read once from the environment ----
enum class Schedule { Forward, Reverse, Random };
struct Config {
  Schedule schedule;
  unsigned long long seed;  // NKEMU_SCHEDULE=random:SEED
  int cc_major, cc_minor;   // NKEMU_CC=8.0 | 9.0
  std::size_t stack_bytes;  // NKEMU_STACK_KB
  bool trace;               // NKEMU_TRACE=1: one line per launch
  bool differential;        // NKEMU_DIFFERENTIAL=1: each launch run forward and under `schedule`, compared
  std::size_t max_dynamic_smem() const { return cc_major >= 9 ? 232448 : 166912; }
  int multiprocessors() const { return cc_major >= 9 ? 132 : 108; }
  std::string describe() const;  // "sm_90, schedule random:7"
};
const Config& config();
// For the emulator's self-test: change the schedule of later launches in this process.
void set_schedule(Schedule s, unsigned long long seed, bool differential = false);

// ---- modules: nkcc images (a tag, a length, a shared object) ----
struct LoadedModule {
  void* handle;
  const Module* table;
  std::string path;
};
// nullptr and a message in *error when the image is not an nkcc module.
LoadedModule* load_module(const void* image, std::string* error);
const Kernel* find_kernel(const LoadedModule* m, const char* name);

// ---- launches ----
struct Dim {
  unsigned x, y, z;
};
// Runs the whole grid on the calling host thread before returning. Returns "" on success, or
// what went wrong (a race check, a divergent barrier, a deadlock), naming the kernel, the
// block, the thread and the source line.
std::string launch(const LoadedModule& m, const Kernel& k, Dim grid, Dim block, std::size_t dynamic_smem,
                   void** params);

// A cuBLAS or cuSOLVER call, for NKEMU_COVERAGE and NKEMU_TRACE.
void note_call(const char* name);

// ---- device memory: host pages between guard pages, poisoned when fresh ----
void* device_alloc(std::size_t bytes);
bool device_free(void* p);  // false: not an allocation's base
// true when [p, p + bytes) lies inside one live allocation
bool device_range_ok(const void* p, std::size_t bytes);
// The live allocation holding p, if any.
bool device_allocation_of(const void* p, void** base, std::size_t* bytes);
std::size_t device_bytes_in_use();
void install_fault_handler();
void ensure_signal_stack();  // on the launching thread, room for the fault handler
// Called by the fault handler: the launch running on this host thread, if any.
std::string current_launch();
}  // namespace nkemu
