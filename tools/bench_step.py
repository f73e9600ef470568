"""Training step time (forward + backward + AdamW step) of vislora LoRA vs PEFT LoRA vs full fine-tuning vs the limit.

The limit is the same frozen model with only the head trainable but gradients flowing back through every block
(the patch-embedding / stem output requires grad): the backward pass any adapter must pay for, with no weight
gradient inside the blocks. All contenders live in ONE process and run round-robin, one step each per round, so
a busy machine slows them alike; medians of the step times and medians of the per-round ratios to the limit,
in wall time and in CPU time.

    .venv/bin/python tools/bench_step.py                    # all suites below
    .venv/bin/python tools/bench_step.py --suite vit --rounds 30
    .venv/bin/python tools/bench_step.py --suite convnext-conv lite0-conv --native-dw   # depthwise before/after
    .venv/bin/python tools/bench_step.py --dora --threads 1   # + vislora DoRA and PEFT DoRA, DoRA / LoRA ratios
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vislora.layers  # noqa: E402
from vislora import LoraConfig, inject, lora_layers  # noqa: E402
from vislora.layers import _depthwise_on_cpu  # noqa: E402

VIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]  # in the blocks only (not patch_embed.proj)
SUITES = {
    # name: (timm model, img size, batch, vislora targets, PEFT target_modules, stem module)
    "vit": ("vit_small_patch16_224", 112, 16, VIT_TARGETS, VIT_TARGETS, "patch_embed"),
    "convnext": ("convnext_tiny", 96, 16, ["mlp.fc1", "mlp.fc2"], ["mlp.fc1", "mlp.fc2"], "stem"),
    "convnext-conv": ("convnext_tiny", 96, 16, "conv", None, "stem"),
    "lite0-conv": ("tf_efficientnet_lite0", 64, 64, "conv", None, "conv_stem"),
}


def base_model(name: str, img_size: int) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"img_size": img_size} if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).train()


def grad_from(module: nn.Module) -> None:
    """Make `module`'s output require grad, so backward runs through everything after it (no weight grads)."""
    module.register_forward_hook(lambda m, args, out: out.requires_grad_(True))


def limit(name: str, img_size: int, stem: str) -> nn.Module:
    model = base_model(name, img_size)
    model.requires_grad_(False)
    model.get_classifier().requires_grad_(True)
    grad_from(model.get_submodule(stem))
    return model


def vislora_model(name: str, img_size: int, targets, r: int, dora: bool = False) -> nn.Module:
    model = base_model(name, img_size)
    inject(model, LoraConfig(r=r, alpha=2 * r, targets=targets, use_dora=dora), verify=False)
    return model


def peft_model(name: str, img_size: int, targets, r: int, dora: bool = False) -> nn.Module:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    model = base_model(name, img_size)
    head = [n for n, m in model.named_modules() if m is model.get_classifier()]
    return get_peft_model(model, PeftConfig(r=r, lora_alpha=2 * r, target_modules=targets, modules_to_save=head,
                                            use_dora=dora))


def full(name: str, img_size: int) -> nn.Module:
    return base_model(name, img_size)


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One AdamW training step over the model's trainable parameters."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def native_depthwise(step: Callable[[], None]) -> Callable[[], None]:
    """The step with torch's own depthwise weight gradient instead of vislora's grouped-conv one (before/after)."""
    def run() -> None:
        vislora.layers._depthwise_on_cpu = lambda conv, x: False
        try:
            step()
        finally:
            vislora.layers._depthwise_on_cpu = _depthwise_on_cpu
    return run


