"""The `vislora` command: train, eval, export, predict, footprint, extract, spectrum, fewshot,
shrink.

Start-up is fast: this module parses the arguments and checks what can be checked without torch (the
recipe, the paths, `--out`, `--resume`, predict's images, the hub for `pretrained: true`), then
imports the command itself from COMMANDS. torch, timm, onnxruntime and matplotlib take 4-20 s to
import, so `--help` and a mistyped key or path answer at once; the command's work and its other
refusals follow in vislora.commands.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from vislora import hub, image, runpaths
from vislora.errors import USER_ERRORS, VisloraError, first_rank
from vislora.recipe import apply_overrides, check_paths, find_key, load_recipe, read_yaml, resolve

# command -> "module:function", imported when the command runs (not at start-up: see the module
# docstring)
COMMANDS = {name: f"vislora.commands:cmd_{name}" for name in
            ("train", "eval", "export", "predict", "footprint", "extract", "spectrum", "fewshot", "shrink")}
CONTENDERS = ("lora", "probe", "full")  # vislora.fewshot.CONTENDERS (tests/test_cli_start.py keeps them equal)
RECIPE_SUFFIXES = (".yaml", ".yml")


def command(name: str) -> Callable[[argparse.Namespace], int]:
    """The function behind a command, imported now (COMMANDS)."""
    module, _, function = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), function)


# ---- arguments other tools take: a hint instead of argparse's bare usage -------------------------
def argument_hint(message: str, argv: list[str]) -> str | None:
    """For `key=value` arguments (Ultralytics) and unknown `--model NAME` / `--epochs N` (timm's
    train.py): the --set options that do it in vislora, or None."""
    unknown = message.split("unrecognized arguments: ", 1)[-1].split() if "unrecognized arguments: " in message else []
    sets = []
    for i, word in enumerate(argv):
        before = argv[i - 1] if i else ""
        if "=" in word and not word.startswith("-") and before not in ("--set", "--lr", "--kwargs"):
            key, _, value = word.partition("=")
        elif word.startswith("--") and word in unknown and i + 1 < len(argv):
            key, value = word, argv[i + 1]
        else:
            continue
        dotted = find_key(key)
        if dotted:
            sets.append(f"--set {dotted}={value}")
    return f"recipe fields are set with --set KEY=VALUE, here: {' '.join(sets)}" if sets else None


class Parser(argparse.ArgumentParser):
    """argparse, with a hint line when the arguments look like another tool's (argument_hint).
    `argv`: the arguments being parsed, set by main()."""

    argv: list[str] = []

    def error(self, message: str):
        hint = argument_hint(message, Parser.argv)
        super().error(f"{message}\n  hint: {hint}" if hint else message)


def folder_arg(path: str | None, flag: str = "--out") -> Path | None:
    """A folder argument: refused in one line when it names an existing file."""
    if path is not None and Path(path).is_file():
        raise VisloraError(f"{flag} {path} is a file: name a folder")
    return Path(path) if path is not None else None


def not_a_recipe(target: str, what: str) -> None:
    """eval / export / predict take what training wrote, not the recipe that defines it."""
    if Path(target).suffix.lower() in RECIPE_SUFFIXES:
        raise VisloraError(f"{target} is a recipe: train it first (vislora train {target} --out RUN), then "
                         f"{what} RUN or its exported RUN/export/model.onnx")


def not_a_setting(recipe: str | None) -> None:
    """`vislora train epochs=3` takes epochs=3 as the recipe file: say how a field is set."""
    if recipe and "=" in recipe and not Path(recipe).exists():
        key, _, value = recipe.partition("=")
        dotted = find_key(key) or key
        raise VisloraError(f"'{recipe}' is not a recipe file: train takes a RECIPE (e.g. recipes/demo_vit_lora.yaml) "
                         f"and recipe fields are set with --set, e.g. --set {dotted}={value}")


# ---- checks before the command's module is imported ---------------------------------------------
def train_recipe(args: argparse.Namespace, run_dir: Path) -> dict:
    """The recipe a training runs: RECIPE with --set and --data, or with --resume alone the run's
    own."""
    overrides = list(args.set or []) + ([f"data.path={args.data}"] if args.data else [])
    if args.recipe is not None:
        return load_recipe(args.recipe, overrides)
    if not (run_dir / runpaths.RECIPE).is_file():
        raise FileNotFoundError(f"--resume: {run_dir} is not a vislora run (no {runpaths.RECIPE}): there is nothing "
                                f"to resume; start it with vislora train RECIPE --out {run_dir}")
    return resolve(apply_overrides(read_yaml(run_dir / runpaths.RECIPE), overrides), str(run_dir / runpaths.RECIPE))


def prepare_train(args: argparse.Namespace) -> None:
    """The recipe read and validated, --out and --resume checked (args.recipe_dict,
    args.run_dir)."""
    not_a_setting(args.recipe)
    if args.recipe is None and not (args.resume and args.out):
        raise VisloraError("train needs a RECIPE (or --resume --out RUN, which continues with the run's own recipe)")
    args.run_dir = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
    args.recipe_dict = train_recipe(args, args.run_dir)
    source = args.recipe or str(args.run_dir / runpaths.RECIPE)
    check_paths(args.recipe_dict, source)
    hub.check_pretrained(args.recipe_dict["model"], source)
    data = (args.recipe_dict["data"]["path"], args.recipe_dict["data"]["images"])
    runpaths.check_out(args.run_dir, data, args.resume, args.force)  # before anything is created
    if args.resume:
        runpaths.check_resumable(args.run_dir, args.recipe_dict)


def existing(target: str, what: str) -> None:
    if not Path(target).exists():
        raise FileNotFoundError(f"{target} does not exist (expected {what})")


def adapter_runs(runs: list[str]) -> None:
    """--adapter RUN: each an existing run directory, not a recipe or an exported file."""
    for run in runs:
        not_a_recipe(run, "--adapter")
        existing(run, "a run directory")
        if not (Path(run) / runpaths.RECIPE).is_file():
            raise VisloraError(f"--adapter {run} is not a run directory (no {runpaths.RECIPE}): exported files hold "
                             "one merged model; give it as the model, alone")


def prepare_eval(args: argparse.Namespace) -> None:
    if args.adapter:
        if args.target is not None or args.out:
            raise VisloraError("eval --adapter RUN ...: no TARGET and no --out (each run's report goes to "
                             "RUN/eval/report.json); give the runs as --adapter RUN1 --adapter RUN2")
        adapter_runs(args.adapter)
        return
    if args.target is None:
        raise VisloraError("eval needs a TARGET (run directory, model.pt or model.onnx) or --adapter RUN ...")
    not_a_recipe(args.target, "eval")
    existing(args.target, "a run directory, model.pt or model.onnx")
    if args.out and args.data:
        runpaths.keep_apart(Path(args.out).parent, [args.data])
    if args.out and Path(args.out).is_dir():
        raise VisloraError(f"--out {args.out} is a folder: name the report file, e.g. {Path(args.out) / 'report.json'}")


def prepare_export(args: argparse.Namespace) -> None:
    not_a_recipe(args.run_dir, "export")
    existing(args.run_dir, "a run directory")
    folder_arg(args.out)


def prepare_predict(args: argparse.Namespace) -> None:
    """--topk, --out and the model checked; args.images: every image file of the given files,
    folders and globs."""
    if args.topk < 1:
        raise VisloraError(f"--topk must be >= 1, got {args.topk}")
    if args.adapter:
        adapter_runs(args.adapter)
        args.model, args.images = None, args.inputs
    elif len(args.inputs) < 2:
        raise VisloraError("predict needs a MODEL (run directory, model.pt or model.onnx) and at least one IMAGE")
    else:
        args.model, args.images = args.inputs[0], args.inputs[1:]
        not_a_recipe(args.model, "predict with")
        existing(args.model, "a run directory, model.pt or model.onnx")
    folder_arg(args.out)
    args.images = image_files(args.images)


def prepare_fewshot(args: argparse.Namespace) -> None:
    """The recipe, --out (kept out of the data), --lr and the hub checked (args.recipe_dict,
    args.out_dir, args.lrs)."""
    args.recipe_dict = load_recipe(args.recipe, [f"data.path={args.data}"] if args.data else [])
    check_paths(args.recipe_dict, args.recipe)
    hub.check_pretrained(args.recipe_dict["model"], args.recipe)
    args.out_dir = folder_arg(args.out) or Path("runs") / f"fewshot_{Path(args.recipe).stem}"
    runpaths.keep_apart(args.out_dir, [args.recipe_dict["data"]["path"]],
                        [args.out_dir / "data", args.out_dir / "runs"])  # before the lock makes the folder
    args.lrs = lr_overrides(args.lr)


def prepare_footprint(args: argparse.Namespace) -> None:
    if Path(args.target).suffix.lower() in RECIPE_SUFFIXES:
        hub.check_pretrained(load_recipe(args.target)["model"], args.target)


def prepare_extract(args: argparse.Namespace) -> None:
    folder_arg(args.out)
    args.kwargs = parse_kwargs(args.kwargs)


def prepare_run_dir(args: argparse.Namespace) -> None:
    """spectrum and shrink read a run directory."""
    not_a_recipe(args.run_dir, args.command)
    existing(args.run_dir, "a run directory")


PREPARE: dict[str, Callable[[argparse.Namespace], None]] = {
    "train": prepare_train, "eval": prepare_eval, "export": prepare_export, "predict": prepare_predict,
    "fewshot": prepare_fewshot, "footprint": prepare_footprint, "extract": prepare_extract,
    "spectrum": prepare_run_dir, "shrink": prepare_run_dir}


def parse_kwargs(text: str) -> dict:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise VisloraError(f"--kwargs must be a JSON object, got {text!r}: {e}") from None
    if not isinstance(kwargs, dict):
        raise VisloraError(f"--kwargs must be a JSON object, got {text!r}")
    return kwargs


def lr_overrides(items: list[str] | None) -> dict[str, float]:
    """--lr probe=0.01 full=5e-4 -> {"probe": 0.01, "full": 0.0005}."""
    lrs = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            lrs[name] = float(value)
        except ValueError:
            raise VisloraError(f"--lr expects CONTENDER=LR (e.g. probe=0.01), got '{item}'") from None
    return lrs


# ---- predict's images ---------------------------------------------------------------------------
def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in image.EXTENSIONS


def folder_images(folder: Path) -> list[Path]:
    """Image files under a folder, at any depth, sorted; hidden files and folders skipped."""
    return sorted(p for p in folder.rglob("*") if is_image(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def image_files(items: list[str]) -> list[str]:
    """predict's arguments as image files: a folder gives its images (recursively), a glob (quote
    it: 'photos/*.jpg', '**' for any depth) its matching images; other files are kept as given, so a
    missing or unreadable one is reported beside the others. A folder or glob without images is a
    ValueError naming it."""
    files: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = folder_images(path)
        elif not path.exists() and glob.has_magic(item):
            found = sorted(p for p in map(Path, glob.glob(item, recursive=True)) if is_image(p))
        else:
            files.append(item)
            continue
        if not found:
            raise VisloraError(f"{item}: no image files ({', '.join(image.EXTENSIONS)}) found there")
        files += [str(p) for p in found]
    return files


# ---- running a command --------------------------------------------------------------------------
def leave_process_group(timeout_s: float = 10.0) -> None:
    """Under DDP, after an error every rank met together (e.g. a diverged loss): wait, at most
    timeout_s, until all ranks are here, so rank 0 has printed the error before the launcher stops
    the others."""
    dist = sys.modules.get("torch.distributed")  # not imported: this process never joined a group
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    with contextlib.suppress(Exception):
        dist.barrier(async_op=True).wait(datetime.timedelta(seconds=timeout_s))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    Parser.argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(Parser.argv)
    try:
        PREPARE.get(args.command, lambda _: None)(args)  # before torch & co. are imported
        return command(args.command)(args)
    except USER_ERRORS as e:
        if first_rank():  # under torchrun every rank stops with the same error: say it once
            print(f"vislora {args.command}: error: {e}", file=sys.stderr)
        leave_process_group()
        return 2
    except KeyboardInterrupt:
        print(f"vislora {args.command}: interrupted; the last checkpoint stays loadable", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vislora", description="LoRA fine-tuning for timm vision models")
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

    p = sub.add_parser("eval", help="evaluate a run directory or an exported .pt/.onnx file")
    p.add_argument("target", nargs="?", help="run directory, model.pt or model.onnx (or --adapter RUN ...)")
    p.add_argument("--adapter", action="append", metavar="RUN", help="runs of one base, evaluated in turn with "
                   "one base in memory (each report in RUN/eval/report.json)")
    p.add_argument("--data", help="ROOT/val, a ROOT holding val/, or ROOT/<class> (default: the run's val split)")
    p.add_argument("--out", help="report JSON path (default RUN_DIR/eval/report.json)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's eval.batch_size, else 64")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")

    p = sub.add_parser("export", help="merge the adapter and export TorchScript / ONNX, verified")
    p.add_argument("run_dir")
    p.add_argument("--format", default=None, choices=["torchscript", "onnx", "all"],
                   help="default: the recipe's export.formats")
    p.add_argument("--out", help="output folder (default RUN_DIR/export)")
    p.add_argument("--opset", type=int, default=None, help="default: the recipe's export.opset")
    p.add_argument("--dynamic-batch", dest="dynamic_batch", action="store_true", default=None)
    p.add_argument("--static-batch", dest="dynamic_batch", action="store_false")
    p.add_argument("--json", action="store_true", help="print the whole report (export.json) as JSON")

    p = sub.add_parser("predict", help="top-k classes (or boxes) for images, from a run, a .pt or an .onnx file")
    p.add_argument("inputs", nargs="+", metavar="MODEL IMAGE", help="run directory, model.pt or model.onnx, then "
                   "image files, folders (searched recursively) or quoted globs ('photos/**/*.jpg'); "
                   "with --adapter: the images only")
    p.add_argument("--adapter", action="append", metavar="RUN", help="runs of one base, predicted in turn with "
                   "one base in memory (repeat it: --adapter RUN1 --adapter RUN2)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--out", help="folder for the files predict writes (segmentation masks); default predictions/ "
                   "beside the model")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("footprint", help="parameters, bytes, FLOPs, latency and memory of a model or run")
    p.add_argument("target", help="run directory, recipe YAML or timm model name")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", action="store_true")

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

    p = sub.add_parser("spectrum", help="singular values and effective rank of each learned update")
    p.add_argument("run_dir", help="a LoRA run directory")
    p.add_argument("--out", help="PNG path (default RUN_DIR/spectrum.png)")
    p.add_argument("--json", action="store_true")

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
                        "lora 1 : probe 5 : full 0.5)")
    p.add_argument("--out", help="output folder (default runs/fewshot_<recipe name>); a rerun resumes its grid")

    p = sub.add_parser("shrink", help="a smaller LoRA run: the truncated SVD of each learned update")
    p.add_argument("run_dir", help="a LoRA run directory")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="one rank for every layer (at most its current rank)")
    how.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this share of the update's "
                                                  "squared norm")
    how.add_argument("--budget", type=int, help="total adapter parameters, spent across layers as extract --budget")
    p.add_argument("--out", help="new run directory (default RUN_shrink_<rank|energy|budget><value>)")
    p.add_argument("--force", action="store_true", help="replace the run in --out")
    return parser


if __name__ == "__main__":
    sys.exit(main())
