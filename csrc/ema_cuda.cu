// CUDA kernel of ema_update_: the multi-rate EMA of a whole model in one launch. The math and the
// argument rules are those of ema_cpu.cpp; the checks themselves are shared (ema.h).
//
// Multi-tensor apply with the tensor table in device memory. The parameters are cut into chunks of
// kEmaChunk elements; a chunk table (tensor, chunk) and a tensor table (parameter pointer, numel,
// dtype, copies' pointers) are uploaded once and cached, and one grid-strided launch walks all
// chunks, however many tensors there are. A call with the same tensors (every training step)
// reuses the cached table: no copy, one launch, and it stays valid inside CUDA graphs (tables used
// during a capture are kept alive for the graph's replays).
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <map>
#include <mutex>

#include "cuda_utils.cuh"
#include "ema.h"

namespace cmkernels {
namespace {

constexpr int64_t kEmaChunk = 16384;  // elements of one tensor a block owns at a time
constexpr int kEmaThreads = 512;
constexpr int kEmaVec = 4;            // float4 for the copies (16-byte accesses)

enum EmaDtype : int32_t { kEmaF32 = 0, kEmaBF16 = 1, kEmaF16 = 2 };

struct EmaTensor {
  const void* param;  // parameter i, flat (fp32 / bf16 / fp16, see dtype)
  int64_t numel;
  int32_t dtype;      // EmaDtype
  int32_t vec_ok;     // param and all copies aligned for kEmaVec-wide accesses
};

struct EmaChunk {
  int32_t tensor;  // index into the tensor table
  int32_t chunk;   // elements [chunk * kEmaChunk, ...) of that tensor
};

// Kernel arguments: the tables live in device memory; only the rates travel by value.
struct EmaArgs {
  const EmaTensor* tensors;  // [P]
  float* const* emas;        // [K * P], rate-major: copy k of tensor i at k * P + i
  const EmaChunk* chunks;    // [num_chunks]
  int64_t num_chunks;
  int32_t P, K;
  float rate[kMaxEmaRates];  // r_k
  float mix[kMaxEmaRates];   // 1 - r_k
};

// One chunk of one tensor: the parameter is read once, then all K copies are loaded before any
// is stored (the compiler cannot know the copies do not alias, so interleaving load and store
// per copy would serialise K memory round trips). K is a template argument so the registers
// scale with it (K = 3: ~40, enough for full occupancy).
template <int K, typename p_t>
__device__ __forceinline__ void ema_chunk(const EmaArgs& a, const p_t* p, float* const* e,
                                          int64_t n, bool vec) {
  int64_t done = 0;
  if (vec) {
    const int64_t nvec = n / kEmaVec;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const auto pv = reinterpret_cast<const Pack<p_t, kEmaVec>*>(p)[v];
      float4 ev[K];
#pragma unroll
      for (int k = 0; k < K; ++k) ev[k] = reinterpret_cast<const float4*>(e[k])[v];
      const float p0 = float(pv.v[0]), p1 = float(pv.v[1]), p2 = float(pv.v[2]),
                  p3 = float(pv.v[3]);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const float r = a.rate[k], c = a.mix[k];
        ev[k].x = r * ev[k].x + c * p0;
        ev[k].y = r * ev[k].y + c * p1;
        ev[k].z = r * ev[k].z + c * p2;
        ev[k].w = r * ev[k].w + c * p3;
        reinterpret_cast<float4*>(e[k])[v] = ev[k];
      }
    }
    done = nvec * kEmaVec;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    const float pf = float(p[i]);
    float ev[K];
#pragma unroll
    for (int k = 0; k < K; ++k) ev[k] = e[k][i];
#pragma unroll
    for (int k = 0; k < K; ++k) e[k][i] = a.rate[k] * ev[k] + a.mix[k] * pf;
  }
}

