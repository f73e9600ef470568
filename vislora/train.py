"""The training loop: one readable loop for classification and detection, every knob read from the recipe.

A run directory holds: recipe.yaml (resolved), classes.json, adapter/ (LoRA runs, PEFT layout) or
weights.safetensors (full fine-tuning / linear probe: the trained tensors), checkpoints/{last,best}.pt
(training state, written then renamed), metrics.jsonl and curves.png.
Multi-process: `torchrun --nproc_per_node N -m vislora train ...` (DDP, gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vislora import data as vdata
from vislora.adapters import save_adapter
from vislora.inject import classifier_names, inject, lora_layers, set_trainable, trainable_summary
from vislora.recipe import lora_config, save_recipe


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---- set-up helpers -------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available")
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it ('auto'), fp16 or bf16 on request, none on CPU by default."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp in ("bf16", "auto"):
        return torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    raise ValueError(f"train.amp must be auto, bf16, fp16 or none, not {amp!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def load_weights(model: nn.Module, path: str | Path, skip: list[str] = ()) -> None:
    """Load a safetensors file into `model`. Keys under `skip` (a classifier of another size) are dropped;
    any other missing, unknown or mis-shaped key is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.checkpoint not found: {path}")
    state = load_file(str(path))
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if not (any(k.startswith(s + ".") for s in skip) and (k not in own or own[k].shape != v.shape))}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and
             own[k].shape != v.shape]
    unknown = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not any(k.startswith(s + ".") for s in skip)]
    if wrong or unknown or missing:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {missing[:5]}, unknown {unknown[:5]}, "
                         f"shape mismatch {wrong[:5]}")
    model.load_state_dict(state, strict=False)


def build_classifier(recipe: dict, num_classes: int) -> nn.Module:
    """timm.create_model from the recipe's model section, with local checkpoint weights if given."""
    m = recipe["model"]
    model = timm.create_model(m["name"], pretrained=m["pretrained"], num_classes=num_classes, **m["kwargs"])
    if m["checkpoint"]:
        load_weights(model, m["checkpoint"], skip=classifier_names(model))
    return model


def apply_adapter(model: nn.Module, recipe: dict) -> nn.Module:
    """LoRA (recipe.adapter is a mapping), linear probe (only the classifier trains) or full fine-tuning."""
    adapter = recipe["adapter"]
    if isinstance(adapter, dict):
        return inject(model, lora_config(recipe))
    if adapter == "linear_probe":
        heads = classifier_names(model)
        if not heads:
            raise ValueError(f"adapter: linear_probe needs a classifier, and {type(model).__name__} has none")
        set_trainable(model, heads)
        model.vislora_train = list(heads)
    return model


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: parameters that require grad, and every buffer (running statistics)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in trainable | buffers}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Only requires_grad parameters; no decay on biases and norm weights (1-d), decay on LoRA factors."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---- the two tasks --------------------------------------------------------------------------------
@dataclass
class Setup:
    """Everything the loop needs, built once from the recipe."""

    model: nn.Module
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    collate: object
    class_names: list[str]
    preprocess: dict


def classification_setup(recipe: dict, adapt: Callable[[nn.Module, dict], nn.Module] = apply_adapter) -> Setup:
    d = recipe["data"]
    train_split, val_split = vdata.scan_folder(d["path"], d["val_fraction"], recipe["train"]["seed"])
    model = build_classifier(recipe, len(train_split.classes))
    overrides = {k: d[k] for k in ("img_size", "mean", "std", "interpolation", "crop_pct") if d[k] is not None}
    pre = vdata.preprocess_config(model, overrides)
    pre["class_names"] = train_split.classes
    train_set = vdata.ImageDataset(train_split, vdata.build_transform(pre, True, d["augment"]))
    val_set = vdata.ImageDataset(val_split, vdata.build_transform(pre, False))
    model = adapt(model, recipe)
    return Setup(model, train_set, val_set, vdata.collate_skip, train_split.classes, pre)


def detection_setup(recipe: dict) -> Setup:
    from vislora import detection

    d, det = recipe["data"], recipe["detector"]
    a = d["augment"]
    augment = {"hflip": a.get("hflip", 0.5), "scale": a.get("scale"), "color": a.get("color_jitter", 0.0)}
    train_set, val_set, names = detection.build_detection_datasets(d, det["min_size"], augment)
    model = detection.build_detector(recipe["model"], det, len(names))
    if recipe["adapter"] == "linear_probe":  # neck and head train, the whole backbone is frozen
        set_trainable(model, detection.detection_train_modules(model))
    else:
        detection.adapt_detector(model, lora_config(recipe))
    pre = {"input_size": [3, det["min_size"], det["min_size"]], "class_names": names, "task": "detection"}
    return Setup(model, train_set, val_set, detection.detection_collate, names, pre)


def classification_step(model, batch, device, smoothing) -> tuple[torch.Tensor, dict, int]:
    images, labels = (t.to(device, non_blocking=True) for t in batch)
    logits = model(images)
    loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    correct = (logits.argmax(1) == labels).sum().item()
    return loss, {"acc": correct / max(1, len(labels))}, len(labels)


