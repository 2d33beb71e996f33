"""The ``dsv2viz`` command line.

    dsv2viz info PATH                       what a checkpoint holds: config, parameters, shards, KV-cache bytes per token
    dsv2viz generate [--model PATH] --prompt TEXT [--trace DIR] [--report FILE]
                                            stream a generation, record its trace, write its HTML report
    dsv2viz report TRACE_DIR -o FILE [--model PATH | --demo-model] [--attribution-positions 3,7]
                                            the HTML report of a saved trace (the model adds the logit lens and
                                            the direct logit attribution of the last token and of those positions)
    dsv2viz demo [--out DIR]                write a small random-weight checkpoint and stream a generation with its routing
    dsv2viz collect [--model PATH] --input FILES... --out DIR [--ray]
                                            routing of a whole corpus: per-token Parquet rows and merged statistics

Every error a user can cause (a bad argument, folder, file, config, checkpoint, trace or value) is one
line on stderr, ``dsv2viz <command>: error: <what to fix>``, and exit status 1, never a traceback;
argparse's own errors take the same form and status (not its usual usage block and status 2).
Ctrl-C prints ``dsv2viz <command>: interrupted`` and exits 130. Success is status 0.
Everything printed that comes from the user, the files or the model (tokens, paths, document ids, error
messages) goes through `dsv2viz.text.visible_controls` first, so no control character or bidi override
reaches the terminal raw; a streamed generation keeps its newlines and tabs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

from .checkpoint import CheckpointError, checkpoint_folder, open_checkpoint
from .config import ConfigError, DeepseekV2Config
from .hooks import HookError
from .text import visible, visible_controls
from .tokenizer import TokenizerError
from .traces import TraceBudgetError, TraceError

#: Exit status of every user error, bad arguments included.
USER_ERROR_STATUS = 1
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_STATUS = 130

USER_ERRORS = (
    CheckpointError,
    ConfigError,
    TokenizerError,
    HookError,
    TraceError,
    TraceBudgetError,
    OSError,
    ValueError,
    MemoryError,  # a real allocation failure, e.g. a prompt too long for this machine
    torch.cuda.OutOfMemoryError,
)


def parameter_counts(config: DeepseekV2Config) -> dict[str, int]:
    """Parameters by part, then the total and what one token uses, from the config's shapes alone."""
    parts = config.parameter_counts()
    total = sum(parts.values())
    inactive = 0
    if config.n_routed_experts:
        inactive = (
            parts["routed experts"] * (config.n_routed_experts - config.num_experts_per_tok) // config.n_routed_experts
        )
    embed = config.vocab_size * config.hidden_size
    return {
        **parts,
        "total": total,
        "active per token": total - inactive,
        "active per token, less embedding": total - inactive - embed,
    }


