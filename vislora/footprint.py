"""What an adapter costs: parameters, bytes on disk, FLOPs, inference latency, training step time
and memory.

`footprint(target)` takes a run directory, a recipe YAML, a timm model name or an nn.Module and
reports the adapted model next to its untouched base, its merged form and full fine-tuning, for any
task's model: the target is resolved by vislora.subject, whose task draws the random batches (the
model takes their images) and computes the training step's loss. FLOPs come from torch's own
FlopCounterMode (matmuls and convolutions); latencies and step times are medians of contenders run
in alternation, so a busy machine slows them alike; peak CPU memory is the peak RSS of a fresh
subprocess.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_model
from torch.utils.flop_counter import FlopCounterMode

from vislora.adapters import WEIGHTS_NAME, save_adapter
from vislora.config import LoraConfig
from vislora.errors import VisloraError
from vislora.inject import trainable_summary, unload
from vislora.layers import LoraLayer
from vislora.subject import Subject, resolve_target, synthetic
from vislora.targets import lora_layers

GROUPS = ("attention qkv/proj", "MLP fc", "conv 1x1", "depthwise", "grouped", "kx1/1xk", "dense kxk", "other")


# ---- parameters and bytes ------------------------------------------------------------------------
def adapter_group(name: str, layer: LoraLayer) -> str:
    """Which kind of layer an adapter sits on (one of GROUPS)."""
    base = layer.base_layer
    parts = name.split(".")
    if isinstance(base, nn.Linear):
        if "attn" in parts or "attention" in parts or parts[-1] in ("qkv", "q", "k", "v", "kv", "q_proj", "k_proj",
                                                                      "v_proj"):
            return "attention qkv/proj"
        if "mlp" in parts or "ffn" in parts or parts[-1] in ("fc1", "fc2", "fc1_g", "fc1_x"):
            return "MLP fc"
        return "other"
    if isinstance(base, nn.Conv2d):
        kernel = tuple(base.kernel_size)
        if base.groups > 1 and base.groups == base.in_channels:
            return "depthwise"
        if base.groups > 1:
            return "grouped"
        if kernel == (1, 1):
            return "conv 1x1"
        return "kx1/1xk" if 1 in kernel else "dense kxk"
    return "other"


def parameter_report(model: nn.Module) -> dict:
    """Total / trainable counts and adapter parameters per layer group."""
    summary = trainable_summary(model)
    groups: dict[str, dict] = {}
    for name, layer in lora_layers(model):
        row = groups.setdefault(adapter_group(name, layer), {"layers": 0, "params": 0})
        row["layers"] += 1
        row["params"] += layer.adapter_numel()
    summary["by_group"] = {g: groups[g] for g in GROUPS if g in groups}
    return summary


def bytes_report(adapted: nn.Module, merged: nn.Module) -> dict:
    """Sizes of the adapter file, the merged model's safetensors and a full fp32 checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        adapter = None
        if hasattr(adapted, "vislora_config"):
            adapter = (save_adapter(adapted, Path(tmp) / "adapter") / WEIGHTS_NAME).stat().st_size
        save_model(merged, str(Path(tmp) / "merged.safetensors"))
        merged_bytes = (Path(tmp) / "merged.safetensors").stat().st_size
    full = 4 * sum(p.numel() for p in merged.parameters())
    return {"adapter_file": adapter, "merged_model": merged_bytes, "full_checkpoint_fp32": full,
            "full_over_adapter": full / adapter if adapter else None}


# ---- FLOPs and latency ---------------------------------------------------------------------------
def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs by torch's FlopCounterMode, with timm's fused attention unfused so that it is
    counted."""
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    for m, _ in fused:
        m.fused_attn = False
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, flag in fused:
            m.fused_attn = flag
    return counter.get_total_flops()


def alternating_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each function, calling them round-robin (rotating order) `repeats`
    times: entry i of every list is round i, so ratios can be taken round by round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + repeats):
        shift = i % len(names)
        for n in names[shift:] + names[:shift]:
            tic = time.perf_counter()
            fns[n]()
            if i >= warmup:
                times[n].append(time.perf_counter() - tic)
    return times


def alternating_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calling them round-robin (rotating order) `repeats`
    times."""
    return {n: statistics.median(t) for n, t in alternating_times(fns, repeats, warmup).items()}


