// driver.cpp -> libcuda.so: the part of the CUDA driver API that cudarc 0.19 calls for
// neurokernels, on the host. cudarc opens the driver by its bare name (libcuda.so), so
// LD_LIBRARY_PATH selects this one.
//
// One device, named as an emulator, with the limits of an A100 (NKEMU_CC=8.0) or an H100
// (9.0, the default). Device memory is host memory (memory.cpp); every stream operation runs
// to completion when it is called, which is one valid order of the asynchronous semantics
// (and so cannot show a missing synchronization between two streams). Launches are checked
// as the driver checks them (grid and block limits, __launch_bounds__, dynamic shared memory
// against the function's attribute and the device's opt-in maximum); an error found during a
// launch is printed, returned, and sticky, as a kernel fault is on a GPU.
#include <cuda.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "nkemu.h"

// cuda.h maps these to their _v2 names; cudarc may ask for either
#undef cuDeviceGetUuid
#undef cuEventElapsedTime

namespace {
struct Context {
  int device;
} primary{0};
thread_local CUcontext current = nullptr;
std::atomic<bool> sticky_failure{false};

struct Function {
  const nkemu::LoadedModule* module;
  const nkemu::Kernel* kernel;
  int max_dynamic_smem;
};
struct Event {
  double seconds;
};

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

CUresult unsupported(const char* what) {
  std::fprintf(stderr, "nkemu: unsupported driver call: %s\n", what);
  return CUDA_ERROR_NOT_SUPPORTED;
}
CUresult checked() { return sticky_failure ? CUDA_ERROR_LAUNCH_FAILED : CUDA_SUCCESS; }
CUresult copy(void* dst, const void* src, size_t n, bool dst_device, bool src_device) {
  if (sticky_failure) return CUDA_ERROR_LAUNCH_FAILED;
  if ((dst_device && !nkemu::device_range_ok(dst, n)) || (src_device && !nkemu::device_range_ok(src, n))) {
    std::fprintf(stderr, "nkemu: a %zu-byte copy outside a device allocation (dst %p, src %p)\n", n, dst, src);
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (n) std::memmove(dst, src, n);
  return CUDA_SUCCESS;
}
}  // namespace

extern "C" {
CUresult cuInit(unsigned int) {
  nkemu::install_fault_handler();
  return CUDA_SUCCESS;
}
CUresult cuDriverGetVersion(int* v) {
  *v = 13000;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetCount(int* n) {
  *n = 1;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
  *d = 0;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
  std::snprintf(name, (size_t)len, "nkemu: neurokernels' CUDA emulator (%s)", nkemu::config().describe().c_str());
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid(CUuuid* u, CUdevice) {
  std::memset(u, 0x4e, sizeof *u);
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid_v2(CUuuid* u, CUdevice d) { return cuDeviceGetUuid(u, d); }
CUresult cuDeviceTotalMem_v2(size_t* b, CUdevice) {
  *b = 80ull << 30;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice) {
  const nkemu::Config& c = nkemu::config();
  switch (a) {
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X:
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: *v = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: *v = 64; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *v = 2147483647; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y:
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *v = 65535; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = 49152; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = (int)c.max_dynamic_smem(); break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *v = (int)c.max_dynamic_smem() + 1024; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = c.multiprocessors(); break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: *v = 2048; break;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *v = 65536; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = c.cc_major; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = c.cc_minor; break;
    case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: *v = 0; break;  // cudarc then uses cuMemAlloc/cuMemFree
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *v = 1; break;
    default: *v = 0;
  }
  return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
  *c = (CUcontext)&primary;
  return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext* c) {
  *c = current;
  return CUDA_SUCCESS;
}
CUresult cuCtxSetCurrent(CUcontext c) {
  current = c;
  return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() { return checked(); }
CUresult cuCtxGetDevice(CUdevice* d) {
  *d = 0;
  return CUDA_SUCCESS;
}
CUresult cuCtxSetFlags(unsigned int) { return CUDA_SUCCESS; }
CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
  *least = 0;
  *greatest = -5;
  return CUDA_SUCCESS;
}
CUresult cuCtxSetLimit(CUlimit, size_t) { return CUDA_SUCCESS; }
CUresult cuCtxGetLimit(size_t* v, CUlimit) {
  *v = 0;
  return CUDA_SUCCESS;
}

// streams and events: every operation has completed when its call returns
CUresult cuStreamCreate(CUstream* s, unsigned int) {
  *s = (CUstream) new char[1];
  return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned int f, int) { return cuStreamCreate(s, f); }
CUresult cuStreamDestroy_v2(CUstream s) {
  delete[] (char*)s;
  return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(CUstream) { return checked(); }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned int) { return checked(); }
CUresult cuStreamQuery(CUstream) { return checked(); }
CUresult cuStreamIsCapturing(CUstream, CUstreamCaptureStatus* s) {
  *s = CU_STREAM_CAPTURE_STATUS_NONE;
  return CUDA_SUCCESS;
}
CUresult cuEventCreate(CUevent* e, unsigned int) {
  *e = (CUevent) new Event{now()};
  return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(CUevent e) {
  delete (Event*)e;
  return CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent e, CUstream) {
  ((Event*)e)->seconds = now();
  return checked();
}
CUresult cuEventSynchronize(CUevent) { return checked(); }
CUresult cuEventQuery(CUevent) { return checked(); }
CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
  *ms = (float)((((Event*)b)->seconds - ((Event*)a)->seconds) * 1e3);
  return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

// memory
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
  void* m = nkemu::device_alloc(bytes);
  if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
  *p = (CUdeviceptr)m;
  return CUDA_SUCCESS;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
  if (!p) return CUDA_SUCCESS;
  if (!nkemu::device_free((void*)p)) {
    std::fprintf(stderr, "nkemu: cuMemFree of 0x%llx, which is not the start of a live allocation\n", p);
    return CUDA_ERROR_INVALID_VALUE;
  }
  return CUDA_SUCCESS;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return cuMemAlloc_v2(p, bytes); }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return cuMemFree_v2(p); }
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
  *total = 80ull << 30;
  *free_bytes = *total - nkemu::device_bytes_in_use();
  return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) { return copy((void*)d, h, n, true, false); }
CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) { return copy(h, (const void*)d, n, false, true); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) { return copy((void*)d, (const void*)s, n, true, true); }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, CUstream) { return cuMemcpyHtoD_v2(d, h, n); }
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, CUstream) { return cuMemcpyDtoH_v2(h, d, n); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream) { return cuMemcpyDtoD_v2(d, s, n); }
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
  if (sticky_failure) return CUDA_ERROR_LAUNCH_FAILED;
  if (!nkemu::device_range_ok((void*)d, n)) {
    std::fprintf(stderr, "nkemu: a %zu-byte memset outside a device allocation (0x%llx)\n", n, d);
    return CUDA_ERROR_INVALID_VALUE;
  }
  std::memset((void*)d, v, n);
  return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream) { return cuMemsetD8_v2(d, v, n); }
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned int) {
  *p = std::malloc(bytes ? bytes : 1);
  return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void* p) {
  std::free(p);
  return CUDA_SUCCESS;
}

