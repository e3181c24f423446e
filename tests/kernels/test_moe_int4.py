"""CPU checks of the INT4 helpers of the qmoe wrapper: `quantize_int4` is the recipe's quantizer
(`quantize.weights.quantize_groups`) packed the ONNX way, and `dequantize` gives the recipe's weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qwen3_compile.kernels.moe import dequantize, pack_int4, quantize_int4, unpack_int4  # noqa: E402
from qwen3_compile.quantize.int4 import dequantize_int4_groups  # noqa: E402
from qwen3_compile.quantize.weights import quantize_groups  # noqa: E402


def numpy_pack(q: np.ndarray) -> np.ndarray:
    """Independent packer: byte i of a row holds values 2i (bits 0-3) and 2i+1 (bits 4-7)."""
    u = q.astype(np.int64) & 0xF
    out = np.zeros(q.shape[:-1] + (q.shape[-1] // 2,), dtype=np.uint8)
    for i in range(q.shape[-1] // 2):
        out[..., i] = u[..., 2 * i] | (u[..., 2 * i + 1] << 4)
    return out


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_quantize_int4_is_the_recipe_quantizer_packed(group, dtype):
    rng = np.random.default_rng(group)
    E, N, K = 3, 8, 256
    w = (rng.standard_normal((E, N, K)) * rng.uniform(0.01, 3, (E, N, 1))).astype(dtype)
    w[0, 0, :group] = 0.0  # an all-zero group: scale 1, values 0
    w[1, 2, 5] = -np.abs(w[1, 2, :group]).max() * 1.0  # ties for the group's max |w| land on -7
    q_ref, s_ref = quantize_groups(w, group)  # ml_dtypes.int4 [E, N, K], scales [E, N, K/group]
    packed, scale = quantize_int4(torch.from_numpy(w), group, torch.from_numpy(s_ref).dtype)
    assert packed.dtype == torch.uint8 and packed.shape == (E, N, K // 2)
    assert scale.shape == (E, N, K // group)
    np.testing.assert_array_equal(scale.numpy(), s_ref)
    q_int = q_ref.astype(np.int8)
    assert q_int.min() >= -7  # -8 is never produced
    np.testing.assert_array_equal(packed.numpy(), numpy_pack(q_int))
    np.testing.assert_array_equal(unpack_int4(packed).numpy(), q_int)
    want = dequantize_int4_groups(q_ref, s_ref, group)  # fp32 products, as DequantizeLinear's
    np.testing.assert_array_equal(dequantize(packed, scale, torch.float32).numpy(), want)


def test_pack_int4_round_trips_every_value():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # [3, 32]: all 16 values, both nibbles
    packed = pack_int4(q)
    assert packed[0, 0].item() == 0x98  # -8 low (0x8), -7 high (0x9)
    np.testing.assert_array_equal(packed.numpy(), numpy_pack(q.numpy()))
    assert torch.equal(unpack_int4(packed), q)


def test_quantize_int4_error_is_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 16, 512, generator=g, dtype=torch.float64)
    packed, scale = quantize_int4(w, 128)
    err = (dequantize(packed, scale) - w).abs() / scale.double().repeat_interleave(128, -1)
    assert err.max() <= 0.5 + 1e-6
