"""The `vislora` command: train, eval, export, predict, footprint, extract, spectrum."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_train(args) -> int:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # re-run this command under torchrun
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "vislora", *_without_nproc(sys.argv[1:])]
        return subprocess.call(cmd)
    from vislora.recipe import load_recipe
    from vislora.train import train

    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.path={args.data}")
    recipe = load_recipe(args.recipe, overrides)
    run_dir = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
    if run_dir.exists() and any(run_dir.iterdir()) and not args.resume and not args.force:
        print(f"vislora: {run_dir} already holds a run: pass --resume to continue it, --force to overwrite, "
              "or --out DIR", file=sys.stderr)
        return 2
    train(recipe, run_dir, resume=args.resume)
    print(f"vislora: run written to {run_dir}")
    return 0


def cmd_eval(args) -> int:
    from vislora.evaluate import evaluate, format_report

    report = evaluate(args.target, data=args.data, out=args.out, batch_size=args.batch_size)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if report.get("skipped"):
        print(f"vislora: skipped {len(report['skipped'])} unreadable image(s): {', '.join(report['skipped'][:5])}")
    return 0


def cmd_export(args) -> int:
    from vislora.export import export_run

    report = export_run(args.run_dir, formats=args.format, out=args.out, opset=args.opset,
                        dynamic_batch=args.dynamic_batch)
    print(json.dumps(report, indent=2))
    return 0


def cmd_predict(args) -> int:
    from vislora.export import predict_files, predictor_for

    predictor, pre = predictor_for(args.model)
    results = predict_files(predictor, pre, args.images, topk=args.topk)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: ERROR {r['error']}")
            else:
                print(f"{r['path']}: " + ", ".join(f"{name} {p:.3f}" for name, p in r["top"]))
    return 1 if all("error" in r for r in results) else 0


def cmd_footprint(args) -> int:
    from vislora.footprint import footprint, format_footprint

    report = footprint(args.target, img_size=args.img_size, batch=args.batch)
    print(json.dumps(report, indent=2) if args.json else format_footprint(report))
    return 0


def _model_from(source: str, model_name: str | None, kwargs: str):
    """A run directory (its trained model, merged in memory) or a timm weights file (--model names the net)."""
    from vislora.evaluate import load_run
    from vislora.inject import classifier_names, unload

    path = Path(source)
    if path.is_dir():
        return unload(load_run(path)[0]), None
    if not model_name:
        raise ValueError(f"{source} is a weights file: name its timm architecture with --model")
    import timm
    from safetensors.torch import load_file

    from vislora.train import load_weights

    probe = timm.create_model(model_name, pretrained=False, **json.loads(kwargs))
    heads = classifier_names(probe)
    state = load_file(str(path)) if path.is_file() else {}
    classes = [state[f"{h}.weight"].shape[0] for h in heads if f"{h}.weight" in state]
    model = timm.create_model(model_name, pretrained=False, **json.loads(kwargs),
                              **({"num_classes": classes[0]} if classes else {}))
    load_weights(model, path)
    return model.eval(), model_name


def cmd_extract(args) -> int:
    from vislora.adapters import save_adapter
    from vislora.evaluate import load_run
    from vislora.inject import LoraConfig
    from vislora.svd import extract_adapter
    from vislora.train import build_classifier

    tuned, _ = _model_from(args.tuned, args.model, args.kwargs)
    if args.base:
        base, _ = _model_from(args.base, args.model, args.kwargs)
    elif Path(args.tuned).is_dir():  # the run's starting point: its recipe's base model
        _, recipe, pre = load_run(args.tuned)
        base = build_classifier(recipe, len(pre["class_names"])).eval()
    else:
        raise ValueError("--base is needed when --tuned is a weights file")
    targets = args.targets[0] if len(args.targets) == 1 else args.targets
    rank = args.rank if args.rank in ("auto", "full") else int(args.rank)
    model, report = extract_adapter(base, tuned, LoraConfig(targets=targets), rank=rank, energy=args.energy,
                                    budget=args.budget)
    out = save_adapter(model, args.out)
    (out / "extract_report.json").write_text(json.dumps(report, indent=2))
    print(f"{'layer':<40} {'rank':>4} {'energy':>7} {'rel.err':>8}")
    for row in report:
        print(f"{row['name']:<40} {row['rank']:>4} {row['energy']:7.4f} {row['rel_error']:8.4f}")
    print(f"vislora: adapter written to {out} ({sum(r['params'] for r in report):,} adapter parameters)")
    return 0


def cmd_spectrum(args) -> int:
    from vislora.evaluate import load_run
    from vislora.svd import format_spectrum, plot_spectrum, spectrum

    run_dir = Path(args.run_dir)
    model = load_run(run_dir)[0]
    report = spectrum(model)
    out = Path(args.out) if args.out else run_dir / "spectrum.png"
    plot_spectrum(report, out)
    (out.with_suffix(".json")).write_text(json.dumps(report))
    print(json.dumps(report, indent=2) if args.json else format_spectrum(report))
    print(f"vislora: plot written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vislora", description="LoRA fine-tuning for timm vision models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune from a recipe")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--data", help="image folder (overrides data.path)")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--force", action="store_true", help="write into a non-empty run directory")
    p.add_argument("--nproc", type=int, default=0, help="processes on this machine (runs torchrun)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run directory or an exported .pt/.onnx file")
    p.add_argument("target", help="run directory, model.pt or model.onnx")
    p.add_argument("--data", help="ROOT/val, a ROOT holding val/, or ROOT/<class> (default: the run's val split)")
    p.add_argument("--out", help="report JSON path (default RUN_DIR/eval/report.json)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="merge the adapter and export TorchScript / ONNX, verified")
    p.add_argument("run_dir")
    p.add_argument("--format", default="all", choices=["torchscript", "onnx", "all"])
    p.add_argument("--out", help="output folder (default RUN_DIR/export)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--dynamic-batch", dest="dynamic_batch", action="store_true", default=True)
    p.add_argument("--static-batch", dest="dynamic_batch", action="store_false")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="top-k classes for images, from a run, a .pt or an .onnx file")
    p.add_argument("model", help="run directory, model.pt or model.onnx")
    p.add_argument("images", nargs="+")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("footprint", help="parameters, bytes, FLOPs, latency and memory of a model or run")
    p.add_argument("target", help="run directory, recipe YAML or timm model name")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_footprint)

    p = sub.add_parser("extract", help="turn a fully fine-tuned model into a LoRA adapter by truncated SVD")
    p.add_argument("--base", help="base weights (.safetensors) or a run directory (default: --tuned run's base)")
    p.add_argument("--tuned", required=True, help="tuned weights (.safetensors) or a full fine-tuning run directory")
    p.add_argument("--model", help="timm model name (when --base/--tuned are weight files)")
    p.add_argument("--kwargs", default="{}", help="timm.create_model kwargs as JSON")
    p.add_argument("--rank", default="8", help="an int, 'full', or 'auto' (with --energy and --budget)")
    p.add_argument("--energy", type=float, default=0.9)
    p.add_argument("--budget", type=int, default=None, help="total adapter parameter budget for --rank auto")
    p.add_argument("--targets", nargs="+", default=["all"], help="a preset or patterns")
    p.add_argument("--out", required=True, help="adapter directory")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("spectrum", help="singular values and effective rank of each learned update")
    p.add_argument("run_dir", help="a LoRA run directory")
    p.add_argument("--out", help="PNG path (default RUN_DIR/spectrum.png)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_spectrum)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"vislora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vislora {args.command}: interrupted; the last checkpoint stays loadable", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
