"""What each `vislora` command does, once vislora.cli has parsed and checked its arguments (the
recipe read and validated, paths checked, predict's images listed): this module imports torch, timm
and the rest, so the CLI imports it only when a command runs (vislora.cli.COMMANDS)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
import uuid
from pathlib import Path

import timm
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from vislora import rundir, runpaths, tasks
from vislora.adapters import save_adapter
from vislora.config import LoraConfig
from vislora.data import preprocess_config
from vislora.errors import VisloraError, first_rank
from vislora.evaluate import evaluate, evaluate_opened, open_adapters, predict, predict_each, predictions_dir
from vislora.export import export_run, format_export
from vislora.fewshot import TABLE, check_task, fewshot
from vislora.files import listing, write_json
from vislora.footprint import footprint, format_footprint
from vislora.inject import unload
from vislora.shrink import format_shrink, shrink_run
from vislora.spectrum import format_spectrum, plot_spectrum, spectrum
from vislora.svd import extract_adapter
from vislora.targets import classifier_names
from vislora.tasks.backbone import load_weights, read_checkpoint
from vislora.train import train


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
    """`vislora ARGV` in nproc processes on this machine, as `torchrun --standalone` starts them
    (torch's elastic launcher, in process): the ranks print their own one-line errors, so a failed
    rank is an exit code here, not torchrun's traceback."""
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
    """args.recipe_dict and args.run_dir come checked from vislora.cli.prepare_train (recipe, --out,
    --resume)."""
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # re-run this command in N processes
        return launch(args.nproc, _without_nproc(sys.argv[1:]))
    recipe, run_dir = args.recipe_dict, args.run_dir
    data = (recipe["data"]["path"], recipe["data"]["images"])
    with runpaths.locked(run_dir) if first_rank() else contextlib.nullcontext():
        if first_rank():
            runpaths.check_out(run_dir, data, args.resume, args.force)  # again: no other training can start now
        train(recipe, run_dir, resume=args.resume)
    print(f"vislora: run written to {run_dir}")
    return 0


def cmd_eval(args) -> int:
    """One target, or with --adapter each run in turn on one base in memory."""
    if args.adapter:
        for opened in open_adapters(args.adapter):
            print(f"== {opened.source}")
            show_report(evaluate_opened(opened, data=args.data, batch_size=args.batch_size), args.json)
        return 0
    show_report(evaluate(args.target, data=args.data, out=args.out, batch_size=args.batch_size), args.json)
    return 0


def show_report(report: dict, as_json: bool) -> None:
    written = report.pop("written")
    print(json.dumps(report, indent=2) if as_json else tasks.get(report["task"]).format_report(report))
    if report.get("scored"):
        print(f"vislora: scored {report['scored']}")
    if report.get("run_score"):
        print(beside_the_run(report))
    if report.get("skipped"):
        print(f"vislora: skipped {len(report['skipped'])} unreadable or unusable file(s): "
              f"{listing(report['skipped'])}")
    print(f"vislora: wrote {', '.join(written['files'])} in {written['folder']}")


def beside_the_run(report: dict) -> str:
    """This evaluation's score beside the run's own figure at training (train_summary.json)."""
    run = report["run_score"]
    key = run["metric"].removeprefix("val_")
    here = report.get(key)
    shown = f"{here:.4f}" if isinstance(here, (int, float)) else "?"
    return (f"vislora: {key} {shown} here; the run reported {run['metric']} {run['value']:.4f} at training "
            f"({run['run']})")


def cmd_export(args) -> int:
    report = export_run(args.run_dir, formats=args.format, out=args.out, opset=args.opset,
                        dynamic_batch=args.dynamic_batch)
    out_dir = Path(args.out) if args.out else Path(args.run_dir) / "export"
    print(json.dumps(report, indent=2) if args.json else format_export(report, out_dir))
    return 0


def cmd_predict(args) -> int:
    """args.images: the files vislora.cli.prepare_predict listed (folders and globs expanded); with
    --adapter, each run in turn on one base in memory."""
    if args.adapter:
        each = list(predict_each(args.adapter, args.images, topk=args.topk, out=args.out))
        if args.json:
            print(json.dumps({str(o.source): results for o, results in each}, indent=2))
        for opened, results in each:
            if not args.json:
                print(f"== {opened.source}")
                show_predictions(opened.task, results, Path(args.out) / opened.source.name if args.out
                                 else predictions_dir(opened.source))
        return all_unreadable(each[0][1])
    task, results = predict(args.model, args.images, topk=args.topk, out=args.out)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        show_predictions(task, results, Path(args.out) if args.out else predictions_dir(args.model))
    return all_unreadable(results)


def show_predictions(task, results: list[dict], out: Path) -> None:
    for r in results:
        print(f"{r['path']}: ERROR {r['error']}" if "error" in r else task.format_prediction(r))
    failed = sum("error" in r for r in results)
    print(f"vislora: {len(results) - failed} image(s) predicted" + (f", {failed} unreadable" if failed else "")
          + (f"; files in {out}" if out.is_dir() else ""))


def all_unreadable(results: list[dict]) -> int:
    """Exit 2 when no image could be read, else 0."""
    if all("error" in r for r in results):
        print(f"vislora predict: error: none of the {len(results)} image(s) could be read: {results[0]['error']}",
              file=sys.stderr)
        return 2
    return 0


def cmd_footprint(args) -> int:
    report = footprint(args.target, img_size=args.img_size, batch=args.batch)
    print(json.dumps(report, indent=2) if args.json else format_footprint(report))
    return 0


def _head_size(model_name: str, kwargs: dict, path: Path) -> int | None:
    """The classifier size stored in a timm weights file (None if it holds no classifier)."""
    heads = classifier_names(timm.create_model(model_name, pretrained=False, **kwargs))
    state = read_checkpoint(path, "the weights file")
    sizes = [state[f"{h}.weight"].shape[0] for h in heads if f"{h}.weight" in state]
    return sizes[0] if sizes else None


def _weights_model(path: Path, model_name: str | None, kwargs: dict, num_classes: int | None):
    """A timm model from a weights file; num_classes (the tuned model's) replaces a classifier of
    another size."""
    if not model_name:
        raise VisloraError(f"{path} is a weights file: name its timm architecture with --model")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if not timm.is_model(model_name):
        raise VisloraError(f"--model '{model_name}' is not a timm model")
    stored = _head_size(model_name, {k: v for k, v in kwargs.items() if k != "num_classes"}, path)
    given = kwargs.pop("num_classes", None)
    if given is not None and stored is not None and given != stored and num_classes is None:
        raise VisloraError(f"--kwargs num_classes={given} disagrees with {path}, whose classifier has {stored} outputs")
    size = num_classes or stored or given
    model = timm.create_model(model_name, pretrained=False, **kwargs, **({"num_classes": size} if size else {}))
    load_weights(model, path, skip=classifier_names(model) if size != stored else [])
    return model.eval()


def cmd_extract(args) -> int:
    out_dir = Path(args.out)
    tuned_path = Path(args.tuned)
    if tuned_path.is_dir():
        tuned, recipe, pre = rundir.load_run(tuned_path)
        tuned = unload(tuned)
    else:
        tuned, recipe, pre = _weights_model(tuned_path, args.model, dict(args.kwargs), None), None, None
    classes = classifier_names(tuned)
    n_classes = tuned.get_submodule(classes[0]).weight.shape[0] if classes else None
    if args.base:
        base_path = Path(args.base)
        base = unload(rundir.load_run(base_path)[0]) if base_path.is_dir() else \
            _weights_model(base_path, args.model, dict(args.kwargs), n_classes)
    elif recipe is not None:  # the run's starting point: its recipe's base model
        base = tasks.get(recipe["task"]).build_model(recipe, pre["class_names"]).eval()
    else:
        raise VisloraError("--base is needed when --tuned is a weights file")
    targets = args.targets[0] if len(args.targets) == 1 else args.targets
    rank = args.rank if args.rank in ("auto", "full") else int(args.rank)
    model, report = extract_adapter(base, tuned, LoraConfig(targets=targets), rank=rank, energy=args.energy,
                                    budget=args.budget)
    out = save_adapter(model, out_dir)
    write_json(out / "extract_report.json", report)
    fidelity = output_fidelity(model, tuned, pre)
    write_json(out / "extract_fidelity.json", fidelity)
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
    """How far the extracted model's outputs are from the tuned model's on a probe batch: per-layer
    errors say nothing of what the adapter does not carry."""
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
    write_json(out.with_suffix(".json"), report, indent=None)
    print(json.dumps(report, indent=2) if args.json else format_spectrum(report))
    print(f"vislora: plot written to {out}")
    return 0


def cmd_fewshot(args) -> int:
    """args.recipe_dict, args.out_dir and args.lrs come checked from vislora.cli.prepare_fewshot."""
    out = args.out_dir
    check_task(args.recipe_dict)  # before the lock makes --out
    with runpaths.locked(out):
        rows = fewshot(args.recipe_dict, out, shots=args.shots, seeds=args.seeds, contenders=args.contenders,
                       steps=args.steps, lrs=args.lrs)
    print((out / TABLE).read_text(), end="")
    print(f"vislora: {len(rows)} runs in {out} (fewshot.json, fewshot.md, fewshot.png)")
    return 0


def cmd_shrink(args) -> int:
    report = shrink_run(args.run_dir, rank=args.rank, energy=args.energy, budget=args.budget, out=args.out,
                        force=args.force)
    print(format_shrink(report))
    print(f"vislora: shrunk run written to {report['out']} (report: shrink_report.json)")
    return 0


