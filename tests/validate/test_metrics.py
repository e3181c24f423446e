"""compare_logits against torch in float64: KL(reference || artifact), top-1, cosine, max |difference|."""

import numpy as np
import pytest
import torch

from qwen3_compile.validate.metrics import compare_logits, summarise


def _torch_metrics(reference: np.ndarray, artifact: np.ndarray):
    ref, art = torch.from_numpy(reference).double(), torch.from_numpy(artifact).double()
    kl = torch.nn.functional.kl_div(
        art.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    cosine = torch.nn.functional.cosine_similarity(ref, art, dim=-1)
    return kl.numpy(), cosine.numpy(), (ref - art).abs().amax(-1).numpy()


@pytest.mark.parametrize("rows, noise", [(1, 1e-4), (7, 1e-2), (13, 1.0)])
def test_matches_torch_float64(rows, noise):
    rng = np.random.default_rng()
    reference = (rng.standard_normal((rows, 151936)) * rng.uniform(1, 8)).astype(np.float32)
    artifact = (reference + rng.standard_normal(reference.shape) * noise).astype(np.float32)
    got = compare_logits(reference, artifact)
    kl, cosine, max_abs = _torch_metrics(reference, artifact)
    np.testing.assert_allclose(got.kl, kl, rtol=1e-8, atol=1e-13)  # both sides round at ~1e-16 x log V
    np.testing.assert_allclose(got.cosine, cosine, rtol=1e-12)
    np.testing.assert_allclose(got.max_abs, max_abs, rtol=0)
    assert got.top1 == (reference.argmax(-1) == artifact.argmax(-1)).tolist()
    assert summarise([got]).positions == rows


def test_identical_logits_have_zero_kl_and_agree():
    logits = np.random.default_rng().standard_normal((5, 1000)).astype(np.float32)
    got = compare_logits(logits, logits.copy())
    assert max(got.kl) < 1e-14 and all(got.top1) and max(got.max_abs) == 0.0
    np.testing.assert_allclose(got.cosine, 1.0, rtol=1e-14)


def test_no_positions():
    got = compare_logits(np.zeros((0, 10), np.float32), np.zeros((0, 10), np.float32))
    assert got.kl == [] and summarise([got]).positions == 0
