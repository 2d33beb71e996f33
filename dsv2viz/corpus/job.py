"""The collection job: plan shards, run the unfinished ones in-process or on Ray, merge their statistics.

Output folder::

    manifest.json                 the job (model and its weights' fingerprint, dtype, settings, inputs, shard
                                  plan) and, when complete, totals
    rows/part-NNNNN.parquet       per-token routing, one row per (document, position, MoE layer)
    shards/NNNNN.*                each shard's statistics and summary (see dsv2viz.corpus.shard)
    stats.safetensors             merged RoutingStats (routing paths included); stats.token_experts.parquet
                                  with token texts
    documents.parquet             doc_index, doc_id, tokens of every routed document
    skipped.jsonl                 every skipped document and why

Rerunning the same command resumes: shards whose summary exists are skipped, the others rerun, and the
merge is redone from all shards in order, so the result equals an uninterrupted run's. Only the same job
resumes: the same model config and weights (by :func:`dsv2viz.checkpoint.checkpoint_fingerprint`, so a
checkpoint replaced in place is noticed), dtype, device type, settings and inputs.

Every file is written whole or not at all (dsv2viz.files), and manifest.json is the commit point: the
merged files are written only while it says the collection is incomplete, and it says complete only once
they all are, so a run killed at any point leaves a folder that either opens whole or asks to be resumed.
The output folder may not lie inside an input folder (its Parquet files would be read back as documents).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..checkpoint import checkpoint_fingerprint, tensors_fingerprint
from ..config import DeepseekV2Config
from ..files import atomic_path, atomic_write, foreign_entries, name_list, read_json, remove_temporaries
from ..loading import DEMO_MODEL, default_device, default_dtype, load
from ..model import DeepseekV2ForCausalLM
from ..text import visible_controls
from ..tokenizer import Tokenizer
from .corpus import FORMAT, VERSION, Corpus
from .documents import CollectError, InputFile, ShardSpec, plan_shards
from .shard import CollectSettings, ShardRunner
from .stats import RoutingStats

#: Skipped documents printed one by one per run; the rest are counted (all are in skipped.jsonl).
SHOW_SKIPPED = 20

ModelArg = str | os.PathLike | DeepseekV2ForCausalLM | None


def collect(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    model: ModelArg = None,
    settings: CollectSettings | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    threads: int | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    progress: bool = True,
    **options,
) -> Corpus:
    """Route every document of `inputs` through `model` (a checkpoint folder, a loaded model, or None for
    the bundled demo model) and write per-token routing and merged statistics to `out`; returns the Corpus.

    `inputs` are plain text files (one document each), JSONL (one document per line, text under
    ``text_field``) or Parquet (a ``text_field`` column), or folders of them. `options` are
    :class:`CollectSettings` fields (docs_per_shard, batch_tokens, max_tokens, ...). `threads` sets
    torch's intra-op threads (results are bit-identical across runs with the same dtype, device type and
    threads). With `ray`, shards run on Ray Data: one model actor per GPU (``gpus_per_worker``, default 1
    when the cluster has GPUs) or per CPU worker; `workers` actors (default: one per GPU, else 2); a local
    Ray instance is started unless `ray_address` names a cluster. `out` must then be on storage every
    node can write.
    """
    settings = dataclasses.replace(settings or CollectSettings(), **options)
    out = Path(out)
    _check_apart(inputs, out)
    if ray:
        from .ray_backend import require_ray

        require_ray()  # before anything is written
    files, specs = plan_shards(inputs, settings.docs_per_shard, settings.text_field)
    if isinstance(model, DeepseekV2ForCausalLM):
        if ray:
            raise CollectError(
                "with ray=True pass the checkpoint folder, not a loaded model: each worker loads its own copy"
            )
        folder, config, device_type, dtype = None, model.config, model.device.type, model.dtype
        weights = tensors_fingerprint(model.state_dict().items())
    else:  # a folder: checked against the output folder before its weights are loaded
        folder = Path(model or DEMO_MODEL).expanduser()
        config, weights = DeepseekV2Config.from_json(folder), checkpoint_fingerprint(folder)
        if ray:
            device_type = (
                "cuda" if gpus_per_worker or (gpus_per_worker is None and _cluster_gpus(ray_address)) else "cpu"
            )
        else:
            device_type = (torch.device(device) if device is not None else default_device()).type
        dtype = dtype or default_dtype(torch.device(device_type))
    job = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"path": str(folder) if folder else None, "config": config.to_dict()},
        "weights": weights,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device_type,
        "settings": dataclasses.asdict(settings),
        "files": [dataclasses.asdict(f) for f in files],
        "shards": [s.to_dict() for s in specs],
    }
    complete = _start(out, job)
    todo = [s for s in specs if not (out / "shards" / f"{s.name}.json").exists()]
    if complete and not todo:
        return Corpus.open(out)
    if complete:  # a shard's summary was removed: the merged files are about to be rewritten
        _write_manifest(out, {**job, "complete": False})
    if isinstance(model, DeepseekV2ForCausalLM):
        loaded = model
    else:  # Ray workers load their own copies
        loaded = None if ray else load(folder, device=device, dtype=dtype, progress=progress)
    bar = tqdm(
        unit="tok",
        unit_scale=True,
        desc=f"collect: {len(todo)} of {len(specs)} shards to do",
        disable=not progress,
        file=sys.stderr,
    )
    shown = 0
    try:
        if ray:
            from .ray_backend import run_shards

            summaries = run_shards(
                folder,
                files,
                settings,
                out,
                todo,
                dtype=job["dtype"],
                device=device_type,
                threads=threads,
                address=ray_address,
                workers=workers,
                gpus_per_worker=gpus_per_worker,
            )
        else:
            summaries = _in_process(loaded, files, settings, out, todo, threads, bar)
        for summary in summaries:
            if ray:
                bar.update(summary["tokens"])
            for s in summary["skipped"]:
                if shown < SHOW_SKIPPED:
                    bar.write(visible_controls(f"skipped {s['doc_id']}: {s['reason']}"), file=sys.stderr)
                shown += 1
    finally:
        bar.close()
    if shown > SHOW_SKIPPED:
        more = f"... and {shown - SHOW_SKIPPED} more skipped documents: see {out / 'skipped.jsonl'}"
        print(visible_controls(more), file=sys.stderr)
    tokenizer = (
        loaded.tokenizer
        if loaded is not None
        else Tokenizer.from_dir(folder, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    )
    _merge(out, job, specs, tokenizer)
    return Corpus.open(out)


def _cluster_gpus(address: str | None) -> bool:
    """Whether the Ray cluster (or this machine, for a local instance) has GPUs."""
    if address is None:
        return torch.cuda.is_available()
    import ray

    ray.init(address=address, ignore_reinit_error=True)
    return ray.cluster_resources().get("GPU", 0) > 0


def _in_process(
    model: DeepseekV2ForCausalLM,
    files: list[InputFile],
    settings: CollectSettings,
    out: Path,
    todo: list[ShardSpec],
    threads: int | None,
    bar: tqdm,
) -> Iterator[dict]:
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        runner = ShardRunner(model, files, settings, out, on_tokens=bar.update)
        for spec in todo:
            yield runner.run(spec)
    finally:
        torch.set_num_threads(before)


def _check_apart(inputs: Sequence[str | os.PathLike], out: Path) -> None:
    """Refuse an output folder inside an input folder, or an input inside the output folder: the collection's
    own Parquet files would be read as documents on the next run."""
    where = out.resolve()
    for given in inputs:
        path = Path(given).resolve()
        if path.is_dir() and (where == path or path in where.parents):
            raise CollectError(
                f"the output folder {out} is inside the input folder {given}, whose files would then include the "
                "collection's own; choose an output folder outside the inputs"
            )
        if where in path.parents:
            raise CollectError(
                f"the input {given} is inside the output folder {out}; move it out, or collect elsewhere"
            )


def _start(out: Path, job: dict) -> bool:
    """Write the manifest of a new job, or check that `out` holds this same job (then it is resumed).

    Returns whether the collection in `out` is complete.
    """
    manifest = out / "manifest.json"
    if manifest.exists():
        old = read_json(manifest, error=CollectError)
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise CollectError(f"{manifest} is not a dsv2viz collection's; choose another output folder")
        if old.get("version") != VERSION:
            raise CollectError(
                f"{out} was collected by another version of dsv2viz (collection format {old.get('version')!r}, "
                f"this one writes {VERSION}); collect into a new folder"
            )
        if old.get("weights") != job["weights"]:
            raise CollectError(
                f"{out} was collected with other weights (fingerprint {str(old.get('weights'))[:12]}, these are "
                f"{job['weights'][:12]}): resume with the same checkpoint, or choose another output folder"
            )
        old_model = old.get("model")
        same_config = isinstance(old_model, dict) and old_model.get("config") == job["model"]["config"]
        differ = [] if same_config else ["model config"]
        differ += [k for k in job if k not in ("model", "weights") and old.get(k) != job[k]]
        if differ:
            raise CollectError(
                f"{out} holds a collection made with other {', '.join(differ)}; rerun with the same model, inputs "
                "and settings to resume it, or choose another output folder"
            )
        for folder in (out, out / "rows", out / "shards"):  # left by an interrupted run; its shard reruns
            remove_temporaries(folder)
        return bool(old.get("complete"))
    foreign = foreign_entries(out, lambda name: False)
    if foreign:
        raise CollectError(
            f"{out} is not empty ({name_list(foreign)}) and holds no collection (manifest.json); "
            "choose a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)
    _write_manifest(out, {**job, "complete": False})
    return False


def _write_manifest(out: Path, manifest: dict) -> None:
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=1))


def _merge(out: Path, job: dict, specs: list[ShardSpec], tokenizer: Tokenizer | None) -> None:
    """Merge every shard's statistics in shard order and write the corpus-level files, the manifest last."""
    config = DeepseekV2Config.from_dict(job["model"]["config"])
    stats = RoutingStats(config.moe_layers, config.n_routed_experts, config.num_experts_per_tok)
    documents, skipped = [], []
    for spec in specs:
        stats = stats.merge(RoutingStats.load(out / "shards", spec.name))
        summary = read_json(out / "shards" / f"{spec.name}.json", error=CollectError)
        documents += summary["documents"]
        skipped += summary["skipped"]
    te = stats.token_experts
    if tokenizer is not None and len(te):
        unique = sorted(set(te["token_id"].tolist()))
        texts = dict(zip(unique, tokenizer.token_labels(unique)))  # each id shown alone
        te = te.assign(token=[texts[i] for i in te["token_id"].tolist()])
    stats.token_experts = te
    stats.save(out, "stats")
    table = pd.DataFrame(documents, columns=["doc_index", "doc_id", "tokens"])
    with atomic_path(out / "documents.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    atomic_write(out / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
    totals = {"documents": len(documents), "skipped": len(skipped), "tokens": stats.tokens}
    _write_manifest(out, {**job, "complete": True, "totals": totals})  # the commit point
