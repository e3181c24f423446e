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


def test_top1_margin_is_the_references_gap_to_the_artifacts_choice():
    rng = np.random.default_rng()
    reference = rng.standard_normal((9, 300)).astype(np.float32)
    artifact = (reference + rng.standard_normal(reference.shape) * 0.5).astype(np.float32)
    got = compare_logits(reference, artifact)
    for row in range(9):
        expected = float(reference[row].max()) - float(reference[row, artifact[row].argmax()])
        assert got.top1_margin[row] == pytest.approx(expected, abs=0)
        assert (got.top1_margin[row] == 0.0) == got.top1[row]
        # a swap needs an error of at least half the margin on one of the two logits
        assert got.top1_margin[row] <= 2 * got.max_abs[row] + 1e-6


def _report(gates, reference, artifact):
    from qwen3_compile.validate.prompt_suite import PromptCase
    from qwen3_compile.validate.stage import CaseResult, ValidationReport, _evaluate

    metrics = compare_logits(reference, artifact)
    empty = compare_logits(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32))
    case = CaseResult(PromptCase("p", "general", "thinking", [1, 2]), metrics, empty, 1, 1)
    return _evaluate(ValidationReport("a", "r", "ort", gates, "test", [case], None))


def test_max_abs_gate_allows_near_tie_swaps_and_not_wider_ones():
    from qwen3_compile.validate.gates import DEFAULT_GATES

    fp32, fp16 = DEFAULT_GATES["fp32"], DEFAULT_GATES["fp16"]  # max_abs 1e-3 gated; not gated
    reference = np.random.default_rng().uniform(-1, 0, (200, 64)).astype(np.float32)
    reference[:, 5] = 4.0
    near = reference.copy()
    near[0, 9] = 4.0 - 1e-4  # the reference ranks token 9 1e-4 below its best ...
    artifact = near.copy()
    artifact[0, 9] = 4.0 + 2e-4  # ... and an error of 3e-4 (< max_abs 1e-3) swaps them
    assert _report(fp32, near, artifact) == []
    # a 1.0 swap in 1 of 200 positions: top-1 0.995 fails the fp32 gate (1.0) alone, passes fp16's 0.99
    wide = reference.copy()
    wide[0, 9] = 3.0
    artifact = wide.copy()
    artifact[0, 9] = 4.5
    failures = _report(fp32, wide, artifact)
    assert any(f.startswith("top-1 agreement 0.9950 < 1") for f in failures), failures
    assert any(f.startswith("max |logit error|") for f in failures)
    assert not any("top-1" in f for f in _report(fp16, wide, artifact))