def round_robin(steps: dict[str, Callable[[], None]], rounds: int, warmup: int
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of one call of each contender per round, rotating the order each round.

    CPU time (process_time) is the steadier figure on a shared machine: it does not count the time the
    process waits for a core (with one thread it is the compute itself)."""
    names = list(steps)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            tic, cpu_tic = time.perf_counter(), time.process_time()
            steps[n]()
            if i >= warmup:
                wall[n].append(time.perf_counter() - tic)
                cpu[n].append(time.process_time() - cpu_tic)
    return wall, cpu


def summarise(times: dict[str, list[float]], ref: str = "limit") -> dict[str, dict]:
    """Median time, ratio of medians and median of the per-round ratios, against `ref`."""
    rows = {}
    for n, t in times.items():
        paired = [a / b for a, b in zip(t, times[ref], strict=True)]
        rows[n] = {"median_s": statistics.median(t), "ratio": statistics.median(t) / statistics.median(times[ref]),
                   "paired_ratio": statistics.median(paired)}
    return rows


def run_suite(suite: str, rounds: int, warmup: int, r: int, batch: int | None, native_dw: bool = False,
              dora: bool = False) -> list[dict]:
    name, img, bs, targets, peft_targets, stem = SUITES[suite]
    bs = batch or bs
    torch.manual_seed(0)
    x, y = torch.randn(bs, 3, img, img), torch.randint(0, 10, (bs,))
    models = {"limit": limit(name, img, stem), "vislora": vislora_model(name, img, targets, r)}
    if dora:
        models["vislora-dora"] = vislora_model(name, img, targets, r, dora=True)
    peft_error = None
    if peft_targets is not None:
        models["peft"] = peft_model(name, img, peft_targets, r)
        if dora:
            models["peft-dora"] = peft_model(name, img, peft_targets, r, dora=True)
    else:
        try:
            peft_model(name, img, [n for n, m in vislora_model(name, img, targets, r).named_modules()
                                   if type(m).__name__ == "LoraLayer"], r)
            print(f"[{suite}] PEFT accepted the same targets (unexpected)")
        except Exception as e:  # PEFT's own message, shown as the reason it is missing from the table
            peft_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"[{suite}] PEFT cannot run these targets: {peft_error}")
    models["full"] = full(name, img)
    steps = {n: step_fn(m, x, y) for n, m in models.items()}
    if native_dw and any(getattr(layer.base_layer, "groups", 1) > 1 for _, layer in lora_layers(models["vislora"])):
        steps["vislora-native-dw"] = native_depthwise(step_fn(vislora_model(name, img, targets, r), x, y))
    wall, cpu = round_robin(steps, rounds, warmup)
    rows = {"wall": summarise(wall), "cpu": summarise(cpu)}
    if dora:  # DoRA against LoRA of the same library, paired per round
        rows["cpu_vs_lora"] = {f"{lib}-dora": summarise({k: cpu[k] for k in (lib, f"{lib}-dora")}, lib)[f"{lib}-dora"]
                               for lib in ("vislora", "peft") if f"{lib}-dora" in cpu}
        for n, row in rows["cpu_vs_lora"].items():
            print(f"[{suite}] {n} / {n[:-5]} step (cpu, paired median): {row['paired_ratio']:.3f}")
    print(f"\n{suite}: {name} img {img} batch {bs}, r={r}, targets {targets}, {rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"{'contender':<18} {'wall ms':>9} {'ratio':>6} {'paired':>6} {'cpu ms':>9} {'ratio':>6} {'paired':>6}")
    for n in steps:
        w, c = rows["wall"][n], rows["cpu"][n]
        print(f"{n:<18} {1000 * w['median_s']:9.1f} {w['ratio']:6.3f} {w['paired_ratio']:6.3f} "
              f"{1000 * c['median_s']:9.1f} {c['ratio']:6.3f} {c['paired_ratio']:6.3f}")
    return {"suite": suite, "model": name, "img": img, "batch": bs, "r": r, "rounds": rounds,
            "threads": torch.get_num_threads(), "peft_error": peft_error, **rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", nargs="+", default=list(SUITES), choices=list(SUITES))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--batch", type=int, default=None, help="override the suite's batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--dora", action="store_true", help="add vislora DoRA and PEFT DoRA (use_dora) contenders")
    p.add_argument("--native-dw", action="store_true",
                   help="add a contender with torch's own depthwise weight gradient (the before of vislora's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [run_suite(suite, args.rounds, args.warmup, args.r, args.batch, args.native_dw, args.dora)
               for suite in args.suite]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