def detection_step(model, batch, device, smoothing) -> tuple[torch.Tensor, dict, int]:
    from vislora.detection import detection_loss

    images, targets = batch
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    loss, logs = detection_loss(model, images, targets)
    return loss, logs, len(images)


@torch.no_grad()
def validate_classifier(model, loader, device, amp_dtype, world: int) -> dict:
    """Loss, top-1 and top-5 over the validation loader (sums reduced across ranks)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        sums += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(), hit[:, 0].sum().item(),
                              hit.any(1).sum().item(), len(labels)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(sums)
    n = max(sums[3].item(), 1)
    return {"val_loss": sums[0].item() / n, "val_top1": sums[1].item() / n, "val_top5": sums[2].item() / n}


def validate_detector(model, loader, device, class_names) -> dict:
    from vislora.detection import evaluate_detection

    report = evaluate_detection(model, loader, class_names, device=device)
    return {"val_map": report["map"], "val_map50": report["map50"]}


def rank_divergence(model: nn.Module) -> float:
    """Largest difference between any rank's trained parameters and rank 0's (0.0 when DDP kept them in sync)."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters() if p.requires_grad])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


# ---- the loop -------------------------------------------------------------------------------------
def plot_curves(metrics: list[dict], path: Path) -> None:
    """Loss and validation metric per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [m["train_loss"] for m in metrics], label="train")
    if "val_loss" in metrics[0]:
        ax1.plot(epochs, [m["val_loss"] for m in metrics], label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    for key in ("train_acc", "val_top1", "val_top5", "val_map", "val_map50"):
        if key in metrics[0]:
            ax2.plot(epochs, [m[key] for m in metrics], label=key)
    ax2.set(xlabel="epoch", title="accuracy / mAP")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_trained(model: nn.Module, run_dir: Path) -> None:
    """The deliverable of a run: adapter/ for LoRA (PEFT layout), else weights.safetensors (trained tensors)."""
    if any(True for _ in lora_layers(model)):
        save_adapter(model, run_dir / "adapter")
    else:
        tmp = run_dir / "weights.safetensors.tmp"
        save_file(trained_state(model), str(tmp))
        os.replace(tmp, run_dir / "weights.safetensors")


def train(recipe: dict, run_dir: str | Path, resume: bool = False,
          adapt: Callable[[nn.Module, dict], nn.Module] = apply_adapter) -> Path:
    """Run the recipe; returns the run directory. Resumable from checkpoints/last.pt with `resume`.

    adapt(model, recipe) prepares a classifier for training; benchmarks pass another (e.g. PEFT's) to run it
    through this same loop.
    """
    run_dir = Path(run_dir)
    t = recipe["train"]
    device = resolve_device(t["device"])
    rank, world = init_distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    main = rank == 0
    seed_everything(t["seed"])
    detection = recipe["task"] == "detection"
    setup = detection_setup(recipe) if detection else classification_setup(recipe, adapt)
    model = setup.model.to(device)
    ckpt_dir = run_dir / "checkpoints"
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
        (run_dir / "classes.json").write_text(json.dumps(setup.class_names))
        (run_dir / "preprocess.json").write_text(json.dumps(setup.preprocess, indent=2))
    summary = trainable_summary(model)
    amp_dtype = autocast_dtype(t["amp"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    optimizer = torch.optim.AdamW(param_groups(model, t["weight_decay"]), lr=t["lr"])

    d = recipe["data"]
    sampler = torch.utils.data.distributed.DistributedSampler(setup.train_set, world, rank, seed=t["seed"]) \
        if world > 1 else None
    val_sampler = torch.utils.data.distributed.DistributedSampler(setup.val_set, world, rank, shuffle=False) \
        if world > 1 else None
    loader_args = dict(workers=d["workers"], seed=t["seed"], collate_fn=setup.collate, pin_memory=device.type == "cuda")
    train_loader = vdata.build_loader(setup.train_set, t["batch_size"], True, sampler=sampler, **loader_args)
    val_loader = vdata.build_loader(setup.val_set, recipe["eval"]["batch_size"] or t["batch_size"], False,
                                    sampler=val_sampler, **loader_args)
    steps_per_epoch = max(1, len(train_loader) // t["grad_accum"])
    total = steps_per_epoch * t["epochs"]
    if t["max_steps"]:
        total = min(total, t["max_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, total, int(t["warmup_epochs"] * steps_per_epoch), t["min_lr"] / t["lr"] if t["lr"] else 0.0))

    start_epoch, step, best, history = 0, 0, -math.inf, []
    if resume and (ckpt_dir / "last.pt").is_file():
        state = torch.load(ckpt_dir / "last.pt", map_location="cpu", weights_only=True)
        missing = set(state["model"]) - set(model.state_dict())
        if missing:
            raise ValueError(f"{ckpt_dir / 'last.pt'} does not fit the recipe's model: {sorted(missing)[:5]}")
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, best = state["epoch"], state["step"], state["best"]
        metrics_path = run_dir / "metrics.jsonl"
        history = [json.loads(line) for line in metrics_path.read_text().splitlines()][:start_epoch] \
            if metrics_path.is_file() else []
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    step_fn = detection_step if detection else classification_step
    penalty_fn = None
    if t["lowrank_penalty"] or t["factor_l2"]:
        from vislora.svd import factor_l2, frobenius_penalty

        def penalty_fn(m):
            return t["lowrank_penalty"] * frobenius_penalty(m) + t["factor_l2"] * factor_l2(m)

    if main:
        print(f"vislora: {summary['trainable']:,} of {summary['total']:,} parameters trainable "
              f"({100 * summary['trainable_share']:.2f}%), {summary['adapted_layers']} adapted layers, "
              f"{len(setup.train_set)} train / {len(setup.val_set)} val images, device {device}, world {world}")
    for epoch in range(start_epoch, t["epochs"]):
        if t["max_steps"] and step >= t["max_steps"]:
            break
        seed_everything(t["seed"] * 1000 + epoch)  # resume at an epoch boundary replays the same randomness
        train_loader.generator.manual_seed(t["seed"] * 1000 + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        if hasattr(setup.train_set.transform, "set_random_seed"):
            setup.train_set.transform.set_random_seed(t["seed"] * 1000 + epoch)
        net.train()
        sums = {"loss": 0.0, "acc": 0.0, "penalty": 0.0}
        seen, batches, tic = 0, 0, time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{t['epochs']}", disable=not main, leave=False)
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, logs, n = step_fn(net, batch, device, t["label_smoothing"])
                penalty = penalty_fn(model) if penalty_fn else None
                total_loss = loss + penalty if penalty is not None else loss
            if not torch.isfinite(total_loss):
                raise TrainingDiverged(f"loss is {total_loss.item()} at epoch {epoch + 1}, batch {i + 1}: stopped. "
                                       f"The last good checkpoint is {ckpt_dir / 'last.pt'}; lower train.lr or "
                                       "enable train.clip_grad")
            scaler.scale(total_loss / t["grad_accum"]).backward()
            if (i + 1) % t["grad_accum"] == 0:
                if t["clip_grad"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t["clip_grad"])
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
            sums["loss"] += loss.item() * n
            sums["acc"] += logs.get("acc", 0.0) * n
            sums["penalty"] += (penalty.item() if penalty is not None else 0.0) * n
            seen, batches = seen + n, batches + 1
            shown = {"loss": f"{sums['loss'] / seen:.4f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}",
                     "img_s": f"{seen / (time.perf_counter() - tic):.1f}"}
            if not detection:
                shown["acc"] = f"{sums['acc'] / seen:.3f}"
            bar.set_postfix(shown)
            if t["max_steps"] and step >= t["max_steps"]:
                break
        elapsed = time.perf_counter() - tic
        row = {"epoch": epoch + 1, "step": step, "train_loss": sums["loss"] / max(seen, 1),
               "lr": scheduler.get_last_lr()[0], "images_per_s": seen * world / max(elapsed, 1e-9),
               "epoch_s": elapsed}
        if not detection:
            row["train_acc"] = sums["acc"] / max(seen, 1)
        if penalty_fn:
            row["penalty"] = sums["penalty"] / max(seen, 1)
        if detection:
            row.update(validate_detector(model, val_loader, device, setup.class_names) if main else {})
        else:
            row.update(validate_classifier(net, val_loader, device, amp_dtype, world))
        score = row.get("val_top1", row.get("val_map", -row["train_loss"]))
        improved = score > best
        best = max(best, score)
        history.append(row)
        if main:
            state = {"epoch": epoch + 1, "step": step, "best": best, "model": trained_state(model),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict()}
            atomic_save(state, ckpt_dir / "last.pt")
            if improved:
                atomic_save(state, ckpt_dir / "best.pt")
                save_trained(model, run_dir)
            tmp = run_dir / "metrics.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
            os.replace(tmp, run_dir / "metrics.jsonl")
            plot_curves(history, run_dir / "curves.png")
            shown = {k: round(v, 4) for k, v in row.items() if k.startswith(("val_", "train_"))}
            tqdm.write(f"epoch {epoch + 1}: {shown} ({elapsed:.1f}s, {row['images_per_s']:.0f} img/s)")
    rank_difference = rank_divergence(model) if world > 1 else 0.0
    if main:
        skipped = getattr(setup.train_set, "skipped", []) + getattr(setup.val_set, "skipped", [])
        if skipped:
            print(f"vislora: skipped {len(skipped)} unreadable image(s): {', '.join(map(str, skipped[:5]))}")
        result = {"summary": summary, "best": best, "epochs": len(history), "run_dir": str(run_dir),
                  "world_size": world, "max_rank_difference": rank_difference}
        (run_dir / "train_summary.json").write_text(json.dumps(result, indent=2))
    if world > 1:
        dist.barrier()
    return run_dir