def ratio_spread(times: list[float], base: list[float]) -> list[float]:
    """The interquartile range [q1, q3] of the round-by-round ratios times / base: how far a ratio
    of medians can be trusted on a loaded machine (one run's batch-1 ratio swung 7.9x -> 0.84x,
    issue #31)."""
    ratios = [t / b for t, b in zip(times, base, strict=True)]
    if len(ratios) < 2:
        return ratios * 2
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return [q1, q3]


def latency_report(models: dict[str, nn.Module], inputs: Callable[[int], object], batch: int, repeats: int,
                   device: str) -> dict:
    """Median inference latency in ms of each model at batch 1 and `batch` (inputs(n): a batch of n,
    on the device), and ratios to the base model."""
    def call(m: nn.Module, x: object) -> Callable[[], object]:
        def run():
            with torch.inference_mode():
                y = m(x)
            if device != "cpu":
                torch.cuda.synchronize()
            return y
        return run

    out = {}
    for b in sorted({1, batch}):
        x = inputs(b)
        times = alternating_times({n: call(m, x) for n, m in models.items()}, repeats, warmup=2)
        med = {n: statistics.median(t) for n, t in times.items()}
        out[f"batch_{b}"] = {n: 1000 * t for n, t in med.items()}
        out[f"batch_{b}"].update({f"{n}_over_base": t / med["base"] for n, t in med.items() if n != "base"})
        out[f"batch_{b}"].update({f"{n}_over_base_iqr": ratio_spread(t, times["base"]) for n, t in times.items()
                                  if n != "base"})
        out[f"batch_{b}"]["rounds"] = repeats
    return out


# ---- training step -------------------------------------------------------------------------------
def full_finetune(model: nn.Module) -> nn.Module:
    """The base model with every parameter trainable."""
    return model.requires_grad_(True).train()


def train_step(model: nn.Module, batch: object, subject: Subject, device: str) -> Callable[[], None]:
    """One forward + backward + AdamW step over the model's trainable parameters, on the task's
    loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        subject.task.loss(model, batch, torch.device(device), subject.recipe)[0].backward()
        opt.step()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    return step


def _kib_to_mb(kib: int) -> float:
    return kib * 1024 / 1e6


def _rss_kib(field: str) -> int | None:
    """VmRSS / VmHWM of this process in KiB (Linux), None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux clear_refs), so that the next peak is the steps'
    own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _memory_child(spec_json: str) -> None:
    """Subprocess entry: build one contender, train it two steps, print its RSS figures (KiB) as
    JSON.

    Peaks come from /proc/self/status (VmHWM), because ru_maxrss of a child also counts the RSS its
    parent had when it forked; resource.getrusage is the fallback where /proc is missing."""
    spec = json.loads(spec_json)
    torch.set_num_threads(1)
    lora = LoraConfig(**spec["lora"]) if spec["lora"] else None
    subject = resolve_target(spec["target"], spec["img_size"], lora)
    model = subject.build_adapted().train() if spec["mode"] == "lora" else full_finetune(subject.build_base())
    step = train_step(model, synthetic(subject, spec["batch"], spec["num_classes"], "cpu"), subject, "cpu")
    built_peak, before = _rss_kib("VmHWM"), _rss_kib("VmRSS")
    reset = _reset_peak_rss()
    step()
    step()
    step_peak = _rss_kib("VmHWM") if reset else None
    rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = max(built_peak, step_peak or 0) if built_peak else rusage
    print(json.dumps({"before_kib": before, "peak_kib": peak, "step_peak_kib": step_peak}))


