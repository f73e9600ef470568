"""Several named adapters on one backbone (issue #28): memory, switch time and mixed-batch throughput.

  memory      one base + K adapters (K = 1, 4, 16) against K merged models: parameter + buffer bytes, and the RSS
              of a fresh process that builds them (each configuration in its own subprocess, medians of --repeats)
  switch      vislora.set_adapter against PEFT's set_adapter and hotswap_adapter on the same layers (one process,
              alternated, medians)
  mixed       vislora.mixed_forward of a batch spread over K = 4, 8 adapters against one merged model's forward of
              the same batch (inference, one process, alternated, medians of the paired ratios)
Models: ViT-S/16 @112 (`vit` preset: qkv, proj, fc1, fc2) and MobileNetV2 @96 (`conv1x1`: the 1x1 convs, which
PEFT accepts too); random init, r=8, a 10-class head per adapter.

    .venv/bin/python tools/bench_named.py --threads 1 --json runs/bench_named.json
    .venv/bin/python tools/bench_named.py --what mixed switch --models vit
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vislora import LoraConfig, inject, load_adapter, lora_layers, save_adapter, unload  # noqa: E402
from vislora.named import mixed_forward, set_adapter  # noqa: E402

MODELS = {"vit": ("vit_small_patch16_224", {"img_size": 112}, 112, "vit"),
          "mobilenet": ("mobilenetv2_100", {}, 96, "conv1x1")}


def base(key: str) -> nn.Module:
    name, kwargs, _, _ = MODELS[key]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()


def adapter_dirs(key: str, k: int, folder: Path) -> list[Path]:
    """k adapters of the model (random B and heads, seeded), saved in PEFT's layout."""
    dirs = []
    for i in range(k):
        model = inject(base(key), LoraConfig(r=8, targets=MODELS[key][3]), verify=False)
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.update.perturb_(0.02)
            for p in model.get_classifier().parameters():
                p.normal_(std=0.02)
        dirs.append(save_adapter(model, folder / f"a{i}"))
    return dirs


def shared_model(key: str, dirs: list[Path]) -> nn.Module:
    model = load_adapter(base(key), dirs[0])
    for i, d in enumerate(dirs[1:], 1):
        load_adapter(model, d, name=f"a{i}")
    return model


def merged_models(key: str, dirs: list[Path]) -> list[nn.Module]:
    return [unload(load_adapter(base(key), d)).eval() for d in dirs]


def tensor_bytes(models: list[nn.Module]) -> int:
    seen, total = set(), 0
    for m in models:
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


# ---- memory -----------------------------------------------------------------------------------------
def memory_child(key: str, k: int, kind: str, folder: str) -> dict:
    """In a fresh process: build one shared model with k adapters, or k merged models; RSS and tensor bytes."""
    torch.set_num_threads(1)
    dirs = sorted(Path(folder).glob("a*"), key=lambda p: int(p.name[1:]))[:k]
    before = resident_mb()
    models = [shared_model(key, dirs)] if kind == "shared" else merged_models(key, dirs)
    x = torch.randn(2, 3, MODELS[key][2], MODELS[key][2])
    with torch.no_grad():
        for m in models:
            m(x)
    rss = resident_mb()
    return {"bytes": tensor_bytes(models), "rss_mb": rss, "rss_added_mb": rss - before}


def resident_mb() -> float:
    """The process's resident set now (/proc/self/statm), not its peak: ru_maxrss is set by the imports
    (1.1 GB here) and hid every configuration below it."""
    gc.collect()
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_memory(key: str, ks: list[int], folder: Path, repeats: int) -> list[dict]:
    rows = []
    for k in ks:
        for kind in ("shared", "merged"):
            runs = []
            for _ in range(repeats):
                code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'tools')!r}); import bench_named as b; "
                        f"print(json.dumps(b.memory_child({key!r}, {k}, {kind!r}, {str(folder)!r})))")
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            rows.append({"model": key, "k": k, "kind": kind,
                         **{f: statistics.median(r[f] for r in runs) for f in runs[0]}})
            print(f"[memory] {key} K={k:>2} {kind:<6} {rows[-1]['bytes'] / 1e6:8.1f} MB tensors, "
                  f"RSS {rows[-1]['rss_mb']:7.0f} MB, +{rows[-1]['rss_added_mb']:6.0f} MB built")
    return rows


