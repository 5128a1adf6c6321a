// Argument checks shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <utility>

namespace resalign {

// Every tensor must match the first one in device, dtype and size, and be contiguous.
inline void check_buffers(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  const auto& first = *ts.begin();
  const at::Tensor& ref = *first.second;
  for (const auto& [name, t] : ts) {
    TORCH_CHECK(t->defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t->device() == ref.device(), op, ": ", name, " is on ", t->device(), ", ",
                first.first, " on ", ref.device());
    TORCH_CHECK(t->scalar_type() == ref.scalar_type(), op, ": ", name, " is ", t->scalar_type(),
                ", ", first.first, " is ", ref.scalar_type());
    TORCH_CHECK(t->numel() == ref.numel(), op, ": ", name, " has ", t->numel(), " elements, ",
                first.first, " has ", ref.numel());
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  }
}

// The caller's output buffer (checked like the inputs; the Python wrappers reject overlaps) or a
// new one like `like`.
inline at::Tensor output_like(const std::optional<at::Tensor>& out, const at::Tensor& like, const char* op) {
  if (!out.has_value()) return at::empty_like(like);
  check_buffers(op, {{"input", &like}, {"out", &*out}});
  return *out;
}

}  // namespace resalign