def cmd_info(args: argparse.Namespace) -> None:
    folder = checkpoint_folder(args.path)
    config = DeepseekV2Config.from_json(folder)
    ckpt = open_checkpoint(folder)
    c = config
    print(f"checkpoint      {visible_controls(str(folder))}")
    print(
        f"layers          {c.num_hidden_layers} ({len(c.moe_layers)} MoE, first {c.first_k_dense_replace} dense), hidden {c.hidden_size}, vocab {c.vocab_size}"
    )
    q = "plain q_proj" if c.q_lora_rank is None else f"q_lora_rank {c.q_lora_rank}"
    print(
        f"attention (MLA) {c.num_attention_heads} heads, {q}, latent {c.kv_lora_rank} + rope key {c.qk_rope_head_dim}, "
        f"head dims nope {c.qk_nope_head_dim} / rope {c.qk_rope_head_dim} / v {c.v_head_dim}, softmax scale {c.softmax_scale:.4f}"
    )
    if c.n_routed_experts:
        print(
            f"experts (MoE)   {c.n_routed_experts} routed (top {c.num_experts_per_tok}, {c.topk_method}), {c.n_shared_experts} shared, width {c.moe_intermediate_size}"
        )
    if c.rope_scaling:
        y = c.rope_scaling
        print(
            f"rope            YaRN factor {y.factor:g} over {y.original_max_position_embeddings} positions, context {c.max_position_embeddings}"
        )
    print("parameters")
    for part, n in parameter_counts(config).items():
        print(f"  {part:<34}{n:>18,}")
    stored = {ckpt.dtype(k) for k in ckpt.keys()}  # noqa: SIM118 (a Checkpoint is not a mapping)
    print(
        f"shards          {len(ckpt.shards)} files, {len(ckpt)} tensors, {ckpt.nbytes / 2**30:.2f} GiB ({', '.join(sorted(str(d).removeprefix('torch.') for d in stored))})"
    )
    for shard in ckpt.shards:
        print(f"  {visible_controls(shard.name):<40}{shard.stat().st_size / 2**30:>8.2f} GiB")
    latent, mha = c.kv_cache_bytes_per_token(2), c.mha_cache_bytes_per_token(2)
    print(
        f"KV cache (bf16) {latent:,} bytes/token ({c.kv_cache_dim} values x {c.num_hidden_layers} layers); "
        f"a standard multi-head cache would hold {mha:,} ({mha / latent:.1f}x)"
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from .html_report import report
    from .loading import load
    from .traces import Recording

    model = load(args.model, device=args.device, progress=not args.quiet)
    layers = args.attention_layers  # a list of indices, checked by the parser
    record = Recording(
        router_probs=True,
        attention=args.attention,
        attention_layers=layers,
        queries=args.attention != "none" or layers is not None,
        memory_budget=int(args.memory_budget * 2**30),
    )
    generation = model.generate(
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        chat=args.chat,
        record=record,
    )
    print(visible_controls(generation.prompt_text, keep_newlines=True), end="", flush=True)
    for step in generation:
        print(visible_controls(step.text, keep_newlines=True), end="", flush=True)
    print(f"\n[{len(generation.token_ids) - len(generation.prompt_ids)} tokens, finished: {generation.finish_reason}]")
    trace = generation.trace
    if args.trace:
        print(f"trace saved to {visible_controls(str(trace.save(args.trace)))}")
    if args.report:
        print(f"report written to {visible_controls(str(report(trace, args.report, model=model)))}")


def cmd_report(args: argparse.Namespace) -> None:
    from .html_report import check_attribution_positions, check_report_path, report
    from .loading import load
    from .traces import Trace

    check_report_path(args.output)  # before the trace and the model are read
    trace = Trace.load(args.trace)
    positions = args.attribution_positions or []
    given = bool(args.model) or args.demo_model
    check_attribution_positions(trace, positions, model_given=given)  # before the model is loaded
    model = load(args.model or None, progress=False) if given else None
    path = report(trace, args.output, model=model, attribution_positions=positions)
    print(f"report written to {visible_controls(str(path))}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .loading import load
    from .random_checkpoint import write_random_checkpoint
    from .traces.trace import check_trace_folder

    if args.trace:
        check_trace_folder(args.trace)  # before the generation it would hold
    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dsv2viz-random-"))
    write_random_checkpoint(folder)  # refuses a folder that is not empty and not an earlier demo's
    model = load(folder, device="cpu", dtype=torch.float32, progress=False)
    layers = model.config.moe_layers
    print(
        f"random-weight checkpoint in {visible_controls(str(folder))}: "
        "routing is meaningless until you load trained weights"
    )
    print(
        f"generating {args.tokens} tokens after “{visible_controls(args.prompt)}”; "
        "top-1 expert per MoE layer as each token streams:"
    )
    print(f"  {'pos':>4} {'token':<10}" + "".join(f"L{layer:<4}" for layer in layers) + "  p(token)")
    generation = model.generate(args.prompt, args.tokens, temperature=0.8, seed=0)
    for step in generation:
        experts = "".join(f"{int(e):<5}" for e in step.record["experts"][:, 0])
        token = visible(generation.texts[step.position])  # its label, spaces and controls visible
        print(f"  {step.position:>4} {token:<10}{experts}  {step.probability:.3f}")
    trace = generation.trace
    print(f"trace: {len(trace)} tokens, latent KV {model.config.kv_cache_bytes_per_token(4):,} bytes/token in fp32")
    if args.trace:
        print(f"saved to {visible_controls(str(trace.save(args.trace)))}")


def cmd_collect(args: argparse.Namespace) -> None:
    import time

    from .analysis import expert_utilization
    from .corpus import CollectSettings, collect

    settings = CollectSettings(
        text_field=args.text_field,
        id_field=args.id_field,
        docs_per_shard=args.docs_per_shard,
        batch_tokens=args.batch_tokens,
        max_tokens=args.max_tokens,
        near_tie_threshold=args.near_tie_threshold,
    )
    start = time.perf_counter()
    corpus = collect(
        args.input,
        args.out,
        model=args.model,
        settings=settings,
        device=args.device,
        threads=args.threads,
        ray=args.ray or args.ray_address is not None,
        ray_address=args.ray_address,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        progress=not args.quiet,
    )
    totals = corpus.manifest["totals"]
    print(
        f"{totals['documents']:,} documents, {totals['tokens']:,} tokens routed, {totals['skipped']:,} skipped "
        f"({time.perf_counter() - start:.1f} s, model loading included) -> {visible_controls(args.out)}"
    )
    util, stats = expert_utilization(corpus), corpus.stats
    print(f"  {'layer':>5} {'load CV':>8} {'max/mean':>9} {'entropy':>8} {'near ties':>10}")
    for row, layer in enumerate(corpus.moe_layers):
        print(
            f"  {layer:>5} {float(util.cv[row]):>8.3f} {float(util.max_over_mean[row]):>9.2f} "
            f"{float(stats.mean_entropy[row]):>8.3f} {int(stats.near_ties[row]) / max(stats.tokens, 1):>10.2%}"
        )


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the CLI's one-line form (no usage block) and the CLI's user-error status.
    Subcommand parsers are made of this class too (argparse uses the parent's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR_STATUS, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in low..high."""
    expected = f"a whole number >= {low}" if high is None else f"a whole number from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _real(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (or (low, high] when `low_open`)."""
    expected = f"a finite number {'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _indices(text: str) -> list[int]:
    """An argparse type: comma-separated indices, e.g. '0,3,5'."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = [-1]
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 0 such as 0,3,5, got {text!r}")
    return values


def _positions(text: str) -> list[int]:
    """An argparse type: comma-separated positions, negative ones counted from the end, e.g. '3,7,-1'."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers such as 3,7,-1, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsv2viz", description="Look inside DeepSeek-V2: latent attention and experts.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a checkpoint folder without loading its weights")
    info.add_argument("path", help="folder with config.json and *.safetensors")
    info.set_defaults(run=cmd_info)
    gen = sub.add_parser("generate", help="stream a generation, record its trace, write its report")
    gen.add_argument(
        "--model",
        help="checkpoint folder (config.json, *.safetensors, tokenizer.json); default: the bundled demo model",
    )
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="format the prompt as one user turn of the chat template")
    gen.add_argument("--max-new-tokens", type=_whole(0), default=64)
    gen.add_argument("--temperature", type=_real(0), default=0.0, help="0 is greedy")
    gen.add_argument("--top-k", type=_whole(1))
    gen.add_argument("--top-p", type=_real(0, 1, low_open=True), help="in (0, 1]")
    gen.add_argument("--seed", type=_whole(0, 2**63 - 1))
    gen.add_argument(
        "--attention", choices=["none", "last_row", "full"], default="none", help="attention patterns to record"
    )
    gen.add_argument(
        "--attention-layers",
        type=_indices,
        help="comma-separated layers whose attention (patterns or queries) to record",
    )
    gen.add_argument("--memory-budget", type=_real(0, low_open=True), default=2.0, help="GiB the trace may hold")
    gen.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--trace", help="save the trace to this folder")
    gen.add_argument("--report", help="write the HTML report to this file")
    gen.add_argument("--quiet", action="store_true", help="no loading progress bar")
    gen.set_defaults(run=cmd_generate)
    rep = sub.add_parser("report", help="write the HTML report of a saved trace")
    rep.add_argument("trace", help="a folder written by --trace or Trace.save")
    rep.add_argument("-o", "--output", required=True, help="the .html file to write")
    which = rep.add_mutually_exclusive_group()
    which.add_argument(
        "--model", help="the checkpoint folder that recorded the trace: adds the logit lens and the attribution"
    )
    which.add_argument(
        "--demo-model",
        action="store_true",
        help="the trace was recorded with the bundled demo model: use it as --model",
    )
    rep.add_argument(
        "--attribution-positions",
        type=_positions,
        metavar="P,Q",
        help="also attribute the token after each of these positions (negative: from the end); needs a model",
    )
    rep.set_defaults(run=cmd_report)
    demo = sub.add_parser("demo", help="write a random-weight checkpoint and show its routing")
    demo.add_argument(
        "--out",
        help="folder for the checkpoint: new, empty or an earlier demo's (default: a new temporary folder)",
    )
    demo.add_argument("--prompt", default="def fibonacci(n):")
    demo.add_argument("--tokens", type=_whole(0), default=16, help="how many tokens to generate")
    demo.add_argument("--trace", help="save the recorded trace to this folder")
    demo.set_defaults(run=cmd_demo)
    col = sub.add_parser("collect", help="route a corpus: per-token Parquet rows and mergeable statistics per layer")
    col.add_argument("--model", help="checkpoint folder; default: the bundled demo model")
    col.add_argument(
        "--input", nargs="+", required=True, help="text files (one document each), .jsonl or .parquet files, or folders"
    )
    col.add_argument("--out", required=True, help="output folder; rerunning the same command resumes it")
    col.add_argument("--text-field", default="text", help="JSONL key / Parquet column with the text")
    col.add_argument("--id-field", default="id", help="JSONL key / Parquet column naming the document, when present")
    col.add_argument(
        "--docs-per-shard", type=_whole(1), default=256, help="documents per shard: the unit of work and of resumption"
    )
    col.add_argument("--batch-tokens", type=_whole(1), default=8192, help="padded tokens per forward pass")
    col.add_argument(
        "--max-tokens", type=_whole(1), help="longer documents are skipped and reported (default: min(context, 4096))"
    )
    col.add_argument(
        "--near-tie-threshold",
        type=_real(0),
        help="absolute top-k margin counted as a near tie (default: bf16 rounding of the K-th probability)",
    )
    col.add_argument("--device", help="cuda or cpu, in-process (default: cuda when available)")
    col.add_argument(
        "--threads", type=_whole(1), help="torch threads per process (Ray CPU workers: one per CPU they reserve)"
    )
    col.add_argument(
        "--ray", action="store_true", help="run the shards on Ray Data (a local instance unless --ray-address)"
    )
    col.add_argument("--ray-address", help="address of a running Ray cluster (implies --ray)")
    col.add_argument("--workers", type=_whole(1), help="Ray model actors (default: one per GPU, else 2)")
    col.add_argument(
        "--gpus-per-worker", type=_real(0), help="GPUs per Ray actor (default: 1 when the cluster has GPUs, else 0)"
    )
    col.add_argument("--quiet", action="store_true", help="no progress bars")
    col.set_defaults(run=cmd_collect)
    return parser


def describe(error: BaseException) -> str:
    """A user error as one line: OSErrors as 'file: reason', other messages with their line breaks joined."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename is not None else error.strerror
    else:
        text = str(error) or ("out of memory" if isinstance(error, MemoryError) else type(error).__name__)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status (see the module docstring). Bad arguments exit from the parser."""
    args = build_parser().parse_args(argv)
    command = f"dsv2viz {args.command}"
    try:
        args.run(args)
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    except BrokenPipeError:  # the reader went away (`dsv2viz info ... | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return USER_ERROR_STATUS
    except USER_ERRORS as e:
        print(f"{command}: error: {visible_controls(describe(e))}", file=sys.stderr)
        return USER_ERROR_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
