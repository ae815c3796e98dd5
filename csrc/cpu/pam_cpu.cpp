// CPU backend of fusedwarm.pam: loops only; the arithmetic is fw::pam_* (pam.cuh).
#include "pam_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace fusedwarm {

namespace {

constexpr int64_t kGrain = 1 << 14;

template <fw::PamOp Op>
void elementwise_typed(const float* a, const float* b, float* out, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const float* __restrict pa = a;
    const float* __restrict pb = b;
    float* __restrict po = out;
#pragma omp simd
    for (int64_t k = begin; k < end; ++k) po[k] = fw::pam_apply<Op>(pa[k], pb != nullptr ? pb[k] : 0.0f);
  });
}

}  // namespace

void PamCpu::elementwise(fw::PamOp op, const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const float* pa = a.const_data_ptr<float>();
  const float* pb = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* po = out.data_ptr<float>();
  const int64_t n = a.numel();
  switch (op) {
    case fw::PamOp::kMul: elementwise_typed<fw::PamOp::kMul>(pa, pb, po, n); break;
    case fw::PamOp::kDiv: elementwise_typed<fw::PamOp::kDiv>(pa, pb, po, n); break;
    case fw::PamOp::kSqrt: elementwise_typed<fw::PamOp::kSqrt>(pa, nullptr, po, n); break;
    case fw::PamOp::kExp2: elementwise_typed<fw::PamOp::kExp2>(pa, nullptr, po, n); break;
    case fw::PamOp::kLog2: elementwise_typed<fw::PamOp::kLog2>(pa, nullptr, po, n); break;
  }
}

// C[i, j] = (((0 + PAM(A[i,0], B[0,j])) + PAM(A[i,1], B[1,j])) + ...): strictly sequential over k,
// the order the CUDA kernel uses too, so the two agree bit for bit (a NaN sum stored as the
// canonical NaN). The loop order i, k, j keeps
// that order for every (i, j) while the inner loop runs over contiguous rows of B and C.
void PamCpu::matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const float* A = a.const_data_ptr<float>();
  const float* B = b.const_data_ptr<float>();
  float* C = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, K * N));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* __restrict c = C + i * N;
      for (int64_t j = 0; j < N; ++j) c[j] = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const float aik = A[i * K + k];
        const float* __restrict brow = B + k * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) c[j] = c[j] + fw::pam_mul(aik, brow[j]);
      }
      for (int64_t j = 0; j < N; ++j) c[j] = fw::canonical_nan(c[j]);
    }
  });
}

}  // namespace fusedwarm
