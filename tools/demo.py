"""`make demo`: adapt the shipped Fashion-MNIST ViT to handwritten digits with LoRA, evaluate, export, compare
with a linear probe of the same backbone, and print a summary. Everything goes through the `vislora` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def vislora(*args: str) -> float:
    """Run one `vislora` command (as a user would), fail loudly, return its wall time."""
    start = time.perf_counter()
    print(f"\n$ vislora {' '.join(args)}", flush=True)
    code = subprocess.call([sys.executable, "-m", "vislora", *args], cwd=ROOT)
    if code:
        sys.exit(f"demo: `vislora {' '.join(args)}` failed with exit code {code}")
    return time.perf_counter() - start


def main() -> int:
    card_path = ROOT / "data" / "vit_fmnist.json"
    if not card_path.is_file():
        sys.exit("demo: data/vit_fmnist.json is missing: the shipped backbone comes with the repository")
    card = json.loads(card_path.read_text())
    start = time.perf_counter()
    lora, probe = ROOT / "runs" / "demo_lora", ROOT / "runs" / "demo_probe"
    t_train = vislora("train", "recipes/demo_vit_lora.yaml", "--out", str(lora), "--force")
    vislora("eval", str(lora))
    t_export = vislora("export", str(lora), "--format", "all")
    t_probe = vislora("train", "recipes/demo_vit_probe.yaml", "--out", str(probe), "--force")
    vislora("eval", str(probe))

    report = json.loads((lora / "eval" / "report.json").read_text())
    probe_report = json.loads((probe / "eval" / "report.json").read_text())
    summary = json.loads((lora / "train_summary.json").read_text())["summary"]
    export = json.loads((lora / "export" / "export.json").read_text())
    adapter_bytes = (lora / "adapter" / "adapter_model.safetensors").stat().st_size
    lines = [
        "",
        "=" * 78,
        f"vislora demo: Fashion-MNIST ViT ({summary['total']:,} parameters) -> MNIST "
        f"digits ({report['num_images']} val images)",
        f"  LoRA r=8 on attention+MLP  val top-1 {report['top1']:.4f}   "
        f"(trainable {summary['trainable']:,} = {100 * summary['trainable_share']:.1f}%, train {t_train:.0f}s)",
        f"  linear probe (head only)   val top-1 {probe_report['top1']:.4f}   (train {t_probe:.0f}s)",
        f"  source task accuracy of the backbone (Fashion-MNIST test): {card.get('source_val_top1', '?')}",
        f"  adapter on disk: {adapter_bytes / 1024:.1f} KiB   ({lora / 'adapter'})",
        f"  exports ({t_export:.0f}s, verified): TorchScript max|diff| {export['torchscript']['max_abs_diff']:.1e}, "
        f"ONNX max|diff| {export['onnx']['max_abs_diff']:.1e}",
        f"    {lora / 'export' / 'model.pt'}",
        f"    {lora / 'export' / 'model.onnx'}",
        f"  plots: {lora / 'curves.png'}, {lora / 'eval' / 'report_confusion.png'}",
        f"  total demo time {time.perf_counter() - start:.0f}s",
        "=" * 78,
    ]
    print("\n".join(lines))
    if report["top1"] <= probe_report["top1"]:
        print("demo: LoRA did not beat the linear probe: the demo is not showing transfer", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
