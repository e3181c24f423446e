"""The CPU arithmetic of benchmarks/ort_cuda.py's parts, against independent computations: the weight bytes a
decode step reads (the decode roofline's numerator) against the parameters of the transformers model itself,
and the router top-k sets and margins against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.benchmarks.benchmark_scripts import loaded_script


@pytest.fixture(scope="module")
def parts():
    """The ort_cuda_parts modules, imported as benchmarks/ort_cuda.py imports them."""
    with loaded_script("ort_cuda", on_path=True):
        import ort_cuda_parts.diag
        import ort_cuda_parts.steps

        yield ort_cuda_parts


@pytest.mark.parametrize("preset", ["tiny-moe", "qwen3-30b-a3b"])
def test_weight_bytes_per_token_counts_what_one_decode_step_reads(parts, preset):
    """Every parameter of the transformers model once, except the embedding table (one row is gathered) and
    the experts, of which each layer reads top_k of num_experts. The real-width preset is counted on the meta
    device (shapes only)."""
    from transformers import AutoModelForCausalLM

    from qwen3_compile.models.loading import resolve_model

    arch = resolve_model(preset, 2).arch
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch.to_transformers_config())
    elements = 0
    for name, param in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            continue
        share = arch.top_k / arch.num_experts if ".mlp.experts." in name else 1
        elements += param.numel() * share
    assert parts.steps.weight_bytes_per_token(arch) == pytest.approx(2 * elements, rel=1e-12)
    assert parts.steps.weight_bytes_per_token(arch, dtype_bytes=4) == 2 * parts.steps.weight_bytes_per_token(
        arch
    )


def test_topk_sets_match_torch_topk_of_the_softmax(parts):
    rng = np.random.default_rng()
    logits = rng.standard_normal((64, 128)).astype(np.float32)
    top, margin = parts.diag.topk_sets(logits, 8)
    p = torch.softmax(torch.from_numpy(logits).double(), -1)
    values, ids = torch.topk(p, 9, dim=-1)
    assert np.array_equal(top, np.sort(ids[:, :8].numpy(), axis=-1))
    np.testing.assert_allclose(margin, (values[:, 7] - values[:, 8]).numpy(), rtol=1e-5, atol=1e-7)
