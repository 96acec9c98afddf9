// The emulator's self-test: loads selftest/cases.cu (compiled by nkcc) through the emulated
// driver and checks that every bug kernel is caught, with a message naming the kernel and
// the source line, and that the warp collectives, mma.sync and wmma compute what a direct
// computation gives. Faulting cases run in a child process. Exit status: the failures.
//
//   selftest MODULE_IMAGE
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "nkemu.h"

namespace {
int failures = 0;
CUmodule module;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

CUfunction fn(const char* name) {
  CUfunction f;
  if (cuModuleGetFunction(&f, module, name) != CUDA_SUCCESS) {
    std::printf("FAIL no kernel %s\n", name);
    std::exit(1);
  }
  return f;
}

template <typename T> CUdeviceptr upload(const std::vector<T>& v) {
  CUdeviceptr p;
  cuMemAlloc(&p, v.size() * sizeof(T));
  cuMemcpyHtoD(p, v.data(), v.size() * sizeof(T));
  return p;
}
template <typename T> std::vector<T> download(CUdeviceptr p, size_t n) {
  std::vector<T> v(n);
  cuMemcpyDtoH(v.data(), p, n * sizeof(T));
  return v;
}

CUresult launch(const char* name, unsigned block, std::vector<void*> args, unsigned smem = 0, unsigned grid = 1) {
  return cuLaunchKernel(fn(name), grid, 1, 1, block, 1, 1, smem, nullptr, args.data(), nullptr);
}

// Runs `body` in a child process; returns its exit status and what it wrote to stderr.
std::pair<int, std::string> in_child(const std::function<int()>& body) {
  int pipefd[2];
  if (pipe(pipefd) != 0) std::abort();
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(pipefd[1], 2);
    close(pipefd[0]);
    std::_Exit(body());
  }
  close(pipefd[1]);
  std::string err;
  char buf[4096];
  ssize_t n;
  while ((n = read(pipefd[0], buf, sizeof buf)) > 0) err.append(buf, (size_t)n);
  close(pipefd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return {status, err};
}

bool contains(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }

double max_abs_error(const std::vector<float>& got, const std::vector<double>& want) {
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) worst = std::fmax(worst, std::fabs(got[i] - want[i]));
  return worst;
}

