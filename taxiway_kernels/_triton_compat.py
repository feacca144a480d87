"""Small helpers shared by the Triton kernels: interpreter detection, device checks, SM count.

Imports triton, so only the Triton submodules (and tests/bench) import this module.
"""

from __future__ import annotations

import functools
import os

import torch

# Set by tools that compile kernels for sm_90 on a machine without a GPU (bench/compile_report.py):
# wrappers then accept CPU tensors and the launch only compiles.
ALLOW_CPU_TENSORS = False


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    """Every tensor of one call must sit on `device`, a CUDA device unless interpreting."""
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the first tensor")
    if t.device.type != "cuda" and not (interpreting() or ALLOW_CPU_TENSORS):
        raise ValueError(f"{name} is on {t.device}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 in its last dim, got strides {tuple(t.stride())}")


def v_token_major(v_cache: torch.Tensor) -> bool:
    """V [num_blocks, num_kv_heads, block_size, head_dim] stored [.., head_dim, block_size] and
    viewed as the usual shape: each block's tokens contiguous for each dimension, every run starting
    at a multiple of the block size (the attention kernels assert both to the compiler)."""
    bs = v_cache.shape[2]
    return (v_cache.stride(2) == 1 and v_cache.stride(3) == bs and v_cache.shape[3] > 1
            and v_cache.stride(0) % bs == 0 and v_cache.stride(1) % bs == 0)


def check_v_cache_layout(v_cache: torch.Tensor) -> None:
    """Contiguous head_dim (the usual layout) or token-major (v_token_major)."""
    if v_cache.stride(3) != 1 and not v_token_major(v_cache):
        raise ValueError(f"v_cache must have contiguous head_dim, or tokens contiguous within each block "
                         f"(strides [..., 1, block_size]: a transposed view); got strides {tuple(v_cache.stride())}")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{name} has dtype {t.dtype}, expected one of {allowed}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype (for a kernel's dtype constexpr)."""
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of `device`; a fixed 4 off CUDA (interpreter runs), so tests see splits."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def patch_interpreter() -> None:
    """Fix two defects of Triton 3.6's CPU interpreter; no effect on GPU runs.

    1. tl.dot on bf16: the interpreter stores bf16 as uint16 and multiplies the raw integers. On
       the GPU a bf16 dot multiplies exactly and accumulates in fp32, as upcasting both does.
    2. float32 -> bf16 casts truncate; the GPU rounds to nearest even.
    3. A scalar loaded from memory is a 1-element array, and int() of it (range bounds) fails
       with numpy >= 2.3.
    4. Casts to and from float8e4nv (E4M3) flush subnormals to zero; the GPU (and torch) keep
       them. Such casts go through torch's float8_e4m3fn conversion instead (round to nearest even).
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    if getattr(interp.InterpreterBuilder, "_taxiway_bf16_dot", False):
        return
    original = interp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            up = [interp.TensorHandle(
                (x.data.astype(np.uint32) << 16).view(np.float32), tl.float32) for x in (a, b)]
            a, b = up
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interp.InterpreterBuilder.create_dot = create_dot
    interp.InterpreterBuilder._taxiway_bf16_dot = True

    cast = interp.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even (no NaNs here)
            return interp.TensorHandle(bits.astype(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    interp.InterpreterBuilder.cast_impl = cast_impl

    fp_to_fp = interp.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if tl.float8e4nv in (src.dtype.scalar, dst_type.scalar):
            return _fp8_cast(src, dst_type)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    interp.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp

    patch_tensor = interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interp._patch_lang_tensor = _patch_lang_tensor


def _fp8_cast(src, dst_type):
    """An interpreter cast from or to float8e4nv through torch (exact, subnormals kept)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    data = np.ascontiguousarray(src.data)
    if src.dtype.scalar == tl.float8e4nv:
        x = torch.from_numpy(data.view(np.uint8)).view(torch.float8_e4m3fn).float()
    elif src.dtype.scalar == tl.bfloat16:
        x = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).float()
    else:
        x = torch.from_numpy(data.astype(np.float32))
    dst = dst_type.scalar
    if dst == tl.float8e4nv:
        out = x.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    elif dst == tl.bfloat16:
        out = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        out = x.numpy().astype(interp._get_np_dtype(dst))
    return interp.TensorHandle(out, dst)
