"""Recipes: one YAML file = one complete run. Plain nested dicts over commented defaults; unknown
keys are errors.

Paths: a relative path written in a recipe file (data.path, data.images, data.train_ann,
data.val_ann, model.checkpoint) is relative to the folder of that recipe file; one given on the
command line (--data, --set) is relative to the working directory. Both are stored absolute in the
run's recipe.yaml, so a run trains, evaluates and exports the same from any working directory.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from pathlib import Path
from typing import Any

import yaml

from vislora.defaults import (
    AUTO_AUGMENT,
    DEFAULTS,
    EMA_DEFAULTS,
    LOGGERS,
    MODE_DEFAULTS,
    TASK_DEFAULTS,
    TASK_ONLY_AUGMENT,
    default_lr,
    mode,
)
from vislora.errors import VisloraError

FREE_FORM = {"model.kwargs", "adapter.rank_pattern", "adapter.alpha_pattern"}
ADAPTER_MODES = {"none": None, "full": None, "linear_probe": "linear_probe"}
PATH_KEYS = ("data.path", "data.images", "data.train_ann", "data.val_ann", "model.checkpoint")

# the names other tools give recipe fields (Ultralytics, timm's train.py, Keras), for did-you-mean
ALIASES = {"learning_rate": "train.lr", "lr0": "train.lr", "imgsz": "data.img_size", "image_size": "data.img_size",
           "batch": "train.batch_size", "epoch": "train.epochs", "weights": "model.checkpoint",
           "model_name": "model.name", "arch": "model.name", "num_workers": "data.workers", "rank": "adapter.r",
           "lora_alpha": "adapter.alpha", "lora_dropout": "adapter.dropout", "target_modules": "adapter.targets",
           "modules_to_save": "adapter.train", "val_split": "data.val_fraction", "dataset": "data.path",
           # timm's train.py arguments for the knobs of issue #27
           "model_ema": "train.ema", "model_ema_decay": "train.ema", "aa": "data.augment.rand",
           "auto_augment": "data.augment.rand", "reprob": "data.augment.erase", "drop_path_rate": "model.drop_path",
           "torchcompile": "train.compile", "log_wandb": "train.log", "optimizer": "train.opt"}
SECTION_KEYS = {"model": "model.name", "data": "data.path", "adapter": "adapter.targets"}  # `model=...` means these


def dotted_keys(tree: dict = DEFAULTS, prefix: str = "") -> list[str]:
    """Every field of the recipe as a dotted key ('train.lr'), sections included."""
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict) and prefix + key not in FREE_FORM:
            keys += dotted_keys(value, f"{prefix}{key}.")
    return keys


def find_key(word: str) -> str | None:
    """The recipe field a bare name most likely means: 'epochs' -> 'train.epochs', 'lr0' ->
    'train.lr', 'model' -> 'model.name'; None when nothing is close."""
    word = word.strip().lstrip("-").replace("-", "_")
    if word in ALIASES or word in SECTION_KEYS:
        return ALIASES.get(word) or SECTION_KEYS[word]
    leaves: dict[str, str] = {}
    for dotted in dotted_keys():  # the first section holding a name wins: data.img_size, train.batch_size
        if "." in dotted:
            leaves.setdefault(dotted.rsplit(".", 1)[-1], dotted)
    close = difflib.get_close_matches(word, list(leaves), n=1, cutoff=0.8)
    return leaves[close[0]] if close else None


def unknown_key(source: str, prefix: str, key: str, known: list[str]) -> VisloraError:
    """The error for an unknown recipe key: a close name at this level, else the field it names
    elsewhere."""
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    guess = f"{prefix}{close[0]}" if close else find_key(str(key))
    hint = f"did you mean '{guess}'? " if guess and guess != f"{prefix}{key}" else ""
    return VisloraError(f"{source}: unknown recipe key '{prefix}{key}' ({hint}known here: {', '.join(sorted(known))})")


def _merge(base: dict, override: dict, prefix: str, source: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise unknown_key(source, prefix, key, list(base))
        if isinstance(base[key], dict) and dotted not in FREE_FORM:
            if not isinstance(value, dict):
                raise VisloraError(f"{source}: recipe key '{dotted}' must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, dotted + ".", source)
        elif isinstance(base[key], (int, float)) and not isinstance(base[key], bool) and isinstance(value, str):
            try:  # YAML 1.1 reads 3e-4 (no dot) as a string
                out[key] = float(value)
            except ValueError:
                raise VisloraError(f"{source}: recipe key '{dotted}' must be a number, got {value!r}") from None
        else:
            out[key] = value
    return out


def _fill_none(values: dict, defaults: dict) -> None:
    """Fill, in place, the None entries of `values` from `defaults` (nested)."""
    for key, default in defaults.items():
        if isinstance(default, dict) and isinstance(values.get(key), dict):
            _fill_none(values[key], default)
        elif values.get(key) is None:
            values[key] = copy.deepcopy(default)


# ---- field checks: a wrong type or range names its key before any work starts --------------------
def _number(source: str, key: str, value, low: float = -math.inf, whole: bool = False, open_low: bool = False):
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise VisloraError(f"{source}: {key} must be a {'whole ' if whole else ''}number, got {value!r}")
    if whole and value != int(value):
        raise VisloraError(f"{source}: {key} must be a whole number, got {value!r}")
    if value < low or (open_low and value == low):
        raise VisloraError(f"{source}: {key} must be {'>' if open_low else '>='} {low:g}, got {value!r}")
    return int(value) if whole else value


def _pair(source: str, key: str, value, low: float, high: float):
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise VisloraError(f"{source}: {key} must be a pair [min, max], got {value!r}")
    lo, hi = (_number(source, key, v) for v in value)
    if not low < lo <= hi <= high:
        raise VisloraError(f"{source}: {key} must be [min, max] with {low:g} < min <= max <= {high:g}, got {value!r}")
    return [lo, hi]


def _check_fields(recipe: dict, source: str) -> None:
    """Types and ranges of the fields a typo breaks late (e.g. epochs: -1 trained nothing,
    silently)."""
    t, d = recipe["train"], recipe["data"]
    for key, low, open_low in (("epochs", 1, False), ("batch_size", 1, False), ("grad_accum", 1, False)):
        t[key] = _number(source, f"train.{key}", t[key], low, whole=True, open_low=open_low)
    t["head_epochs"] = _number(source, "train.head_epochs", t["head_epochs"], 0)  # a fraction: fewshot's cells
    for key in ("max_steps", "min_steps"):
        if t[key] is not None:
            t[key] = _number(source, f"train.{key}", t[key], 1, whole=True)
    for key in ("lr", "head_lr", "weight_decay", "warmup_epochs", "min_lr", "lowrank_penalty", "factor_l2",
                "label_smoothing"):
        if t[key] is not None:
            t[key] = _number(source, f"train.{key}", t[key], 0)
    if t["clip_grad"] is not None:
        t["clip_grad"] = _number(source, "train.clip_grad", t["clip_grad"], 0, open_low=True)
    if t["lora_plus_ratio"] is not None:
        t["lora_plus_ratio"] = _number(source, "train.lora_plus_ratio", t["lora_plus_ratio"], 0, open_low=True)
    t["seed"] = _number(source, "train.seed", t["seed"], 0, whole=True)
    d["val_fraction"] = _number(source, "data.val_fraction", d["val_fraction"], 0)
    if d["val_fraction"] >= 1:
        raise VisloraError(f"{source}: data.val_fraction must be in [0, 1), got {d['val_fraction']!r}")
    d["workers"] = _number(source, "data.workers", d["workers"], 0, whole=True)
    a = d["augment"]
    if a["scale"] is not None:
        a["scale"] = _pair(source, "data.augment.scale", a["scale"], 0, 1)
    if a["hflip"] is not None and not 0 <= _number(source, "data.augment.hflip", a["hflip"]) <= 1:
        raise VisloraError(f"{source}: data.augment.hflip is a probability in [0, 1], got {a['hflip']!r}")
    if a["color_jitter"] is not None:
        a["color_jitter"] = _number(source, "data.augment.color_jitter", a["color_jitter"], 0)
    if recipe["eval"]["batch_size"] is not None:
        recipe["eval"]["batch_size"] = _number(source, "eval.batch_size", recipe["eval"]["batch_size"], 1, whole=True)
    recipe["eval"]["topk"] = _number(source, "eval.topk", recipe["eval"]["topk"], 1, whole=True)
    if t["on_collapse"] not in ("recover", "warn"):
        raise VisloraError(f"{source}: train.on_collapse must be recover or warn, got {t['on_collapse']!r}")
    if not isinstance(t["device"], str):
        raise VisloraError(f"{source}: train.device must be auto, cpu, cuda, cuda:N or mps, got {t['device']!r}")
    if not isinstance(recipe["model"]["kwargs"], dict):
        raise VisloraError(f"{source}: model.kwargs must be a mapping, got {recipe['model']['kwargs']!r}")


def _check_knobs(recipe: dict, source: str) -> None:
    """The timm knobs' types and ranges, and the augmentations only some tasks have
    (TASK_ONLY_AUGMENT), refused by name elsewhere."""
    t, a, m = recipe["train"], recipe["data"]["augment"], recipe["model"]
    for key in ("mixup", "cutmix"):
        a[key] = _number(source, f"data.augment.{key}", a[key], 0)
    if not 0 <= _number(source, "data.augment.erase", a["erase"]) <= 1:
        raise VisloraError(f"{source}: data.augment.erase is a probability in [0, 1], got {a['erase']!r}")
    if a["rand"] is not None and (not isinstance(a["rand"], str) or a["rand"].split("-")[0] not in AUTO_AUGMENT):
        raise VisloraError(f"{source}: data.augment.rand must be a timm auto-augment string starting with one of "
                           f"{', '.join(AUTO_AUGMENT)} (e.g. rand-m9-mstd0.5), got {a['rand']!r}")
    allowed = TASK_ONLY_AUGMENT.get(recipe["task"], ())
    used = [k for keys in TASK_ONLY_AUGMENT.values() for k in keys if a[k] and k not in allowed]
    if used:
        owners = [task for task, keys in TASK_ONLY_AUGMENT.items() if used[0] in keys]
        raise VisloraError(f"{source}: data.augment.{used[0]} is for {' and '.join(owners)} only, not task "
                           f"{recipe['task']}: set it to {'null' if used[0] == 'rand' else 0}")
    if m["drop_path"] is not None:
        m["drop_path"] = _number(source, "model.drop_path", m["drop_path"], 0)
        if m["drop_path"] >= 1 or "drop_path_rate" in m["kwargs"]:
            raise VisloraError(f"{source}: model.drop_path must be in [0, 1) and not also in model.kwargs "
                               f"(drop_path_rate), got {m['drop_path']!r}")
    if not isinstance(t["opt"], str) or not t["opt"]:
        raise VisloraError(f"{source}: train.opt must be a timm optimizer name (adamw, sgd, lion, lamb ...), "
                           f"got {t['opt']!r}")
    if t["layer_decay"] is not None:
        t["layer_decay"] = _number(source, "train.layer_decay", t["layer_decay"], 0, open_low=True)
        if t["layer_decay"] > 1:
            raise VisloraError(f"{source}: train.layer_decay must be in (0, 1], got {t['layer_decay']!r}")
    t["ema"] = _ema(source, t["ema"])
    for key in ("grad_checkpointing", "channels_last", "compile"):
        if not isinstance(t[key], bool):
            raise VisloraError(f"{source}: train.{key} must be true or false, got {t[key]!r}")
    t["log"] = _names(source, "train.log", t["log"] or [], allow_str=False)
    unknown = [name for name in t["log"] if name not in LOGGERS]
    if unknown:
        raise VisloraError(f"{source}: train.log names unknown logger {unknown[0]!r} (known: {', '.join(LOGGERS)})")


def _ema(source: str, value) -> dict | None:
    """train.ema: null (off), true (EMA_DEFAULTS) or {decay, warmup}."""
    if value is None or value is False:
        return None
    given = {} if value is True else value
    if not isinstance(given, dict):
        raise VisloraError(f"{source}: train.ema must be null, true or {{decay, warmup}}, got {value!r}")
    unknown = [k for k in given if k not in EMA_DEFAULTS]
    if unknown:
        raise unknown_key(source, "train.ema.", unknown[0], list(EMA_DEFAULTS))
    ema = {**EMA_DEFAULTS, **given}
    if not 0 <= _number(source, "train.ema.decay", ema["decay"]) < 1:
        raise VisloraError(f"{source}: train.ema.decay must be in [0, 1), got {ema['decay']!r}")
    if not isinstance(ema["warmup"], bool):
        raise VisloraError(f"{source}: train.ema.warmup must be true or false, got {ema['warmup']!r}")
    return {"decay": float(ema["decay"]), "warmup": ema["warmup"]}


def _names(source: str, key: str, value, allow_str: bool = True) -> str | list[str]:
    """A name pattern or a list of them: one string is read as a list of one (`exclude:
    blocks.0.attn.qkv`)."""
    if isinstance(value, str):
        return value if allow_str else [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise VisloraError(f"{source}: {key} must be a name or a list of names, got {value!r}")


def _check_adapter(adapter: dict, source: str) -> None:
    """The adapter section's types: patterns are strings or lists of them, per-layer maps are name
    -> number."""
    adapter["targets"] = _names(source, "adapter.targets", adapter["targets"])
    for key in ("exclude", "train"):
        adapter[key] = _names(source, f"adapter.{key}", adapter[key], allow_str=False)
    for key in ("rank_pattern", "alpha_pattern"):
        value = adapter[key] if adapter[key] is not None else {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise VisloraError(f"{source}: adapter.{key} must map layer patterns to numbers, got {value!r}")
        adapter[key] = {k: _number(source, f"adapter.{key}.{k}", v, 0, open_low=True) for k, v in value.items()}
    adapter["r"] = _number(source, "adapter.r", adapter["r"], 0, open_low=True)
    adapter["alpha"] = _number(source, "adapter.alpha", adapter["alpha"], 0, open_low=True)
    adapter["dropout"] = _number(source, "adapter.dropout", adapter["dropout"], 0)
    for key in ("qkv", "init"):
        if adapter[key] is not None and not isinstance(adapter[key], str):
            raise VisloraError(f"{source}: adapter.{key} must be a string, got {adapter[key]!r}")
    if not isinstance(adapter["use_dora"], bool):
        raise VisloraError(f"{source}: adapter.use_dora must be true or false, got {adapter['use_dora']!r}")
    if adapter["use_dora"] and adapter["init"] == "pissa":
        raise VisloraError(f"{source}: adapter.init pissa with adapter.use_dora: PiSSA moves the top singular part "
                         "of W into the adapter, DoRA's magnitude is not an additive part; use one of them")


def resolve(raw: dict, source: str = "recipe") -> dict:
    """Defaults + the user's recipe: the adapter mode normalised (None, 'linear_probe' or a
    LoraConfig dict), the task's defaults filled in, field types and ranges checked (ValueError
    naming the key)."""
    if not isinstance(raw, dict):
        raise VisloraError(f"{source}: a recipe must be a YAML mapping")
    unknown = [key for key in raw if key not in DEFAULTS]  # before `adapter` is taken out: it is known here
    if unknown:
        raise unknown_key(source, "", unknown[0], list(DEFAULTS))
    raw = dict(raw)
    adapter = raw.pop("adapter", DEFAULTS["adapter"])
    recipe = _merge({k: v for k, v in DEFAULTS.items() if k != "adapter"}, raw, "", source)
    if adapter is None or isinstance(adapter, str):
        key = str(adapter).lower()
        if adapter is not None and key not in ADAPTER_MODES:
            raise VisloraError(f"{source}: adapter must be a mapping, null, 'none' or 'linear_probe', got {adapter!r}")
        recipe["adapter"] = ADAPTER_MODES.get(key)
    else:
        recipe["adapter"] = _merge(DEFAULTS["adapter"], adapter, "adapter.", source)
    if recipe["task"] not in TASK_DEFAULTS:
        raise VisloraError(f"{source}: task must be one of {', '.join(TASK_DEFAULTS)}, not {recipe['task']!r}")
    _fill_none(recipe, TASK_DEFAULTS[recipe["task"]])
    if recipe["train"]["lr"] is None:
        recipe["train"]["lr"] = default_lr(recipe)
    if recipe["train"]["head_lr"] is None:
        recipe["train"]["head_lr"] = MODE_DEFAULTS["linear_probe"]
    _check_fields(recipe, source)
    _check_knobs(recipe, source)
    if isinstance(recipe["adapter"], dict):
        _check_adapter(recipe["adapter"], source)
        if recipe["adapter"]["use_dora"] and recipe["train"]["lowrank_penalty"]:
            raise VisloraError(f"{source}: train.lowrank_penalty with adapter.use_dora: the penalty is ||s B A||^2, "
                             "which is not DoRA's change of the weight; use train.factor_l2, or plain LoRA")
    t = recipe["train"]
    if mode(recipe) != "linear_probe" and t["head_epochs"] >= t["epochs"]:
        raise VisloraError(f"{source}: train.head_epochs={t['head_epochs']} leaves no epoch of train.epochs="
                         f"{t['epochs']} for the rest of the model")
    return recipe


def _absolute(value, base: Path):
    return os.path.abspath(base / os.path.expanduser(value)) if isinstance(value, str) and value else value


def absolute_paths(raw: dict, base: str | Path) -> dict:
    """A copy of a raw recipe with its relative PATH_KEYS made absolute against `base`."""
    raw = copy.deepcopy(raw)
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raw[section][key] = _absolute(raw[section][key], Path(base))
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); the value is read as YAML."""
    if "=" not in item:
        raise VisloraError(f"--set expects key.sub=value, got '{item}'")
    key, value = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError as e:
        reason = str(e).splitlines()[0]
        raise VisloraError(f"--set {item}: the value is not valid YAML ({reason}); quote text, e.g. "
                         f"{key}='\"{value}\"'") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set key.sub=value` items on a raw recipe; path values are relative to the working
    directory."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        if ".".join(keys) in PATH_KEYS:
            value = _absolute(value, Path.cwd())
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise VisloraError(f"{path}: not valid YAML: {e}") from e


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read a YAML recipe (its relative paths against its own folder), apply `--set` overrides,
    validate."""
    raw = absolute_paths(read_yaml(path), Path(path).parent)
    return resolve(apply_overrides(raw, overrides or []), str(path))


def check_paths(recipe: dict, source: str) -> None:
    """The files and folders a resolved recipe uses exist (FileNotFoundError naming the key):
    data.path (not read by COCO detection data), data.images / train_ann / val_ann and
    model.checkpoint when set."""
    d = recipe["data"]
    used = {"data.path": d["path"] if d["format"] != "coco" else None, "data.images": d["images"],
            "data.train_ann": d["train_ann"], "data.val_ann": d["val_ann"],
            "model.checkpoint": recipe["model"]["checkpoint"]}
    for key, path in used.items():
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{source}: {key} {path} does not exist"
                                    + (" (for the shipped weights: tools/import_weights.py)" if key ==
                                       "model.checkpoint" else ""))


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two resolved recipes."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and f"{prefix}{key}" not in FREE_FORM:
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def save_recipe(recipe: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe, sort_keys=False))
