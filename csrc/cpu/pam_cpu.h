#pragma once
#include "../pam_impl.h"

namespace fusedwarm {

// CPU backend of fusedwarm.pam (see pam_impl.h for the contract).
struct PamCpu {
  static void elementwise(fw::PamOp op, const at::Tensor& a, const at::Tensor& b, at::Tensor& out);
  static void matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& out);
};

}  // namespace fusedwarm
