// Operator implementations of fusedwarm.pam (Kosson & Jaggi 2023), generic over a backend that
// provides
//   static void elementwise(fw::PamOp op, const at::Tensor& a, const at::Tensor& b, at::Tensor& out);
//   static void matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& out);
// (contiguous float32 tensors on one device, out preallocated; b is undefined for unary ops).
// The argument checks live here so that both dispatch keys reject bad input the same way.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "fusedwarm/pam.cuh"

namespace fusedwarm {

inline void check_pam_operand(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.layout() == at::kStrided, "fusedwarm.", op, ": ", name, " must be a dense (strided) tensor, got ",
              t.layout());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fusedwarm.", op, ": ", name, " must be float32, got ",
              t.scalar_type(), " (fusedwarm.pam computes bfloat16/float16 through float32)");
}

template <class Backend>
struct PamImpls {
  static at::Tensor unary(const char* name, fw::PamOp op, const at::Tensor& a) {
    check_pam_operand(name, "a", a);
    const at::Tensor ac = a.contiguous();
    at::Tensor out = at::empty_like(ac);
    if (ac.numel() > 0) Backend::elementwise(op, ac, at::Tensor(), out);
    return out;
  }

  static at::Tensor binary(const char* name, fw::PamOp op, const at::Tensor& a, const at::Tensor& b) {
    check_pam_operand(name, "a", a);
    check_pam_operand(name, "b", b);
    TORCH_CHECK(a.device() == b.device(), "fusedwarm.", name, ": a is on ", a.device(), " but b is on ", b.device());
    TORCH_CHECK(a.sizes() == b.sizes(), "fusedwarm.", name, ": a and b must have the same shape, got ", a.sizes(),
                " and ", b.sizes(), " (fusedwarm.pam broadcasts before calling the op)");
    const at::Tensor ac = a.contiguous(), bc = b.contiguous();
    at::Tensor out = at::empty_like(ac);
    if (ac.numel() > 0) Backend::elementwise(op, ac, bc, out);
    return out;
  }

  static at::Tensor mul(const at::Tensor& a, const at::Tensor& b) { return binary("pam_mul", fw::PamOp::kMul, a, b); }
  static at::Tensor div(const at::Tensor& a, const at::Tensor& b) { return binary("pam_div", fw::PamOp::kDiv, a, b); }
  static at::Tensor sqrt(const at::Tensor& a) { return unary("pam_sqrt", fw::PamOp::kSqrt, a); }
  static at::Tensor exp2(const at::Tensor& a) { return unary("pam_exp2", fw::PamOp::kExp2, a); }
  static at::Tensor log2(const at::Tensor& a) { return unary("pam_log2", fw::PamOp::kLog2, a); }

  static at::Tensor matmul(const at::Tensor& a, const at::Tensor& b) {
    check_pam_operand("pam_matmul", "a", a);
    check_pam_operand("pam_matmul", "b", b);
    TORCH_CHECK(a.device() == b.device(), "fusedwarm.pam_matmul: a is on ", a.device(), " but b is on ",
                b.device());
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "fusedwarm.pam_matmul: a and b must be 2-D, got shapes ", a.sizes(),
                " and ", b.sizes());
    TORCH_CHECK(a.size(1) == b.size(0), "fusedwarm.pam_matmul: shapes ", a.sizes(), " and ", b.sizes(),
                " cannot be multiplied (", a.size(1), " != ", b.size(0), ")");
    TORCH_CHECK(a.size(1) <= 0x7FFFFFFF && a.size(0) <= 0x7FFFFFFF && b.size(1) <= 0x7FFFFFFF,
                "fusedwarm.pam_matmul: dimensions must fit in 31 bits, got ", a.sizes(), " and ", b.sizes());
    const at::Tensor ac = a.contiguous(), bc = b.contiguous();
    at::Tensor out = at::empty({a.size(0), b.size(1)}, ac.options());
    if (out.numel() > 0) Backend::matmul(ac, bc, out);
    return out;
  }
};

}  // namespace fusedwarm
