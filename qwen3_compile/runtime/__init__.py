"""Runners: one interface over the PyTorch reference and compiled artifacts, plus greedy generation.

A runner maps numpy (input_ids, attention_mask, position_ids, cache) to (fp32 logits, cache). The same
driver code (prefill, decode, generation) runs every backend, so differences are the artifact's.
"""
