"""The honest evaluation: replay a data set in event-time order through the same model code and
report progressive-validation AUC and log loss over time, for online training against the
"retrain once a day" baseline (trained on the first half, then frozen) and collisionless tables
against hashed ones with an eighth as many rows as there are ids.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flows.heap import frozen_heap
from model.evaluation import log_loss, roc_auc
from model.features import FeatureSpec
from model.trainer import OnlineTrainer, parameter_store

POINTS = 40  # points on the curves
# Online steps per TensorFlow call (`OnlineTrainer.train_steps`). MovieLens-100K at batch 8 (2026,
# TF 2.21, busy 2-core machine), events/s against River's FMClassifier in the same run: one call
# per step 0.46x; 256 per call 4.1x-4.2x, 512 per call 4.3x-4.4x (fewer calls, less Python). With the
# program compiled ahead and each call's inputs prepared beside the graph, in one process alternated:
# 512 per call 9.58x/9.78x/7.90x/9.09x, 1024 per call 9.79x/10.21x/8.72x.
STEPS_PER_CALL = 1024

Progress = Callable[[int], object]  # told how many more examples each step went through (a tqdm's update)


def _quiet(n: int) -> None:
    pass


@dataclass
class Run:
    name: str
    auc_second_half: float = float("nan")
    logloss_second_half: float = float("nan")
    examples_per_s: float = 0.0
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (examples seen, auc, logloss)


def _curve(scores: np.ndarray, labels: np.ndarray) -> list[tuple[int, float, float]]:
    n = len(scores)
    step = max(1, n // POINTS)
    out = []
    for end in range(step, n + 1, step):
        s, y = scores[end - step:end], labels[end - step:end]
        out.append((end, roc_auc(s, y), log_loss(s, y)))
    return out


def _finish(run: Run, scores: np.ndarray, labels: np.ndarray, seconds: float, n_trained: int) -> Run:
    half = len(scores) // 2
    run.auc_second_half = roc_auc(scores[half:], labels[half:])
    run.logloss_second_half = log_loss(scores[half:], labels[half:])
    run.examples_per_s = n_trained / seconds if seconds else 0.0
    run.curve = _curve(scores, labels)
    return run


def online(examples: Sequence[Any], spec: FeatureSpec, name: str = "online", batch_size: int = 256,
           params: Any = None, progress: Progress = _quiet, steps_per_call: int = STEPS_PER_CALL) -> Run:
    """Predict, then learn, batch by batch, over the whole stream (`steps_per_call` batches in one
    TensorFlow call: the same steps, see `OnlineTrainer.train_steps`)."""
    trainer = OnlineTrainer(spec, params if params is not None else parameter_store(spec))
    run = batch_size * steps_per_call
    # The step's program compiled with the trainer, for the first run's shapes (later runs fit them
    # or grow them), as a model is built before its stream: the timer counts the stream only.
    trainer.compile_steps(examples[:run], batch_size)
    scores = np.empty(len(examples), np.float64)
    # The stream runs with the heap as the flow process keeps it (`flows.pipeline.main_flow`):
    # what is alive now frozen. Else the first full collection walks the objects TensorFlow's import
    # and the trace just made (about 680,000 here, 0.55-0.68 s, a fifth of the pass, and in the
    # first pass of a process only: later passes found 1.2x its events/s).
    with frozen_heap():
        t0 = time.perf_counter()
        _stream(trainer, examples, batch_size, run, scores, progress)
        seconds = time.perf_counter() - t0
    labels = np.array([e.label for e in examples], np.float64)
    return _finish(Run(name), scores, labels, seconds, len(examples))


def _stream(trainer: OnlineTrainer, examples: Sequence[Any], batch_size: int, run: int, scores: np.ndarray,
            progress: Progress) -> None:
    """`online`'s pass: `run` examples per `train_steps` call, each example's score into `scores`."""
    runs = [examples[i:i + run] for i in range(0, len(examples), run)]
    # Each run's inputs are prepared in a thread while the run before trains in TensorFlow, which
    # lets Python run meanwhile; started as the graph starts, so that it takes no GIL from the
    # Python before the graph: the same steps in the same order, the Python beside the graph.
    with ThreadPoolExecutor(1) as ahead:
        todo = [ahead.submit(trainer.prepare_steps, runs[0], batch_size)] if runs else []
        for i, chunk in enumerate(runs):
            mine = todo.pop().result()

            def prepare_next(i: int = i) -> None:
                if i + 1 < len(runs):
                    todo.append(ahead.submit(trainer.prepare_steps, runs[i + 1], batch_size))

            step = trainer.train_steps(chunk, batch_size, prepared=mine, beside_graph=prepare_next)
            if not todo:  # a run trained step by step (it ran no graph)
                prepare_next()
            scores[i * run:i * run + len(step.scores)] = step.scores
            progress(step.size)


def frozen(examples: Sequence[Any], spec: FeatureSpec, batch_size: int = 256, epochs: int = 2,
           progress: Progress = _quiet) -> Run:
    """Trained on the first half (progressively on its first epoch, `STEPS_PER_CALL` batches per
    TensorFlow call as `online`), then frozen for the second.
    `progress` counts every example gone through: half the stream per epoch, then the second half."""
    half = len(examples) // 2
    trainer = OnlineTrainer(spec, parameter_store(spec))
    scores = np.empty(len(examples), np.float64)
    t0 = time.perf_counter()
    run = batch_size * STEPS_PER_CALL
    for epoch in range(epochs):
        for i in range(0, half, run):
            step = trainer.train_steps(examples[i:min(i + run, half)], batch_size)
            if epoch == 0:
                scores[i:i + len(step.scores)] = step.scores
            progress(step.size)
    for i in range(half, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        scores[i:i + len(chunk)] = trainer.score(chunk)
        progress(len(chunk))
    seconds = time.perf_counter() - t0
    labels = np.array([e.label for e in examples], np.float64)
    return _finish(Run("frozen after the first half"), scores, labels, seconds, half * epochs)


def hashed(examples: Sequence[Any], spec: FeatureSpec, fraction: float = 1 / 8, batch_size: int = 256,
           progress: Progress = _quiet) -> Run:
    """Online, with every slot's table hashed into `fraction` as many rows as it has ids."""
    from paramserver.store import ParameterStore
    from paramserver.table import SlotConfig

    distinct: dict[str, set] = {s: set() for s in spec.embedding_slots}
    for e in examples:
        distinct["user_id"].add(e.user_id)
        distinct["item_id"].add(e.item_id)
        for s in spec.embedding_slots[2:]:
            v = e.sparse.get(s)
            distinct[s].update([v] if isinstance(v, str) else v or [])
    distinct["user_id.bias"], distinct["item_id.bias"] = distinct["user_id"], distinct["item_id"]
    # The same optimizers as the collisionless tables (model.trainer.parameter_store): only the rows differ.
    reference = parameter_store(spec)
    slots = {s: SlotConfig(dim=spec.width(s), optimizer=reference.config_for(s).optimizer,
                           hash_bits=max(1, round(math.log2(max(2.0, len(ids) * fraction)))))
             for s, ids in distinct.items()}
    params = ParameterStore(slots, default=SlotConfig(dim=spec.dim))
    return online(examples, spec, name=f"hashed (1/{round(1 / fraction)} of the ids' rows)", batch_size=batch_size,
                  params=params, progress=progress)


def examples_gone_through(run: Callable, n: int, epochs: int = 2) -> int:
    """How many examples `run` (online, frozen or hashed) tells its progress about, for a bar's total."""
    return n // 2 * epochs + (n - n // 2) if run is frozen else n


def report(runs: list[Run], out_dir: Path, title: str) -> tuple[Path, Path]:
    """The runs as JSON and as a PNG plot of AUC and log loss over the stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "report.json"
    js.write_text(json.dumps({"title": title, "runs": [asdict(r) for r in runs]}, indent=1))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for r in runs:
        xs = [c[0] for c in r.curve]
        ax1.plot(xs, [c[1] for c in r.curve], label=f"{r.name} (AUC 2nd half {r.auc_second_half:.3f})")
        ax2.plot(xs, [c[2] for c in r.curve], label=r.name)
    ax1.set_ylabel("progressive AUC")
    ax2.set_ylabel("log loss")
    ax2.set_xlabel("examples seen (event-time order)")
    ax1.axvline(xs[-1] / 2 if runs and runs[0].curve else 0, color="grey", linestyle=":")
    ax1.legend(fontsize=8)
    ax1.set_title(title)
    fig.tight_layout()
    png = out_dir / "report.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return js, png