template <int K>
__global__ void __launch_bounds__(kEmaThreads) ema_update_kernel(const EmaArgs a) {
  for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x) {
    const EmaChunk ch = a.chunks[c];
    const EmaTensor t = a.tensors[ch.tensor];
    const int64_t begin = int64_t(ch.chunk) * kEmaChunk;
    const int64_t left = t.numel - begin, n = left < kEmaChunk ? left : kEmaChunk;
    float* e[K];
#pragma unroll
    for (int k = 0; k < K; ++k) e[k] = a.emas[int64_t(k) * a.P + ch.tensor] + begin;
    switch (t.dtype) {
      case kEmaF32:
        ema_chunk<K>(a, static_cast<const float*>(t.param) + begin, e, n, t.vec_ok);
        break;
      case kEmaBF16:
        ema_chunk<K>(a, static_cast<const at::BFloat16*>(t.param) + begin, e, n, t.vec_ok);
        break;
      default:
        ema_chunk<K>(a, static_cast<const at::Half*>(t.param) + begin, e, n, t.vec_ok);
        break;
    }
  }
}

template <int K>
void launch_ema(const EmaArgs& a, int64_t blocks, cudaStream_t stream) {
  ema_update_kernel<K><<<unsigned(blocks), kEmaThreads, 0, stream>>>(a);
}

// The tables of one call, as one byte blob: [EmaTensor x P][float* x K*P][EmaChunk x chunks].
struct EmaTables {
  std::vector<uint8_t> blob;
  int64_t emas_offset = 0, chunks_offset = 0, num_chunks = 0;
};

EmaTables ema_tables(const EmaProblem& p, at::TensorList emas) {
  std::vector<EmaTensor> tensors(p.P);
  std::vector<float*> ptrs(p.K * p.P);
  std::vector<EmaChunk> chunks;
  for (int64_t i = 0; i < p.P; ++i) {
    const at::Tensor& param = p.params[i];
    const auto st = param.scalar_type();
    const int32_t dtype = st == at::kFloat ? kEmaF32 : st == at::kBFloat16 ? kEmaBF16 : kEmaF16;
    bool vec_ok = reinterpret_cast<uintptr_t>(param.const_data_ptr()) %
                      (param.element_size() * kEmaVec) == 0;
    for (int64_t k = 0; k < p.K; ++k) {
      ptrs[k * p.P + i] = emas[k * p.P + i].mutable_data_ptr<float>();
      vec_ok = vec_ok && aligned_to<float>(ptrs[k * p.P + i], kEmaVec);
    }
    const int64_t n = param.numel();
    tensors[i] = {param.const_data_ptr(), n, dtype, vec_ok ? 1 : 0};
    TORCH_CHECK(i <= INT32_MAX && (n + kEmaChunk - 1) / kEmaChunk <= INT32_MAX,
                "ema_update_: too many tensors or elements for the chunk table");
    for (int64_t c = 0; c * kEmaChunk < n; ++c)
      chunks.push_back({static_cast<int32_t>(i), static_cast<int32_t>(c)});
  }
  EmaTables out;
  const size_t tb = tensors.size() * sizeof(EmaTensor), pb = ptrs.size() * sizeof(float*),
               cb = chunks.size() * sizeof(EmaChunk);
  out.blob.resize(tb + pb + cb);
  std::memcpy(out.blob.data(), tensors.data(), tb);
  std::memcpy(out.blob.data() + tb, ptrs.data(), pb);
  if (cb) std::memcpy(out.blob.data() + tb + pb, chunks.data(), cb);
  out.emas_offset = static_cast<int64_t>(tb);
  out.chunks_offset = static_cast<int64_t>(tb + pb);
  out.num_chunks = static_cast<int64_t>(chunks.size());
  return out;
}

// The last tables uploaded per device. A hit (same bytes, same stream) skips the upload. Tables
// read by a captured CUDA graph are never freed: the graph's replays read them (and a graph that
// captured the upload itself replays the copy from its pinned host buffer, so that is kept too).
struct EmaTableCache {
  std::vector<uint8_t> blob;
  at::Tensor host_blob, device_blob;
  cudaStream_t stream = nullptr;
  bool captured = false;
};
std::mutex ema_cache_mutex;
std::map<c10::DeviceIndex, EmaTableCache> ema_cache;
std::vector<at::Tensor> ema_captured_tables;
std::vector<void*> ema_captured_host_buffers;  // pinned, read by captured copy nodes: never freed

