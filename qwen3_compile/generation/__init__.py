"""Chat generation with compiled artifacts: sampling, incremental detokenization, the decode loop over
any runner, and `chat` (what `qwen3-compile run` calls)."""
