"""The `vislora` command: train, eval, export, predict, footprint, extract, spectrum, fewshot, shrink."""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import logging
import os
import sys
import uuid
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from vislora import rundir, tasks
from vislora.adapters import save_adapter
from vislora.data import preprocess_config
from vislora.evaluate import evaluate, predict
from vislora.export import export_run
from vislora.fewshot import CONTENDERS, LR_SCALE, TABLE, fewshot
from vislora.files import listing
from vislora.footprint import footprint, format_footprint
from vislora.inject import LoraConfig, classifier_names, unload
from vislora.recipe import apply_overrides, load_recipe, read_yaml, resolve
from vislora.shrink import format_shrink, shrink_run
from vislora.svd import extract_adapter, format_spectrum, plot_spectrum, spectrum
from vislora.tasks.common import load_weights
from vislora.train import TrainingDiverged, first_rank, train


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


def launch(nproc: int, argv: list[str]) -> int:
    """`vislora ARGV` in nproc processes on this machine, as `torchrun --standalone` starts them (torch's elastic
    launcher, in process): the ranks print their own one-line errors, so a failed rank is an exit code here,
    not torchrun's traceback."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several processes on one machine
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=str(uuid.uuid4()), max_restarts=0)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "vislora", *argv)
    except ChildFailedError as e:
        return max(f.exitcode for f in e.failures.values()) or 1
    return 0


def cmd_train(args) -> int:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # re-run this command in N processes
        return launch(args.nproc, _without_nproc(sys.argv[1:]))
    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.recipe is None and not (args.resume and args.out):
        raise ValueError("train needs a RECIPE (or --resume --out RUN, which continues with the run's own recipe)")
    run_dir = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
    if args.recipe is None:  # --resume with the run's own recipe (and data), plus any --set / --data
        recipe = resolve(apply_overrides(read_yaml(run_dir / rundir.RECIPE), overrides), str(run_dir / rundir.RECIPE))
    else:
        recipe = load_recipe(args.recipe, overrides)
    data = (recipe["data"]["path"], recipe["data"]["images"])
    rundir.check_out(run_dir, data, args.resume, args.force)  # before anything is created
    with rundir.locked(run_dir) if first_rank() else contextlib.nullcontext():
        if first_rank():
            rundir.check_out(run_dir, data, args.resume, args.force)  # again: no other training can start now
        train(recipe, run_dir, resume=args.resume)
    print(f"vislora: run written to {run_dir}")
    return 0


def folder_arg(path: str | None, flag: str = "--out") -> Path | None:
    """A folder argument: refused in one line when it names an existing file."""
    if path is not None and Path(path).is_file():
        raise ValueError(f"{flag} {path} is a file: name a folder")
    return Path(path) if path is not None else None


def cmd_eval(args) -> int:
    if args.out and args.data:
        rundir.keep_apart(Path(args.out).parent, [args.data])
    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder: name the report file, e.g. {Path(args.out) / 'report.json'}")
    report = evaluate(args.target, data=args.data, out=args.out, batch_size=args.batch_size)
    print(json.dumps(report, indent=2) if args.json else tasks.get(report["task"]).format_report(report))
    if report.get("skipped"):
        print(f"vislora: skipped {len(report['skipped'])} unreadable or unusable file(s): "
              f"{listing(report['skipped'])}")
    return 0


def cmd_export(args) -> int:
    folder_arg(args.out)
    report = export_run(args.run_dir, formats=args.format, out=args.out, opset=args.opset,
                        dynamic_batch=args.dynamic_batch)
    print(json.dumps(report, indent=2))
    return 0


def cmd_predict(args) -> int:
    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    folder_arg(args.out)
    task, results = predict(args.model, args.images, topk=args.topk, out=args.out)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['path']}: ERROR {r['error']}" if "error" in r else task.format_prediction(r))
    if all("error" in r for r in results):
        print(f"vislora predict: error: none of the {len(results)} image(s) could be read: {results[0]['error']}",
              file=sys.stderr)
        return 2
    return 0


def cmd_footprint(args) -> int:
    report = footprint(args.target, img_size=args.img_size, batch=args.batch)
    print(json.dumps(report, indent=2) if args.json else format_footprint(report))
    return 0


def _kwargs(text: str) -> dict:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--kwargs must be a JSON object, got {text!r}: {e}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--kwargs must be a JSON object, got {text!r}")
    return kwargs


def _head_size(model_name: str, kwargs: dict, path: Path) -> int | None:
    """The classifier size stored in a timm weights file (None if it holds no classifier)."""
    heads = classifier_names(timm.create_model(model_name, pretrained=False, **kwargs))
    state = load_file(str(path))
    sizes = [state[f"{h}.weight"].shape[0] for h in heads if f"{h}.weight" in state]
    return sizes[0] if sizes else None


def _weights_model(path: Path, model_name: str | None, kwargs: dict, num_classes: int | None):
    """A timm model from a weights file; num_classes (the tuned model's) replaces a classifier of another size."""
    if not model_name:
        raise ValueError(f"{path} is a weights file: name its timm architecture with --model")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if not timm.is_model(model_name):
        raise ValueError(f"--model '{model_name}' is not a timm model")
    stored = _head_size(model_name, {k: v for k, v in kwargs.items() if k != "num_classes"}, path)
    given = kwargs.pop("num_classes", None)
    if given is not None and stored is not None and given != stored and num_classes is None:
        raise ValueError(f"--kwargs num_classes={given} disagrees with {path}, whose classifier has {stored} outputs")
    size = num_classes or stored or given
    model = timm.create_model(model_name, pretrained=False, **kwargs, **({"num_classes": size} if size else {}))
    load_weights(model, path, skip=classifier_names(model) if size != stored else [])
    return model.eval()


def cmd_extract(args) -> int:
    out_dir = folder_arg(args.out)
    tuned_path = Path(args.tuned)
    if tuned_path.is_dir():
        tuned, recipe, pre = rundir.load_run(tuned_path)
        tuned = unload(tuned)
    else:
        tuned, recipe, pre = _weights_model(tuned_path, args.model, _kwargs(args.kwargs), None), None, None
    classes = classifier_names(tuned)
    n_classes = tuned.get_submodule(classes[0]).weight.shape[0] if classes else None
    if args.base:
        base_path = Path(args.base)
        base = unload(rundir.load_run(base_path)[0]) if base_path.is_dir() else \
            _weights_model(base_path, args.model, _kwargs(args.kwargs), n_classes)
    elif recipe is not None:  # the run's starting point: its recipe's base model
        base = tasks.get(recipe["task"]).build_model(recipe, pre["class_names"]).eval()
    else:
        raise ValueError("--base is needed when --tuned is a weights file")
    targets = args.targets[0] if len(args.targets) == 1 else args.targets
    rank = args.rank if args.rank in ("auto", "full") else int(args.rank)
    model, report = extract_adapter(base, tuned, LoraConfig(targets=targets), rank=rank, energy=args.energy,
                                    budget=args.budget)
    out = save_adapter(model, out_dir)
    (out / "extract_report.json").write_text(json.dumps(report, indent=2))
    fidelity = output_fidelity(model, tuned, pre)
    (out / "extract_fidelity.json").write_text(json.dumps(fidelity, indent=2))
    print(f"{'layer':<40} {'rank':>4} {'energy':>7} {'rel.err':>8}")
    for row in report:
        print(f"{row['name']:<40} {row['rank']:>4} {row['energy']:7.4f} {row['rel_error']:8.4f}")
    print(f"vislora: whole model: max |output difference| {fidelity['max_abs_diff']:.3g} at output scale "
          f"{fidelity['output_scale']:.3g} on {fidelity['inputs']} random inputs; carried as modules_to_save: "
          f"{len(fidelity['carried'])} module(s) {fidelity['carried'][:4]}")
    print(f"vislora: adapter written to {out} ({sum(r['params'] for r in report):,} adapter parameters)")
    return 0


@torch.no_grad()
def output_fidelity(adapted, tuned, preprocess: dict | None, n: int = 4) -> dict:
    """How far the extracted model's outputs are from the tuned model's on a probe batch: per-layer errors say
    nothing of what the adapter does not carry."""
    size = (preprocess or preprocess_config(tuned))["input_size"]
    x = torch.randn(n, 3, int(size[-2]), int(size[-1]), generator=torch.Generator().manual_seed(0))
    merged = unload(copy.deepcopy(adapted)).eval()
    ref, got = tuned.eval()(x), merged(x)
    heads = set(classifier_names(merged))
    return {"max_abs_diff": float((got - ref).abs().max()), "output_scale": float(ref.abs().max()), "inputs": n,
            "carried": [t for t in adapted.vislora_train if t not in heads]}


def cmd_spectrum(args) -> int:
    run_dir = Path(args.run_dir)
    report = spectrum(rundir.load_run(run_dir)[0])
    out = Path(args.out) if args.out else run_dir / "spectrum.png"
    plot_spectrum(report, out)
    (out.with_suffix(".json")).write_text(json.dumps(report))
    print(json.dumps(report, indent=2) if args.json else format_spectrum(report))
    print(f"vislora: plot written to {out}")
    return 0


def _lr_overrides(items: list[str] | None) -> dict[str, float]:
    """--lr probe=0.01 full=5e-4 -> {"probe": 0.01, "full": 0.0005}."""
    lrs = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            lrs[name] = float(value)
        except ValueError:
            raise ValueError(f"--lr expects CONTENDER=LR (e.g. probe=0.01), got '{item}'") from None
    return lrs


def cmd_fewshot(args) -> int:
    recipe = load_recipe(args.recipe, [f"data.path={args.data}"] if args.data else [])
    out = folder_arg(args.out) or Path("runs") / f"fewshot_{Path(args.recipe).stem}"
    rundir.keep_apart(out, [recipe["data"]["path"]], [out / "data", out / "runs"])  # before the lock makes out
    with rundir.locked(out):
        rows = fewshot(recipe, out, shots=args.shots, seeds=args.seeds, contenders=args.contenders,
                       steps=args.steps, lrs=_lr_overrides(args.lr))
    print((out / TABLE).read_text(), end="")
    print(f"vislora: {len(rows)} runs in {out} (fewshot.json, fewshot.md, fewshot.png)")
    return 0


def cmd_shrink(args) -> int:
    report = shrink_run(args.run_dir, rank=args.rank, energy=args.energy, budget=args.budget, out=args.out,
                        force=args.force)
    print(format_shrink(report))
    print(f"vislora: shrunk run written to {report['out']} (report: shrink_report.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vislora", description="LoRA fine-tuning for timm vision models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune from a recipe")
    p.add_argument("recipe", nargs="?", help="recipe YAML file (optional with --resume --out RUN)")
    p.add_argument("--data", help="image folder (overrides data.path)")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's last checkpoint, with the run's own recipe")
    p.add_argument("--force", action="store_true",
                   help="replace the run in --out (removes the files vislora wrote there, nothing else)")
    p.add_argument("--nproc", type=int, default=0, help="processes on this machine (runs torchrun)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run directory or an exported .pt/.onnx file")
    p.add_argument("target", help="run directory, model.pt or model.onnx")
    p.add_argument("--data", help="ROOT/val, a ROOT holding val/, or ROOT/<class> (default: the run's val split)")
    p.add_argument("--out", help="report JSON path (default RUN_DIR/eval/report.json)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's eval.batch_size, else 64")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="merge the adapter and export TorchScript / ONNX, verified")
    p.add_argument("run_dir")
    p.add_argument("--format", default=None, choices=["torchscript", "onnx", "all"],
                   help="default: the recipe's export.formats")
    p.add_argument("--out", help="output folder (default RUN_DIR/export)")
    p.add_argument("--opset", type=int, default=None, help="default: the recipe's export.opset")
    p.add_argument("--dynamic-batch", dest="dynamic_batch", action="store_true", default=None)
    p.add_argument("--static-batch", dest="dynamic_batch", action="store_false")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="top-k classes (or boxes) for images, from a run, a .pt or an .onnx file")
    p.add_argument("model", help="run directory, model.pt or model.onnx")
    p.add_argument("images", nargs="+")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--out", help="folder for the files predict writes (segmentation masks); default predictions/ "
                   "beside the model")
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

    p = sub.add_parser("fewshot", help="LoRA vs linear probe vs full fine-tuning with k images per class, over seeds")
    p.add_argument("recipe", help="recipe YAML file (classification)")
    p.add_argument("--data", help="image folder (overrides data.path)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="images per class")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (the k-shot samples and the runs)")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run, whatever k (default: max(100, recipe epochs x steps per epoch at "
                        "the largest k))")
    p.add_argument("--lr", nargs="+", metavar="CONTENDER=LR",
                   help="learning rate per contender (default: the recipe's, scaled as the measured mode defaults: "
                        + " : ".join(f"{c} {s:g}" for c, s in LR_SCALE.items()) + ")")
    p.add_argument("--out", help="output folder (default runs/fewshot_<recipe name>); a rerun resumes its grid")
    p.set_defaults(func=cmd_fewshot)

    p = sub.add_parser("shrink", help="a smaller LoRA run: the truncated SVD of each learned update")
    p.add_argument("run_dir", help="a LoRA run directory")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="one rank for every layer (at most its current rank)")
    how.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this share of the update's "
                                                  "squared norm")
    how.add_argument("--budget", type=int, help="total adapter parameters, spent across layers as extract --budget")
    p.add_argument("--out", help="new run directory (default RUN_shrink_<rank|energy|budget><value>)")
    p.add_argument("--force", action="store_true", help="replace the run in --out")
    p.set_defaults(func=cmd_shrink)
    return parser


def leave_process_group(timeout_s: float = 10.0) -> None:
    """Under DDP, after an error every rank met together (e.g. a diverged loss): wait, at most timeout_s, until
    all ranks are here, so rank 0 has printed the error before the launcher stops the others."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with contextlib.suppress(Exception):
        dist.barrier(async_op=True).wait(datetime.timedelta(seconds=timeout_s))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, NotImplementedError, TrainingDiverged) as e:
        if first_rank():  # under torchrun every rank stops with the same error: say it once
            print(f"vislora {args.command}: error: {e}", file=sys.stderr)
        leave_process_group()
        return 2
    except KeyboardInterrupt:
        print(f"vislora {args.command}: interrupted; the last checkpoint stays loadable", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