def peak_memory(spec: dict, mode: str, batch: int, img_size: int, num_classes: int, lora: LoraConfig | None
                ) -> dict:
    """Peak RSS (MB) of a fresh process that builds the `mode` contender and trains it two steps."""
    child = {**spec, "mode": mode, "batch": batch, "img_size": img_size, "num_classes": num_classes,
             "lora": lora.to_dict() if lora else None}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from vislora.footprint import _memory_child; _memory_child(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(child)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of '{spec['target']}' ({mode}) failed:\n{proc.stderr[-2000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    step_peak = data["step_peak_kib"] or data["peak_kib"]  # without clear_refs: the whole process's peak
    return {"peak_mb": _kib_to_mb(data["peak_kib"]), "step_peak_mb": _kib_to_mb(step_peak),
            "step_mb": _kib_to_mb(step_peak - data["before_kib"]) if data["before_kib"] else None}


def train_report(subject: Subject, adapted: nn.Module, batch: int, num_classes: int, steps: int, device: str,
                 lora: LoraConfig | None, memory: bool) -> dict:
    """Step time (alternating medians) and peak memory of LoRA training vs full fine-tuning."""
    data = synthetic(subject, batch, num_classes, device)
    models = {"lora": copy.deepcopy(adapted).train(), "full": full_finetune(subject.build_base().to(device))}
    med = alternating_medians({n: train_step(m, data, subject, device) for n, m in models.items()}, steps,
                              warmup=1)
    out = {n: {"step_ms": 1000 * t} for n, t in med.items()}
    out["full_over_lora_time"] = med["full"] / med["lora"]
    del models
    if not memory:
        return out
    if device == "cuda":
        for n, build in (("lora", lambda: copy.deepcopy(adapted).train()),
                         ("full", lambda: full_finetune(subject.build_base().to(device)))):
            model = build()
            step = train_step(model, data, subject, device)
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            step()
            step()
            peak = torch.cuda.max_memory_allocated()
            out[n].update(peak_mb=peak / 1e6, step_peak_mb=peak / 1e6, step_mb=(peak - base_mem) / 1e6)
            del model, step
    elif subject.spec is not None:  # the subprocess resolves the same target (and `lora`) again
        for n in ("lora", "full"):
            out[n].update(peak_memory(subject.spec, n, batch, subject.img_size, num_classes, lora))
    if "step_peak_mb" in out["lora"]:
        out["full_over_lora_memory"] = out["full"]["step_peak_mb"] / out["lora"]["step_peak_mb"]
    return out


# ---- the report ----------------------------------------------------------------------------------
def footprint(target: str | os.PathLike | nn.Module, img_size: int | None = None, batch: int = 8,
              lora: LoraConfig | None = None, repeats: int = 10, steps: int = 3, memory: bool = True,
              device: str = "cpu") -> dict:
    """Parameters, bytes, FLOPs, latency and training cost of a run, recipe, timm model name or
    module.

    lora: the adapter for targets without one (timm names, full fine-tuning recipes), else
    LoraConfig() defaults with targets 'vit' or 'conv'. repeats: latency rounds; steps:
    training-step rounds; memory: measure peak training memory (CPU: one subprocess per contender).
"""
    if batch < 1:
        raise VisloraError(f"batch must be at least 1, got {batch}")
    subject = resolve_target(target, img_size, lora)
    adapted = subject.build_adapted().to(device).eval()
    base = subject.build_base().to(device).eval()
    merged = unload(copy.deepcopy(adapted)).eval()
    try:
        if subject.classes:
            num_classes = len(subject.classes)
        else:  # a timm name or a module: a classifier, as many classes as it outputs
            with torch.inference_mode():
                num_classes = merged(torch.randn(1, 3, subject.img_size, subject.img_size, device=device)).shape[-1]
        x1 = synthetic(subject, 1, num_classes, device)[0]
        flops_merged, flops_unmerged = count_flops(merged, x1), count_flops(adapted, x1)
    except (RuntimeError, AssertionError) as e:
        raise VisloraError(f"{subject.label} does not take {subject.img_size}px inputs: {e}") from e
    config = getattr(adapted, "vislora_config", None)
    report = {
        "target": subject.label, "kind": subject.kind, "task": subject.task.NAME, "img_size": subject.img_size,
        "batch": batch,
        "num_classes": num_classes, "device": device, "threads": torch.get_num_threads(),
        "adapter_config": config.to_dict() if config is not None else None,
        "params": parameter_report(adapted),
        "bytes": bytes_report(adapted, merged),
        "compute": {"merged_gflops": flops_merged / 1e9, "merged_gmacs": flops_merged / 2e9,
                    "unmerged_gflops": flops_unmerged / 1e9,
                    "unmerged_overhead_gflops": (flops_unmerged - flops_merged) / 1e9,
                    "unmerged_overhead_share": (flops_unmerged - flops_merged) / max(flops_merged, 1)},
        "latency_ms": latency_report({"base": base, "unmerged": adapted, "merged": merged},
                                     lambda n: synthetic(subject, n, num_classes, device)[0], batch, repeats,
                                     device),
    }
    del merged, base
    report["train"] = train_report(subject, adapted, batch, num_classes, steps, device, lora, memory)
    return report


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def format_footprint(report: dict) -> str:
    """The report as one readable two-column table."""
    p, b, c, lat, tr = report["params"], report["bytes"], report["compute"], report["latency_ms"], report["train"]
    rows: list[tuple[str, str]] = [
        ("target", f"{report['target']} ({report['kind']}, {report['task']}), {report['img_size']}px, "
                   f"{report['device']}, {report['threads']} threads"),
        ("", ""), ("PARAMETERS", ""),
        ("total", f"{p['total']:,}"),
        ("trainable", f"{p['trainable']:,} ({100 * p['trainable_share']:.2f}%)"),
        ("adapter", f"{p['adapter']:,} in {p['adapted_layers']} layers"),
    ]
    rows += [(f"  {g}", f"{v['params']:,} in {v['layers']} layers") for g, v in p["by_group"].items()]
    ratio = b["full_over_adapter"]
    rows += [
        ("", ""), ("BYTES ON DISK", ""),
        ("adapter file", _mb(b["adapter_file"]) + (f"  (1/{ratio:.0f} of a full checkpoint)" if ratio else "")),
        ("merged model", _mb(b["merged_model"])),
        ("full checkpoint fp32", _mb(b["full_checkpoint_fp32"])),
        ("", ""), ("COMPUTE PER IMAGE", ""),
        ("merged", f"{c['merged_gflops']:.3f} GFLOPs = {c['merged_gmacs']:.3f} GMACs"),
        ("unmerged overhead", f"{c['unmerged_overhead_gflops']:.4f} GFLOPs "
                              f"({100 * c['unmerged_overhead_share']:.2f}%)"),
        ("", ""), ("INFERENCE LATENCY (median)", "base / unmerged / merged, merged/base"),
    ]
    for key, v in lat.items():
        low, high = v["merged_over_base_iqr"]
        rows.append((key.replace("_", " "), f"{v['base']:.2f} / {v['unmerged']:.2f} / {v['merged']:.2f} ms, "
                                            f"{v['merged_over_base']:.2f}x (round by round {low:.2f}-{high:.2f}x, "
                                            f"middle half of {v['rounds']})"))
    rows += [("", ""), (f"TRAINING STEP (batch {report['batch']})", "LoRA / full fine-tuning")]
    rows.append(("step time", f"{tr['lora']['step_ms']:.1f} / {tr['full']['step_ms']:.1f} ms, full is "
                              f"{tr['full_over_lora_time']:.2f}x"))
    if "step_peak_mb" in tr["lora"]:
        lo, fu = tr["lora"], tr["full"]
        rows.append(("peak memory in steps", f"{lo['step_peak_mb']:.0f} / {fu['step_peak_mb']:.0f} MB, full is "
                                             f"{tr['full_over_lora_memory']:.2f}x"))
        if lo.get("step_mb") is not None and fu.get("step_mb") is not None:
            rows.append(("  above the built model", f"{lo['step_mb']:.0f} / {fu['step_mb']:.0f} MB"))
        rows.append(("  process peak", f"{lo['peak_mb']:.0f} / {fu['peak_mb']:.0f} MB"))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}".rstrip() for k, v in rows)