// Upload during a stream capture (a cache miss inside torch.cuda.graph). torch's pinned host
// allocator records events on the current stream, which a capture forbids, so the host buffer
// comes straight from cudaHostAlloc (in relaxed capture mode, which permits the call) and the
// copy is a cudaMemcpyAsync that the graph records as a node. The device buffer comes from the
// graph's private memory pool.
at::Tensor ema_upload_captured(const std::vector<uint8_t>& blob, const at::Device& device,
                               cudaStream_t stream) {
  const size_t n = blob.size();
  void* host = nullptr;
  {
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed{cudaStreamCaptureModeRelaxed};
    C10_CUDA_CHECK(cudaHostAlloc(&host, n, cudaHostAllocDefault));
  }
  ema_captured_host_buffers.push_back(host);
  std::memcpy(host, blob.data(), n);
  at::Tensor dev = at::empty({static_cast<int64_t>(n)},
                             at::TensorOptions().dtype(at::kByte).device(device));
  C10_CUDA_CHECK(cudaMemcpyAsync(dev.mutable_data_ptr<uint8_t>(), host, n,
                                 cudaMemcpyHostToDevice, stream));
  return dev;
}

// Returns the device copy of the tables (a reference that keeps it alive through the launch).
at::Tensor ema_device_tables(const EmaTables& tables, const at::Device& device,
                             cudaStream_t stream) {
  const bool capturing =
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  std::lock_guard<std::mutex> lock(ema_cache_mutex);
  EmaTableCache& entry = ema_cache[device.index()];
  if (!(entry.device_blob.defined() && entry.stream == stream && entry.blob == tables.blob)) {
    if (entry.captured) {
      if (entry.host_blob.defined()) ema_captured_tables.push_back(entry.host_blob);
      ema_captured_tables.push_back(entry.device_blob);
    }
    if (capturing) {
      entry.host_blob = at::Tensor();
      entry.device_blob = ema_upload_captured(tables.blob, device, stream);
    } else {
      const int64_t n = static_cast<int64_t>(tables.blob.size());
      entry.host_blob = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      std::memcpy(entry.host_blob.mutable_data_ptr<uint8_t>(), tables.blob.data(), n);
      entry.device_blob = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(device));
      entry.device_blob.copy_(entry.host_blob, /*non_blocking=*/true);
    }
    entry.blob = tables.blob;
    entry.stream = stream;
    entry.captured = false;
  }
  entry.captured = entry.captured || capturing;
  return entry.device_blob;
}

void ema_update_cuda(at::TensorList params, at::TensorList emas, at::ArrayRef<double> rates) {
  const EmaProblem p = ema_check(params, emas, rates);
  if (p.P == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const EmaTables tables = ema_tables(p, emas);
  if (tables.num_chunks == 0) return;  // only empty tensors
  const at::Tensor dev_tables = ema_device_tables(tables, params[0].device(), stream.stream());
  const uint8_t* dev = dev_tables.const_data_ptr<uint8_t>();
  EmaArgs a{};
  a.tensors = reinterpret_cast<const EmaTensor*>(dev);
  a.emas = reinterpret_cast<float* const*>(dev + tables.emas_offset);
  a.chunks = reinterpret_cast<const EmaChunk*>(dev + tables.chunks_offset);
  a.num_chunks = tables.num_chunks;
  a.P = static_cast<int32_t>(p.P);
  a.K = static_cast<int32_t>(p.K);
  for (int64_t k = 0; k < p.K; ++k) {
    a.rate[k] = p.rate[k];
    a.mix[k] = p.mix[k];
  }
  const int64_t blocks =
      std::min<int64_t>(tables.num_chunks, int64_t(sm_count()) * (2048 / kEmaThreads));
  static_assert(kMaxEmaRates == 8, "one launch_ema case per K");
  switch (p.K) {
    case 1: launch_ema<1>(a, blocks, stream); break;
    case 2: launch_ema<2>(a, blocks, stream); break;
    case 3: launch_ema<3>(a, blocks, stream); break;
    case 4: launch_ema<4>(a, blocks, stream); break;
    case 5: launch_ema<5>(a, blocks, stream); break;
    case 6: launch_ema<6>(a, blocks, stream); break;
    case 7: launch_ema<7>(a, blocks, stream); break;
    default: launch_ema<8>(a, blocks, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(cmkernels, CUDA, m) { m.impl("ema_update_", &ema_update_cuda); }

}  // namespace cmkernels