// A launch expected to fail, in a child (a failed launch is sticky, as on a GPU).
void expect_launch_error(const char* name, unsigned block, const char* message, std::vector<int> ints = {}) {
  auto [status, err] = in_child([&] {
    CUdeviceptr out;
    cuMemAlloc(&out, 4096);
    std::vector<void*> args{&out};
    for (int& i : ints) args.push_back(&i);
    return launch(name, block, args) == CUDA_SUCCESS ? 0 : 3;
  });
  const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 3 && contains(err, name) && contains(err, message) &&
                  contains(err, "cases.cu:");
  check(ok, std::string(name) + ": launch fails, naming the kernel and the line (" + message + ")");
  if (!ok || std::getenv("NKEMU_SELFTEST_VERBOSE")) std::printf("     stderr: %s\n", err.c_str());
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: selftest MODULE_IMAGE\n");
    return 2;
  }
  std::ifstream f(argv[1], std::ios::binary);
  std::vector<char> image((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  CUdevice dev;
  CUcontext ctx;
  cuInit(0);
  cuDeviceGet(&dev, 0);
  cuDevicePrimaryCtxRetain(&ctx, dev);
  cuCtxSetCurrent(ctx);
  if (cuModuleLoadData(&module, image.data()) != CUDA_SUCCESS) {
    std::printf("FAIL cannot load %s\n", argv[1]);
    return 1;
  }

  // a race shows as a schedule-dependent result
  {
    CUdeviceptr out = upload(std::vector<int>{0});
    int seen[2];
    const nkemu::Schedule order[2] = {nkemu::Schedule::Forward, nkemu::Schedule::Reverse};
    for (int s = 0; s < 2; ++s) {
      nkemu::set_schedule(order[s], 1);
      launch("race_on_shared", 64, {&out});
      seen[s] = download<int>(out, 1)[0];
    }
    nkemu::set_schedule(nkemu::Schedule::Forward, 1);
    check(seen[0] != seen[1], "race_on_shared: forward and reverse schedules disagree (" + std::to_string(seen[0]) +
                                  " vs " + std::to_string(seen[1]) + ")");
  }
  // ... and, in differential mode, fails the launch by itself
  {
    auto [status, err] = in_child([] {
      nkemu::set_schedule(nkemu::Schedule::Forward, 1, true);
      CUdeviceptr out = upload(std::vector<int>{0});
      return launch("race_on_shared", 64, {&out}) == CUDA_SUCCESS ? 0 : 3;
    });
    const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 3 && contains(err, "race_on_shared") &&
                    contains(err, "depends on the order");
    check(ok, "race_on_shared: NKEMU_DIFFERENTIAL fails the launch (forward and reverse results differ)");
    if (!ok || std::getenv("NKEMU_SELFTEST_VERBOSE")) std::printf("     stderr: %s\n", err.c_str());
    auto [status2, err2] = in_child([] {
      nkemu::set_schedule(nkemu::Schedule::Random, 3, true);
      std::vector<float> host(64, 1.0f);
      CUdeviceptr in = upload(host), out = upload(std::vector<float>(64, 0.f));
      return launch("missing_barrier", 64, {&in, &out}) == CUDA_SUCCESS ? 0 : 3;
    });
    check(WIFEXITED(status2) && WEXITSTATUS(status2) == 3 && contains(err2, "depends on the order"),
          "missing_barrier: NKEMU_DIFFERENTIAL with random:3 fails the launch");
  }
  // a missing barrier, and reads before writes, read the poison (NaN)
  {
    std::vector<float> host(64);
    for (int i = 0; i < 64; ++i) host[i] = (float)i;
    CUdeviceptr in = upload(host), out = upload(std::vector<float>(64, 0.f));
    launch("missing_barrier", 64, {&in, &out});
    int nans = 0;
    for (float v : download<float>(out, 64)) nans += std::isnan(v);
    check(nans > 0, "missing_barrier: " + std::to_string(nans) + " of 64 threads read poisoned shared memory");
    launch("read_before_write", 32, {&out});
    auto r = download<float>(out, 32);
    check(std::isnan(r[0]) && r[1] == 1.0f, "read_before_write: the unwritten static shared element reads NaN");
    launch("read_dynamic_before_write", 32, {&out}, 128);
    r = download<float>(out, 32);
    check(std::isnan(r[0]) && std::isnan(r[31]), "read_dynamic_before_write: dynamic shared memory reads NaN");
    CUdeviceptr fresh;
    cuMemAlloc(&fresh, 16);
    check(std::isnan(download<float>(fresh, 4)[2]), "cuMemAlloc: fresh device memory reads NaN");
  }
  // an out-of-bounds store faults, naming the kernel and the allocation
  {
    auto [status, err] = in_child([] {
      CUdeviceptr out;
      cuMemAlloc(&out, 100 * sizeof(float));
      int n = 100;
      launch("store_out_of_bounds", 128, {&out, &n});
      return 0;
    });
    const bool ok = WIFSIGNALED(status) && contains(err, "store_out_of_bounds") && contains(err, "past the end");
    check(ok, "store_out_of_bounds: faults at the first element past the end, naming the kernel");
    if (!ok || std::getenv("NKEMU_SELFTEST_VERBOSE")) std::printf("     stderr: %s\n", err.c_str());
  }
  expect_launch_error("partial_barrier", 32, "part of the block");
  expect_launch_error("barrier_after_exit", 64, "part of the block", {40});
  expect_launch_error("partial_shuffle", 32, "exited");
  expect_launch_error("deadlock", 32, "deadlock");
  {
    auto [status, err] = in_child([] {
      CUdeviceptr out;
      cuMemAlloc(&out, 4096);
      return launch("bounded_to_64", 128, {&out}) == CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES ? 3 : 0;
    });
    check(WIFEXITED(status) && WEXITSTATUS(status) == 3 && contains(err, "__launch_bounds__"),
          "bounded_to_64: a 128-thread launch fails as over its __launch_bounds__");
    CUdeviceptr out = upload(std::vector<int>(64, 0));
    check(launch("read_dynamic_before_write", 32, {&out}, 64 * 1024) == CUDA_ERROR_INVALID_VALUE,
          "a launch with 64 KiB of dynamic shared memory fails without the function attribute");
    CUfunction f = fn("read_dynamic_before_write");
    const int too_much = (int)nkemu::config().max_dynamic_smem() + 1;
    check(cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, too_much) == CUDA_ERROR_INVALID_VALUE,
          "asking for more dynamic shared memory than the device has fails");
  }
  // the device model against direct computations
  {
    std::vector<int> in(32);
    int want_sum = 0;
    unsigned want_ballot = 0;
    for (int i = 0; i < 32; ++i) {
      in[i] = (i * 7 + 3) % 11;
      want_sum += in[i];
      if (in[i] & 1) want_ballot |= 1u << i;
    }
    CUdeviceptr din = upload(in), sum = upload(std::vector<int>(3, 0)), ballot = upload(std::vector<unsigned>(1, 0));
    launch("warp_collectives", 32, {&din, &sum, &ballot});
    auto s = download<int>(sum, 3);
    const int want_mix = in[6] + 1000 * in[4] + 1000000 * in[3];
    check(s[0] == want_sum && download<unsigned>(ballot, 1)[0] == want_ballot &&
              s[1] == __builtin_popcount(want_ballot) && s[2] == want_mix,
          "warp_collectives: xor-shuffle sum, ballot, popc, shfl_down/up/idx");
  }
  {
    std::vector<__half> a(256), b(128);
    std::vector<double> want(128, 0.0);
    for (int i = 0; i < 256; ++i) a[i] = __float2half((float)((i * 5) % 13 - 6) / 4);
    for (int i = 0; i < 128; ++i) b[i] = __float2half((float)((i * 3) % 7 - 3) / 2);
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 8; ++c)
        for (int k = 0; k < 16; ++k) want[r * 8 + c] += (double)__half2float(a[r * 16 + k]) * __half2float(b[k * 8 + c]);
    CUdeviceptr da = upload(a), db = upload(b), dd = upload(std::vector<float>(128, 0.f));
    launch("mma_m16n8k16_f16", 32, {&da, &db, &dd});
    const double worst = max_abs_error(download<float>(dd, 128), want);
    check(worst < 1e-5, "mma_m16n8k16_f16: the PTX ISA fragment layout gives A·B (max error " + std::to_string(worst) + ")");
  }
  {
    std::vector<__nv_bfloat16> a(256), b(256);
    std::vector<double> want(256, 0.0);
    for (int i = 0; i < 256; ++i) {
      a[i] = __float2bfloat16((float)((i * 5) % 17 - 8) / 8);
      b[i] = __float2bfloat16((float)((i * 11) % 9 - 4) / 4);
    }
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c)
        for (int k = 0; k < 16; ++k)
          want[r * 16 + c] += (double)__bfloat162float(a[r * 16 + k]) * __bfloat162float(b[c * 16 + k]);
    CUdeviceptr da = upload(a), db = upload(b), dc = upload(std::vector<float>(256, 0.f));
    launch("wmma_16x16x16_bf16", 32, {&da, &db, &dc});
    const double worst = max_abs_error(download<float>(dc, 256), want);
    check(worst < 1e-5, "wmma_16x16x16_bf16: A·B (max error " + std::to_string(worst) + ")");
  }
  {  // not a check: how fast a switch is (each thread goes to the scheduler and back per barrier)
    CUdeviceptr out = upload(std::vector<int>(256, 0));
    int n = 2000;
    const auto t0 = std::chrono::steady_clock::now();
    launch("barrier_loop", 256, {&out, &n});
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("info 256 threads x %d barriers: %.3f s, %.1f ns per switch\n", n, s, s / (2.0 * 256 * n) * 1e9);
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures;
}
