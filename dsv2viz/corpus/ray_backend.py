"""The collection job on Ray Data: the same shards and files, one model actor per GPU or CPU worker.

The plan's shards become a Ray Dataset of small specs; ``map_batches`` hands them, one at a time, to a pool
of actors that each load the model once and run :class:`~dsv2viz.corpus.shard.ShardRunner`, exactly as
the in-process job does, writing the shard's files under the output folder (which every node must be able
to write: a shared file system). Only shard summaries travel back to the driver. Ray is an optional extra
(``pip install dsv2viz[ray]``); nothing else imports this module.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from .documents import CollectError, InputFile, ShardSpec
from .shard import CollectSettings


def require_ray():
    """The ray module, or a CollectError saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise CollectError("Ray is not installed: pip install 'dsv2viz[ray]' (or run without --ray)") from None
    return ray


class _ShardActor:
    """A Ray actor: one loaded model; each call routes one shard and returns its summary as JSON."""

    def __init__(
        self, folder: str, files: list[dict], settings: dict, out: str, dtype: str, device: str, threads: int | None
    ) -> None:
        import torch

        from ..loading import load
        from .shard import ShardRunner

        if threads:
            torch.set_num_threads(threads)
        model = load(folder, device=device, dtype=getattr(torch, dtype), progress=False)
        self.runner = ShardRunner(model, [InputFile(**f) for f in files], CollectSettings(**settings), Path(out))

    def __call__(self, batch: dict) -> dict:
        summaries = [json.dumps(self.runner.run(ShardSpec.from_dict(json.loads(s)))) for s in batch["spec"]]
        return {"summary": summaries}


def run_shards(
    folder: Path,
    files: Sequence[InputFile],
    settings: CollectSettings,
    out: Path,
    todo: Sequence[ShardSpec],
    *,
    dtype: str,
    device: str,
    threads: int | None,
    address: str | None,
    workers: int | None,
    gpus_per_worker: float | None,
) -> Iterator[dict]:
    """Run `todo` on a Ray cluster (`address`) or a local Ray instance; yields each shard's summary as it ends."""
    ray = require_ray()
    if not todo:
        return
    started = not ray.is_initialized()
    ray.init(
        address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False, logging_level="WARNING"
    )
    resources = ray.cluster_resources()
    if device == "cuda":
        gpus = 1.0 if gpus_per_worker is None else gpus_per_worker
        workers = workers or max(1, int(resources.get("GPU", 0) // gpus))
        cpus = 1.0
    else:
        gpus = 0.0
        workers = workers or 2
        cpus = max(1.0, float(threads or 1))
    threads = threads or (None if device == "cuda" else int(cpus))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    specs = ray.data.from_items([{"spec": json.dumps(s.to_dict())} for s in todo], override_num_blocks=len(todo))
    results = specs.map_batches(
        _ShardActor,
        fn_constructor_kwargs={
            "folder": str(folder),
            "files": [dataclasses.asdict(f) for f in files],
            "settings": dataclasses.asdict(settings),
            "out": str(Path(out).resolve()),
            "dtype": dtype,
            "device": device,
            "threads": threads,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(todo))),
        num_gpus=gpus,
        num_cpus=cpus,
    )
    try:
        for row in results.iter_rows():
            yield json.loads(row["summary"])
    finally:
        if started and address is None:
            ray.shutdown()  # the local instance this call started; a cluster, or a user's own ray.init, stays