# ---- switching and mixed batches -----------------------------------------------------------------------
def timed(fn, rounds: int) -> list[float]:
    """CPU seconds (process_time: with one thread, the compute itself, whatever else the machine runs)."""
    out = []
    for _ in range(rounds):
        tic = time.process_time()
        fn()
        out.append(time.process_time() - tic)
    return out


def alternate(contenders: dict, rounds: int) -> dict[str, list[float]]:
    """Each contender once per round, the order rotating, after one warm-up call each."""
    names = list(contenders)
    for fn in contenders.values():
        fn()
    times = {n: [] for n in names}
    for i in range(rounds):
        for n in names[i % len(names):] + names[:i % len(names)]:
            times[n] += timed(contenders[n], 1)
    return times


def peft_model(key: str, dirs: list[Path]):
    from peft import PeftModel

    model = PeftModel.from_pretrained(base(key), dirs[0]).eval()
    model.load_adapter(dirs[1], adapter_name="b")
    return model


def run_switch(key: str, dirs: list[Path], rounds: int) -> dict:
    """Median seconds of switching between two adapters (A -> B -> A counts two switches)."""
    from peft.utils.hotswap import hotswap_adapter

    ours = shared_model(key, dirs[:2])
    theirs = peft_model(key, dirs)
    hot = peft_model(key, dirs)
    state = {"ours": "default", "peft": "default", "hot": 0}

    def vislora_switch():
        state["ours"] = "a1" if state["ours"] == "default" else "default"
        set_adapter(ours, state["ours"])

    def peft_switch():
        state["peft"] = "b" if state["peft"] == "default" else "default"
        theirs.set_adapter(state["peft"])

    def peft_hotswap():
        state["hot"] = 1 - state["hot"]
        hotswap_adapter(hot, str(dirs[state["hot"]]), adapter_name="default")

    contenders = {"vislora set_adapter": vislora_switch, "PEFT set_adapter": peft_switch,
                  "PEFT hotswap_adapter": peft_hotswap}
    failed = {}
    try:
        peft_hotswap()
    except Exception as e:  # PEFT's own error: recorded as the reason the contender is missing
        failed["PEFT hotswap_adapter"] = f"{type(e).__name__}: {e}"
        del contenders["PEFT hotswap_adapter"]
        print(f"[switch] {key}: PEFT hotswap_adapter fails: {failed['PEFT hotswap_adapter'][:200]}")
    times = alternate(contenders, rounds)
    row = {n: statistics.median(t) for n, t in times.items()} | {"failed": failed}
    print(f"[switch] {key}: " + ", ".join(f"{n} {1e3 * v:.2f} ms" for n, v in row.items() if n != "failed"))
    return {"model": key, **row}


def run_mixed(key: str, dirs: list[Path], ks: list[int], batch: int, rounds: int) -> list[dict]:
    rows = []
    size = MODELS[key][2]
    x = torch.randn(batch, 3, size, size)
    merged = merged_models(key, dirs[:1])[0]
    for k in ks:
        model = shared_model(key, dirs[:k])
        names = [(["default"] + [f"a{i}" for i in range(1, k)])[i % k] for i in range(batch)]
        with torch.inference_mode():
            times = alternate({"merged": lambda: merged(x),
                               "mixed": lambda m=model, n=names: mixed_forward(m, x, n)}, rounds)
        paired = statistics.median(m / n for m, n in zip(times["merged"], times["mixed"], strict=True))
        rows.append({"model": key, "k": k, "batch": batch, "merged_s": statistics.median(times["merged"]),
                     "mixed_s": statistics.median(times["mixed"]), "throughput_ratio": paired})
        print(f"[mixed] {key} K={k} batch {batch}: mixed {1e3 * rows[-1]['mixed_s']:.1f} ms vs merged "
              f"{1e3 * rows[-1]['merged_s']:.1f} ms: throughput {paired:.3f}x the merged model's")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--what", nargs="+", default=["memory", "switch", "mixed"], choices=["memory", "switch", "mixed"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3, help="subprocesses per memory configuration")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "memory": [], "switch": [], "mixed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            folder = Path(tmp) / key
            dirs = adapter_dirs(key, 16 if "memory" in args.what else 8, folder)
            if "memory" in args.what:
                results["memory"] += run_memory(key, [1, 4, 16], folder, args.repeats)
            if "switch" in args.what:
                results["switch"].append(run_switch(key, dirs, args.rounds * 4))
            if "mixed" in args.what:
                results["mixed"] += run_mixed(key, dirs, [4, 8], args.batch, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
