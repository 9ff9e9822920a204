// Input checks shared by the CUDA ops (host side, light headers only).
#pragma once
#include <ATen/core/TensorBase.h>
#include <c10/util/Exception.h>

#define EDM_CHECK_CUDA(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor")
#define EDM_CHECK_DTYPE(t, dt) TORCH_CHECK((t).scalar_type() == (dt), #t " must be ", (dt), ", got ", (t).scalar_type())
#define EDM_CHECK_SAME_DEVICE(a, b) TORCH_CHECK((a).device() == (b).device(), #a " and " #b " must be on the same device")