// modules and functions
CUresult cuModuleLoadData(CUmodule* m, const void* image) {
  std::string error;
  nkemu::LoadedModule* loaded = nkemu::load_module(image, &error);
  if (!loaded) {
    std::fprintf(stderr, "nkemu: cuModuleLoadData: %s\n", error.c_str());
    return CUDA_ERROR_INVALID_IMAGE;
  }
  *m = (CUmodule)loaded;
  return CUDA_SUCCESS;
}
CUresult cuModuleUnload(CUmodule) { return CUDA_SUCCESS; }  // stays loaded: other contexts may use its code
CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
  const auto* loaded = (const nkemu::LoadedModule*)m;
  const nkemu::Kernel* k = nkemu::find_kernel(loaded, name);
  if (!k) return CUDA_ERROR_NOT_FOUND;
  // one handle per kernel, as the driver gives: its attributes persist between lookups (and
  // the crate looks a kernel up before every launch)
  static std::mutex mu;
  static std::map<const nkemu::Kernel*, Function*> functions;
  std::lock_guard<std::mutex> lock(mu);
  Function*& fn = functions[k];
  if (!fn) fn = new Function{loaded, k, 49152};
  *f = (CUfunction)fn;
  return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, CUfunction_attribute a, CUfunction f) {
  const Function* fn = (const Function*)f;
  switch (a) {
    case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = fn->kernel->max_threads; break;
    // unknown without ptxas: scripts/check-kernels.sh reports the real figures
    case CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: *v = 0; break;
    case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *v = fn->max_dynamic_smem; break;
    case CU_FUNC_ATTRIBUTE_NUM_REGS: *v = 64; break;
    case CU_FUNC_ATTRIBUTE_PTX_VERSION:
    case CU_FUNC_ATTRIBUTE_BINARY_VERSION: *v = nkemu::config().cc_major * 10; break;
    default: *v = 0;
  }
  return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) {
  if (a == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
    if (v < 0 || (size_t)v > nkemu::config().max_dynamic_smem()) {
      std::fprintf(stderr, "nkemu: %s: %d bytes of dynamic shared memory requested, the device allows %zu\n",
                   ((Function*)f)->kernel->name, v, nkemu::config().max_dynamic_smem());
      return CUDA_ERROR_INVALID_VALUE;
    }
    ((Function*)f)->max_dynamic_smem = v;
  }
  return CUDA_SUCCESS;
}
CUresult cuFuncSetCacheConfig(CUfunction, CUfunc_cache) { return CUDA_SUCCESS; }

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, CUstream, void** params, void** extra) {
  if (sticky_failure) return CUDA_ERROR_LAUNCH_FAILED;
  const Function* fn = (const Function*)f;
  if (extra) return unsupported("cuLaunchKernel with `extra`");
  const unsigned long long threads = (unsigned long long)bx * by * bz;
  if (!gx || !gy || !gz || !bx || !by || !bz || gy > 65535 || gz > 65535 || bx > 1024 || by > 1024 || bz > 64 ||
      threads > 1024) {
    std::fprintf(stderr, "nkemu: %s: invalid launch: grid (%u,%u,%u) block (%u,%u,%u)\n", fn->kernel->name, gx, gy, gz,
                 bx, by, bz);
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (threads > (unsigned long long)fn->kernel->max_threads) {
    std::fprintf(stderr, "nkemu: %s: a block of %llu threads over its __launch_bounds__ of %d\n", fn->kernel->name,
                 threads, fn->kernel->max_threads);
    return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
  }
  if ((int)smem > fn->max_dynamic_smem) {
    std::fprintf(stderr, "nkemu: %s: %u bytes of dynamic shared memory over the function's limit of %d\n",
                 fn->kernel->name, smem, fn->max_dynamic_smem);
    return CUDA_ERROR_INVALID_VALUE;
  }
  const std::string error = nkemu::launch(*fn->module, *fn->kernel, {gx, gy, gz}, {bx, by, bz}, smem, params);
  if (!error.empty()) {
    std::fprintf(stderr, "nkemu: %s\n", error.c_str());
    std::fflush(stderr);
    sticky_failure = true;
    return CUDA_ERROR_LAUNCH_FAILED;
  }
  return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult e, const char** s) {
  switch (e) {
    case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
    case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
    case CUDA_ERROR_LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *s = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; break;
    case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
    default: *s = "CUDA_ERROR_UNKNOWN";
  }
  return CUDA_SUCCESS;
}
CUresult cuGetErrorString(CUresult e, const char** s) {
  cuGetErrorName(e, s);
  if (e == CUDA_ERROR_LAUNCH_FAILED) *s = "a kernel failed under the emulator (its message is on stderr)";
  return CUDA_SUCCESS;
}
}  // extern "C"
