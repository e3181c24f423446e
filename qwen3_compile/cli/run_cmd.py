"""`qwen3-compile run`: chat with a compiled artifact (streamed text, reasoning apart from the answer)."""

from __future__ import annotations

from pathlib import Path

import click

from qwen3_compile.cli.common import BACKEND_CHOICES, emit_json, ort_ops_option, stage_command
from qwen3_compile.errors import BadInputError


def _sampling(thinking: bool, greedy: bool, temperature, top_p, top_k):
    from qwen3_compile.generation.sampling import GREEDY, SamplingConfig, default_sampling

    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    given = {k: v for k, v in given.items() if v is not None}
    if greedy:
        if given:
            raise BadInputError(
                "--greedy takes the most likely token; sampling options do not apply.",
                field="--" + next(iter(given)).replace("_", "-"),
                fix="drop --greedy to sample, or drop the sampling options.",
            )
        return GREEDY
    return SamplingConfig(**(vars(default_sampling(thinking)) | given))


def _echo_piece(piece, state: dict) -> None:
    """Reasoning goes to stderr (dim, under a heading) so stdout carries only the answer."""
    if piece.channel == "reasoning":
        if not state.get("reasoning"):
            click.secho("thinking:", err=True, dim=True, bold=True)
            state["reasoning"] = True
        click.secho(piece.text, err=True, dim=True, nl=False)
    else:
        if state.get("reasoning") and not state.get("content"):
            click.echo("", err=True)  # end the reasoning block on its own line
        state["content"] = True
        click.echo(piece.text, nl=False)


@click.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", help="The user message.")
@click.option(
    "--prompt-file",
    type=click.Path(path_type=Path, allow_dash=True, dir_okay=False),
    help="Read the user message from FILE (UTF-8; '-' reads stdin), for prompts too long for a command line.",
)
@click.option("--system", help="A system message before the prompt.")
@click.option(
    "--think/--no-think",
    default=True,
    show_default=True,
    help="Reasoning mode (enable_thinking).",
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option(
    "--stream/--no-stream",
    default=True,
    show_default=True,
    help="Print text as tokens arrive (--json never streams).",
)
@click.option("--greedy", is_flag=True, help="Argmax decoding instead of sampling.")
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    help="Default: 0.6 thinking, 0.7 non-thinking (Qwen3 model card).",
)
@click.option(
    "--top-p", type=click.FloatRange(0, 1, min_open=True), help="Default: 0.95 thinking, 0.8 non-thinking."
)
@click.option("--top-k", type=click.IntRange(min=0), help="Default: 20; 0 disables.")
@click.option("--seed", type=int, help="Seed for sampling (default: a fresh one, shown in --json).")
@click.option(
    "--backend",
    type=click.Choice(BACKEND_CHOICES),
    help="Runtime that runs ARTIFACT, as in `validate --backend` (default: the one its stage runs on: "
    "ort for ONNX folders, the engine's flavour for `build` folders). ort-cuda: ONNX Runtime's CUDA "
    "provider (onnxruntime-gpu), KV cache kept on the GPU.",
)
@ort_ops_option
@click.option(
    "--static-cache",
    type=click.IntRange(min=1),
    help="ONNX Runtime: a static KV cache of N positions written in place (graphs lowered with "
    "`lower --for ort --attention gqa`; N at most the export's --max-positions): fixed shapes at every step.",
)
@click.option(
    "--cuda-graph",
    is_flag=True,
    help="With --backend ort-cuda and --static-cache: capture a decode step as a CUDA graph and replay it.",
)
@stage_command
def run_command(
    artifact: Path,
    prompt: str | None,
    prompt_file: Path | None,
    system: str | None,
    think: bool,
    max_new_tokens: int,
    stream: bool,
    greedy: bool,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    backend: str | None,
    ort_ops: Path | None,
    static_cache: int | None,
    cuda_graph: bool,
    as_json: bool,
) -> None:
    """Chat with the compiled ARTIFACT (an export, quantize or `lower --for ort` folder on ONNX Runtime,
    CPU or CUDA; or a `build` folder on TensorRT).

    Reasoning is printed dim on stderr under "thinking:", the answer on stdout; speed at the end.
    """
    from qwen3_compile.backends.onnxruntime.op_libraries import selected_custom_ops
    from qwen3_compile.backends.registry import RunnerOptions
    from qwen3_compile.generation.chat import ChatRequest, chat, read_prompt_file

    if (prompt is None) == (prompt_file is None):
        raise BadInputError(
            "give the user message once.", field="--prompt", fix="pass either -p TEXT or --prompt-file FILE."
        )
    if prompt_file is not None:
        prompt = read_prompt_file(prompt_file)
    request = ChatRequest(
        prompt, think, system, max_new_tokens, _sampling(think, greedy, temperature, top_p, top_k), seed
    )
    state: dict = {}
    streaming = stream and not as_json
    on_piece = (lambda piece: _echo_piece(piece, state)) if streaming else None
    with selected_custom_ops(ort_ops, backend):
        options = RunnerOptions(static_cache, cuda_graph)
        result = chat(artifact, request, on_piece, backend=backend, runner_options=options)
    if as_json:
        emit_json(result.to_dict())
        return
    if not streaming:
        if result.reasoning:
            click.secho("thinking:", err=True, dim=True, bold=True)
            click.secho(result.reasoning, err=True, dim=True)
        click.echo(result.content, nl=False)
    click.echo("")
    reply, rate = result.reply, result.reply.tokens_per_s
    speed = f"{rate:.1f} tokens/s decode" if rate else "no decode steps"
    click.secho(
        f"[{len(reply.prompt_ids)} prompt tokens in {reply.prefill_s:.2f} s, "
        f"{len(reply.generated_ids)} generated, {speed}, finish: {reply.finish_reason}]",
        err=True,
        dim=True,
    )
