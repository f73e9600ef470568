"""Peak memory of one training step (ViT-S/16 @112, batch 16, r=8 on qkv/proj/fc1/fc2, AdamW, CPU):
vislora vs PEFT vs full fine-tuning vs the limit (frozen model, head trainable, gradients through every block).

Each contender runs in its own fresh subprocess (the same imports in all, peft included, so that the libraries
weigh the same), builds its model, trains `--steps` steps and reports:
  peak RSS      resource.getrusage(RUSAGE_SELF).ru_maxrss: the whole process, imports and model build included
                (a child's ru_maxrss also counts its parent's RSS at fork: this parent stays small, without torch);
  step peak     the peak RSS during the steps alone (the mark is reset with /proc/self/clear_refs before them);
  above build   step peak minus the RSS just before the first step: activations, gradients, optimizer state.
Subprocesses alternate contenders round-robin for `--repeats` rounds; medians are reported.

    .venv/bin/python tools/bench_memory.py
    .venv/bin/python tools/bench_memory.py --suite convnext --repeats 3
DoRA contenders (vislora-dora, peft-dora: use_dora=True) run beside LoRA; "vs vislora" is the step peak over
vislora LoRA's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("limit", "vislora", "vislora-dora", "peft", "peft-dora", "full")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(contender: str, suite: str, steps: int, r: int) -> dict:
    """Build one contender of bench_step's suite, train it, return its memory figures in MB."""
    import peft  # noqa: F401  (imported by every contender: equal library weight)
    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    import bench_step as bs

    torch.set_num_threads(1)
    name, img, batch, targets, peft_targets, stem = bs.SUITES[suite]
    build = {"limit": lambda: bs.limit(name, img, stem), "vislora": lambda: bs.vislora_model(name, img, targets, r),
             "vislora-dora": lambda: bs.vislora_model(name, img, targets, r, dora=True),
             "peft": lambda: bs.peft_model(name, img, peft_targets, r),
             "peft-dora": lambda: bs.peft_model(name, img, peft_targets, r, dora=True),
             "full": lambda: bs.full(name, img)}
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, img, img), torch.randint(0, 10, (batch,))
    step = bs.step_fn(build[contender](), x, y)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark: the next peak is the steps' own
    for _ in range(steps):
        step()
    mb = 1024 / 1e6
    step_peak = _status_kib("VmHWM")
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * mb, "before_mb": before * mb,
            "step_peak_mb": step_peak * mb, "above_build_mb": (step_peak - before) * mb}


def run(contender: str, suite: str, steps: int, r: int) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tools')!r}); "
            f"import bench_memory as b; print(json.dumps(b.child({contender!r}, {suite!r}, {steps}, {r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{contender} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="vit", choices=["vit", "convnext"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    rows: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    for i in range(args.repeats):
        order = CONTENDERS[i % len(CONTENDERS):] + CONTENDERS[:i % len(CONTENDERS)]
        for c in order:
            rows[c].append(run(c, args.suite, args.steps, args.r))
    keys = ("peak_rss_mb", "step_peak_mb", "above_build_mb")
    med = {c: {k: statistics.median(row[k] for row in rows[c]) for k in keys} for c in CONTENDERS}
    print(f"{args.suite}: {args.steps} steps, {args.repeats} subprocesses per contender, medians (MB)")
    print(f"{'contender':<13} {'peak RSS':>9} {'step peak':>10} {'above build':>12} {'x limit':>8} {'vs peft':>8} "
          f"{'vs vislora':>10}")
    for c in CONTENDERS:
        m = med[c]
        print(f"{c:<13} {m['peak_rss_mb']:9.0f} {m['step_peak_mb']:10.0f} {m['above_build_mb']:12.0f} "
              f"{m['step_peak_mb'] / med['limit']['step_peak_mb']:8.3f} "
              f"{m['step_peak_mb'] / med['peft']['step_peak_mb']:8.3f} "
              f"{m['step_peak_mb'] / med['vislora']['step_peak_mb']:10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"suite": args.suite, "steps": args.steps, "repeats": args.repeats,
                                               "medians": med, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
