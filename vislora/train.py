"""The training loop: one readable loop for every task, every knob read from the recipe.

train() reads as set-up -> epochs -> finish. The task (vislora.tasks) builds the data and the model
and says what one step's loss and the validation metrics are; the loop never asks which task it
runs. What the run directory holds, checkpoints and the per-epoch log are vislora.rundir's.
Multi-process: `torchrun --nproc_per_node N -m vislora train ...` (DDP, gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from vislora import data as vdata
from vislora import knobs, rundir, runpaths, tasks
from vislora.errors import TrainingDiverged, VisloraError, first_rank
from vislora.files import listing, write_json
from vislora.inject import trainable_summary
from vislora.knobs import autocast_dtype, build_optimizer, resolve_device
from vislora.layers import adapter_exceeds_layer
from vislora.loggers import Loggers
from vislora.svd import factor_l2, frobenius_penalty
from vislora.targets import lora_layers
from vislora.tasks.common import Setup, plot_image_grid


# ---- set-up helpers ------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(device: torch.device) -> tuple[torch.device, int, int]:
    """(device, rank, world size); initialises the process group when launched by torchrun (one GPU
    per rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return (device, dist.get_rank(), world) if world > 1 else (device, 0, 1)


def rank_divergence(model: nn.Module) -> float:
    """Largest difference between any rank's trained parameters and rank 0's (0.0 when DDP kept them
    in sync)."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters() if p.requires_grad])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


# ---- the loop's state ----------------------------------------------------------------------------
@dataclass
class Loop:
    """What the epochs share: built once by setup(), updated by every epoch."""

    recipe: dict
    task: ModuleType
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    setup: Setup
    model: nn.Module  # the adapted model; `net` is the same, wrapped for DDP when world > 1
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None  # None: no val split, the last epoch is kept
    sampler: torch.utils.data.distributed.DistributedSampler | None
    penalty: Callable[[nn.Module], torch.Tensor] | None
    ema: knobs.TrainedEma | None = None  # train.ema
    mixup: knobs.BatchMix | None = None  # data.augment.mixup / cutmix
    loggers: Loggers | None = None  # summary.csv and train.log's
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    best: float = -math.inf
    history: list[dict] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.rank == 0


def build_loaders(recipe: dict, setup: Setup, device: torch.device, rank: int, world: int):
    """Train loader (a DistributedSampler under DDP; a small folder passed over several times an
    epoch to reach train.min_steps) and val loader (each rank an exact, unpadded shard)."""
    t, d = recipe["train"], recipe["data"]
    args = dict(workers=d["workers"], seed=t["seed"], collate_fn=setup.collate, pin_memory=device.type == "cuda")
    passes = vdata.passes_for(len(setup.train_set), t, world)
    train_set = vdata.Repeated(setup.train_set, passes) if passes > 1 else setup.train_set
    sampler = torch.utils.data.distributed.DistributedSampler(train_set, world, rank, seed=t["seed"]) \
        if world > 1 else None
    train_loader = vdata.build_loader(train_set, t["batch_size"], True, sampler=sampler, **args)
    val_loader = None
    if len(setup.val_set):
        shard = range(rank, len(setup.val_set), world) if world > 1 else None
        val_loader = vdata.build_loader(setup.val_set, recipe["eval"]["batch_size"] or t["batch_size"], False,
                                        sampler=shard, **args)
    return train_loader, val_loader, sampler


def penalty_of(t: dict) -> Callable[[nn.Module], torch.Tensor] | None:
    """train.lowrank_penalty * sum ||s B A||_F^2 + train.factor_l2 * sum (||A||^2 + ||B||^2), if
    either is set."""
    if not (t["lowrank_penalty"] or t["factor_l2"]):
        return None
    return lambda m: t["lowrank_penalty"] * frobenius_penalty(m) + t["factor_l2"] * factor_l2(m)


def setup(recipe: dict, run_dir: Path, resume: bool, adapt: Callable | None) -> Loop:
    """Device and processes, the task's data and model, the adapter, optimizer and schedule;
    restores checkpoints/last.pt with `resume`."""
    t = recipe["train"]
    task = tasks.get(recipe["task"])
    device, rank, world = init_distributed(resolve_device(t["device"]))
    if resume:
        runpaths.check_resumable(run_dir, recipe)
    seed_everything(t["seed"])
    built = task.build(recipe)
    model = knobs.prepare((adapt or task.adapt)(built.model, recipe).to(device), t)
    train_loader, val_loader, sampler = build_loaders(recipe, built, device, rank, world)
    optimizer, scheduler = build_optimizer(model, t, math.ceil(len(train_loader) / t["grad_accum"]))
    if rank == 0:
        if not resume:
            runpaths.clear(run_dir)
        rundir.start(run_dir, recipe, built.class_names, built.preprocess, built.split)
    amp_dtype = autocast_dtype(t["amp"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loop = Loop(recipe, task, run_dir, device, rank, world, built, model, knobs.Compiled(net) if t["compile"] else net,
                optimizer, scheduler, scaler, amp_dtype, train_loader, val_loader, sampler, penalty_of(t),
                knobs.build_ema(model, t["ema"]), knobs.build_mixup(recipe, len(built.class_names)))
    if resume:
        restore(loop)
        refuse_finished(loop)
    loop.loggers = Loggers(recipe, run_dir, loop.step if resume else None, rank == 0)
    return loop


def restore(loop: Loop) -> None:
    """Model, optimizer, schedule, scaler, counters and the metric history of
    checkpoints/last.pt."""
    state = rundir.load_checkpoint(loop.run_dir)
    missing = set(state["model"]) - set(loop.model.state_dict())
    if missing:
        raise VisloraError(f"{loop.run_dir / runpaths.CHECKPOINTS / 'last.pt'} does not fit the recipe's model: "
                         f"{sorted(missing)[:5]}")
    loop.model.load_state_dict(state["model"], strict=False)  # keys upgraded in load_checkpoint
    try:
        loop.optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:  # e.g. a checkpoint of a vislora before the head had parameter groups of its own
        raise VisloraError(f"{loop.run_dir / runpaths.CHECKPOINTS / 'last.pt'}: its optimizer state does not fit this "
                         f"run's parameter groups ({e}); start the run again with --force") from None
    loop.scheduler.load_state_dict(state["scheduler"])
    loop.scaler.load_state_dict(state["scaler"])
    if loop.ema is not None:
        loop.ema.load_state_dict(state["ema"])
    loop.epoch, loop.step, loop.best = state["epoch"], state["step"], state["best"]
    loop.history = state.get("history") or rundir.read_metrics(loop.run_dir)[:loop.epoch]  # older checkpoints


def refuse_finished(loop: Loop) -> None:
    """--resume on a run that trained all its epochs (or train.max_steps) and wrote its summary:
    nothing to do, which is an error that says so (it did nothing, silently, before)."""
    t = loop.recipe["train"]
    done = loop.epoch >= t["epochs"] or bool(t["max_steps"] and loop.step >= t["max_steps"])
    if done and (loop.run_dir / runpaths.SUMMARY).is_file():
        raise VisloraError(f"--resume: {loop.run_dir} already finished (epoch {loop.epoch} of train.epochs="
                         f"{t['epochs']}), so there is nothing to resume: evaluate it (vislora eval "
                         f"{loop.run_dir}), or train a longer run into a new --out (--set train.epochs=N)")


# ---- one epoch -----------------------------------------------------------------------------------
def reseed(loop: Loop, epoch: int) -> None:
    """Every source of randomness from (seed, epoch) only: resuming at an epoch boundary replays it
    exactly."""
    seed = loop.recipe["train"]["seed"] * 1000 + epoch
    seed_everything(seed)
    loop.train_loader.generator.manual_seed(seed)
    if loop.sampler is not None:
        loop.sampler.set_epoch(epoch)
    if hasattr(loop.setup.train_set.transform, "set_random_seed"):
        loop.setup.train_set.transform.set_random_seed(seed)


def optimizer_step(loop: Loop) -> None:
    t = loop.recipe["train"]
    if t["clip_grad"]:
        loop.scaler.unscale_(loop.optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in loop.model.parameters() if p.requires_grad], t["clip_grad"])
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()
    loop.step += 1
    if loop.ema is not None:
        loop.ema.update(loop.step)


def finite_on_every_rank(loop: Loop, loss: torch.Tensor) -> bool:
    """The loss is finite on this rank and, under DDP, on every other: all ranks stop together (a
    rank that stopped alone would leave the others waiting in the gradient all-reduce)."""
    finite = torch.isfinite(loss.detach()).all()
    if loop.world == 1:
        return bool(finite)
    flag = finite.to(device=loop.device, dtype=torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def diverged(loop: Loop, value: float, epoch: int, batch: int) -> TrainingDiverged:
    last = loop.run_dir / runpaths.CHECKPOINTS / "last.pt"
    kept = f"the last good checkpoint is {last}" if last.is_file() else "no epoch finished, so no checkpoint exists"
    return TrainingDiverged(f"loss is {value} at epoch {epoch + 1}, batch {batch + 1}: stopped; {kept}. Lower "
                            "train.lr or set train.clip_grad")


def train_epoch(loop: Loop, epoch: int) -> dict:
    """One pass over the train loader; an optimizer step every grad_accum batches and on the epoch's
    last one."""
    t, n_batches = loop.recipe["train"], len(loop.train_loader)
    reseed(loop, epoch)
    loop.net.train()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    seen, tic = 0, time.perf_counter()
    bar = tqdm(loop.train_loader, desc=f"epoch {epoch + 1}/{t['epochs']}", disable=not loop.main, leave=False)
    loop.optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(bar):
        group = min(t["grad_accum"], n_batches - i // t["grad_accum"] * t["grad_accum"])  # batches in this step
        batch = loop.mixup(batch) if loop.mixup is not None else batch
        with torch.autocast(loop.device.type, dtype=loop.amp_dtype, enabled=loop.amp_dtype is not None):
            loss, logs, n = loop.task.loss(loop.net, batch, loop.device, loop.recipe)
            penalty = loop.penalty(loop.model) if loop.penalty is not None else None
            loss_total = loss + penalty if penalty is not None else loss
        if not finite_on_every_rank(loop, loss_total):
            raise diverged(loop, loss_total.item(), epoch, i)
        loop.scaler.scale(loss_total / group).backward()
        logged = {"train_loss": loss.item(), **{f"train_{k}": float(v) for k, v in logs.items()}}
        if penalty is not None:
            logged["penalty"] = penalty.item()
        if (i + 1) % t["grad_accum"] == 0 or i + 1 == n_batches:
            optimizer_step(loop)
            loop.loggers.step(loop.step, {**logged, "lr": max(loop.scheduler.get_last_lr())})
        for key, value in logged.items():
            if math.isfinite(value):
                sums[key], counts[key] = sums.get(key, 0.0) + value * n, counts.get(key, 0) + n
        seen += n
        shown = {"loss": sums.get("train_loss"), "acc": sums.get("train_acc")}
        bar.set_postfix({k: f"{v / counts['train_' + k]:.4f}" for k, v in shown.items() if v is not None} |
                        {"lr": f"{max(loop.scheduler.get_last_lr()):.2e}",
                         "img_s": f"{seen / (time.perf_counter() - tic):.1f}"})
        if t["max_steps"] and loop.step >= t["max_steps"]:
            break
    elapsed = time.perf_counter() - tic
    return {"epoch": epoch + 1, "step": loop.step, **{k: sums[k] / counts[k] for k in sums},
            "lr": max(loop.scheduler.get_last_lr()), "images_per_s": seen * loop.world / max(elapsed, 1e-9),
            "epoch_s": elapsed}


def checkpoint_state(loop: Loop) -> dict:
    """What last.pt and best.pt hold: the trained tensors (copies: an EMA swap must not reach them),
    optimizer, schedule, scaler, counters, the metric history and the EMA's state."""
    model = {k: v.clone() for k, v in rundir.trained_state(loop.model).items()}
    return {"epoch": loop.epoch, "step": loop.step, "best": loop.best, "model": model,
            "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
            "scaler": loop.scaler.state_dict(), "history": loop.history,
            **({"ema": loop.ema.state_dict()} if loop.ema is not None else {})}


def end_epoch(loop: Loop, row: dict) -> None:
    """Validate, warn on a collapsed run, then (rank 0) checkpoint, keep the best model and log the
    epoch. Without a val split, or with a metric that is not a number (no boxes to score), the last
    epoch is kept."""
    if loop.val_loader is not None:
        validate = functools.partial(loop.task.validate, loop.model, loop.val_loader, loop.device, loop.amp_dtype,
                                     loop.world)
        row.update(validate())
        row.update(knobs.ema_metrics(loop.ema, validate) if loop.ema is not None else {})
    score, use_ema = knobs.kept_score(row, loop.task.SCORE)
    improved = not math.isfinite(score) or score > loop.best
    if math.isfinite(score):
        loop.best = max(loop.best, score)
    if use_ema:
        row["ema_kept"] = improved  # the run's model is the EMA's when it improved (vislora.knobs)
    warning = collapse_check(loop, row)
    loop.history.append(row)
    loop.epoch = row["epoch"]
    if not loop.main:
        return
    state = checkpoint_state(loop)  # the raw weights, taken before the EMA's are swapped in to be saved
    with loop.ema.applied() if use_ema and improved else contextlib.nullcontext():
        rundir.save_epoch(loop.run_dir, loop.model, state, improved,
                          {"score": loop.task.SCORE, "num_classes": len(loop.setup.class_names)})
    loop.loggers.epoch(loop.history)
    shown = {k: round(v, 4) for k, v in row.items() if k.startswith(("val_", "train_")) and isinstance(v, float)}
    tqdm.write(f"epoch {loop.epoch}: {shown} ({row['epoch_s']:.1f}s, {row['images_per_s']:.0f} img/s)")
    if warning:
        tqdm.write(f"vislora: warning: {warning}")


# ---- a collapsed run: the warning after warm-up, and the recovery (issues #30, #31) --------------
COLLAPSE_LR_FACTOR = 0.2  # a recovery goes on at 1/5 of the lr in use
MAX_RECOVERIES = 2  # then only the warning
# epochs in a row the health check must fail before it counts: with 1-2 steps an epoch, one epoch of
# a single predicted class right after warm-up is a transient (issue #30's proof set: 2 of 15
# MobileNetV2 LoRA runs; left alone they end at 65.0 and 91.7, recovered after that one epoch at
# 66.2 and 78.3); real collapses lasted 7-9 epochs
COLLAPSE_EPOCHS = 2


def in_warmup(loop: Loop) -> bool:
    """Whether the last optimizer step was inside the warm-up (or an LP-FT head stage before it): a
    zero head still gives every image one class there, which is no collapse."""
    schedule = loop.scheduler.lr_lambdas[0].keywords  # build_optimizer's `staged` arguments
    return loop.step <= schedule["head_steps"] + schedule["warmup"]


def unhealthy_streak(history: list[dict]) -> int:
    """Epochs in a row, at the end of `history`, whose health check failed since the last
    recovery."""
    streak = 0
    for row in reversed(history):
        if not row.get("unhealthy") or "recovery" in row:
            break
        streak += 1
    return streak


def collapse_check(loop: Loop, row: dict) -> str | None:
    """The task's health warning once its check has failed COLLAPSE_EPOCHS epochs in a row after
    warm-up (rank 0 decides for every rank; each failed epoch is marked "unhealthy" in its row),
    with the lr in use and a ready command; with train.on_collapse: recover, the recovery it
    triggers. Written into the row."""
    warning = None if in_warmup(loop) else loop.task.health(row, len(loop.setup.class_names))
    if loop.world > 1:
        shared = [warning]
        dist.broadcast_object_list(shared, src=0)
        warning = shared[0]
    if warning:
        row["unhealthy"] = True
    if not warning or unhealthy_streak(loop.history) + 1 < COLLAPSE_EPOCHS:
        return None
    lr = max(loop.scheduler.base_lrs)
    lower = float(f"{lr * COLLAPSE_LR_FACTOR:.2g}")
    recipe_file = loop.run_dir / rundir.RECIPE
    warning += (f". The lr in use is {lr:.2g}; to train at {lower:.2g} from the start: vislora train {recipe_file} "
                f"--set train.lr={lower:g} --out {loop.run_dir}-lr{lower:g}")
    recoveries = sum("recovery" in r for r in loop.history)
    if loop.recipe["train"]["on_collapse"] == "recover" and recoveries < MAX_RECOVERIES:
        recover(loop, row)
        back = row["recovery"]["restored_epoch"]
        warning += (f". Recovered (train.on_collapse: recover, {recoveries + 1} of {MAX_RECOVERIES}): "
                    f"{f'epoch {back} restored from checkpoints/best.pt' if back else 'nothing to restore'}, the rest "
                    f"of the schedule at lr {row['recovery']['lr_after']:.2g}")
    row["warning"] = warning
    return warning


def recover(loop: Loop, row: dict) -> None:
    """The best epoch's model and optimizer state back from checkpoints/best.pt, then every group's
    lr times COLLAPSE_LR_FACTOR for the rest of the schedule; recorded in the row (metrics.jsonl).
    last.pt, written next, holds the recovered state, so --resume continues the recovery exactly."""
    before, best = max(loop.scheduler.base_lrs), loop.run_dir / rundir.CHECKPOINTS / "best.pt"
    restored = None
    if best.is_file():
        state = rundir.load_checkpoint(loop.run_dir, best.name, "collapse recovery")
        loop.model.load_state_dict(state["model"], strict=False)
        loop.optimizer.load_state_dict(state["optimizer"])
        if loop.ema is not None:
            loop.ema.load_state_dict(state["ema"])
        restored = state["epoch"]
    scale_lr(loop, COLLAPSE_LR_FACTOR)
    row["recovery"] = {"restored_epoch": restored, "lr_before": before, "lr_after": max(loop.scheduler.base_lrs)}


def scale_lr(loop: Loop, factor: float) -> None:
    """Every parameter group's peak lr times `factor`; the schedule keeps its place (warm-up,
    cosine)."""
    scheduler = loop.scheduler
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group, base, factor_of in zip(loop.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                      strict=True):
        group["initial_lr"], group["lr"] = base, base * factor_of(scheduler.last_epoch)


def closing_line(loop: Loop, seconds: float) -> str:
    """What the run kept and where it ended: 'best val_top1 0.951 at epoch 7 (kept), last 0.940, 312
    s'."""
    score = loop.task.SCORE
    rows = [r for r in loop.history if isinstance(r.get(score), (int, float)) and math.isfinite(r[score])]
    if loop.val_loader is None or not rows:
        return f"vislora: kept the last epoch ({loop.epoch}; no val score to pick one by), {seconds:.0f} s"
    best = max(rows, key=lambda r: knobs.kept_score(r, score)[0])  # the first of equal scores: the one kept
    value, ema = knobs.kept_score(best, score)
    return (f"vislora: best {score} {value:.4f}{' (EMA weights)' if ema else ''} at epoch {best['epoch']} (kept), "
            f"last {rows[-1][score]:.4f}, {seconds:.0f} s")


def finish(loop: Loop, summary: dict, seconds: float = 0.0) -> None:
    """train_summary.json, the skipped files, the closing line, and a check that every rank holds
    the same model. seconds: this call's training time."""
    difference = rank_divergence(loop.model) if loop.world > 1 else 0.0
    if loop.main:
        skipped = getattr(loop.setup.train_set, "skipped", []) + getattr(loop.setup.val_set, "skipped", [])
        if skipped:
            print(f"vislora: skipped {len(skipped)} unreadable or unusable file(s): {listing(skipped)}")
        result = {"summary": summary, "best": loop.best, "epochs": len(loop.history), "run_dir": str(loop.run_dir),
                  "world_size": loop.world, "max_rank_difference": difference,
                  "kept": "best" if loop.val_loader is not None else "last"}
        write_json(loop.run_dir / runpaths.SUMMARY, result)  # standard JSON: no val split gives best null
        print(closing_line(loop, seconds))
    loop.loggers.finish(loop.step, final_confusion(loop), loop.setup.class_names)
    if loop.world > 1:
        dist.barrier()


def final_confusion(loop: Loop) -> list[list[int]] | None:
    """The val confusion matrix of the model as training left it, for train.log's loggers (None: the
    task has none, vislora.tasks.OPTIONAL)."""
    if not loop.recipe["train"]["log"] or loop.val_loader is None:
        return None
    return loop.task.confusion(loop.model, loop.val_loader, loop.device, loop.amp_dtype, loop.world)


def announce(loop: Loop, summary: dict) -> None:
    setup = loop.setup
    for note in setup.notes:
        print(f"vislora: {note}")
    print(f"vislora: {summary['trainable']:,} of {summary['total']:,} parameters trainable "
          f"({100 * summary['trainable_share']:.2f}%), {summary['adapted_layers']} adapted layers, "
          f"{len(setup.train_set)} train / {len(setup.val_set)} val images, device {loop.device}, world {loop.world}")
    oversized = [name for name, layer in lora_layers(loop.model) if adapter_exceeds_layer(layer)]
    if oversized:
        print(f"vislora: note: {len(oversized)} adapter(s) hold more parameters than the layer they adapt (small "
              f"depthwise convs at this r): {listing(oversized, 3)}; adapter.rank_pattern can lower r for them")
    if loop.val_loader is None:
        print("vislora: no val split (data.val_fraction: 0): every epoch is kept as the run's model, not the best "
              "one; evaluate it with `vislora eval RUN --data DIR`")


def write_preview(loop: Loop, n: int = 16) -> None:
    """train_batch.png: n training images (a seeded pick) as the model gets them, augmented and
    resized, with their labels: what to look at when accuracy is poor (a crop that cuts the object
    out, a flip that changes a digit). The epochs do not notice: every epoch reseeds the
    augmentation (reseed)."""
    data = loop.setup.train_set
    picks = random.Random(loop.recipe["train"]["seed"]).sample(range(len(data)), min(n, len(data)))
    items = [item for item in (data[i] for i in picks) if item is not None]
    tiles = loop.task.preview(loop.setup.collate(items), loop.setup.preprocess, loop.setup.class_names) if items else []
    plot_image_grid(tiles, loop.run_dir / runpaths.TRAIN_BATCH, f"{len(tiles)} training inputs as the model sees "
                    "them (augmented, resized)")


# ---- the loop ------------------------------------------------------------------------------------
def train(recipe: dict, run_dir: str | Path, resume: bool = False, adapt: Callable | None = None) -> Path:
    """Run the recipe; returns the run directory. `resume` continues from checkpoints/last.pt (which
    must exist, with the run's own recipe). adapt(model, recipe) replaces the task's adapter step;
    benchmarks pass another (e.g. PEFT's) to run it through this same loop."""
    run_dir, started = Path(run_dir), time.perf_counter()
    with runpaths.locked(run_dir) if first_rank() else contextlib.nullcontext():
        loop = setup(recipe, run_dir, resume, adapt)
        summary = trainable_summary(loop.model)
        if loop.main:
            announce(loop, summary)
            if not resume:
                write_preview(loop)
        t = recipe["train"]
        for epoch in range(loop.epoch, t["epochs"]):
            if t["max_steps"] and loop.step >= t["max_steps"]:
                break
            end_epoch(loop, train_epoch(loop, epoch))
        finish(loop, summary, time.perf_counter() - started)
    return run_dir
