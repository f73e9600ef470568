"""timm's training knobs and the loggers (issue #27): each changes what it should, resumes exactly, and a bad
value is one line naming its field; tiny models on a generated folder."""

import csv
import json
import logging

import numpy as np
import pytest
import timm
import torch

import vislora.train as vtrain
from vislora import knobs, loggers, runpaths
from vislora.augment import train_pipeline
from vislora.config import LoraConfig
from vislora.data import make_synthetic_folder
from vislora.errors import VisloraError
from vislora.evaluate import evaluate
from vislora.inject import inject
from vislora.recipe import resolve, save_recipe
from vislora.tasks import classification
from vislora.tasks.backbone import create_body

VIT = {"name": "vit_tiny_patch16_224", "pretrained": False, "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}
CNN = {"name": "test_efficientnet", "pretrained": False, "kwargs": {}}
LORA = {"r": 4, "targets": "vit"}


def recipe_for(path, model=VIT, adapter=LORA, augment=None, **train):
    return resolve({
        "model": model, "adapter": adapter,
        "data": {"path": str(path), "img_size": 32, "workers": 0, "augment": {"scale": [0.8, 1.0], **(augment or {})}},
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_epochs": 0, "seed": 0, **train},
    })


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_synthetic_folder(tmp_path_factory.mktemp("images"), classes=3, per_class=16, size=32)


def rows_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- a bad value is one line naming its field ------------------------------------------------------------
@pytest.mark.parametrize("raw,field", [
    ({"train": {"ema": {"decay": 1.5}}}, "train.ema.decay"),
    ({"train": {"ema": {"decay": 0.9, "wamrup": True}}}, "train.ema.wamrup"),
    ({"train": {"ema": {"warmup": "yes"}}}, "train.ema.warmup"),
    ({"train": {"ema": 0.99}}, "train.ema"),
    ({"data": {"augment": {"mixup": -1}}}, "data.augment.mixup"),
    ({"data": {"augment": {"cutmix": "much"}}}, "data.augment.cutmix"),
    ({"data": {"augment": {"rand": "randaugment"}}}, "data.augment.rand"),
    ({"data": {"augment": {"rand": 9}}}, "data.augment.rand"),
    ({"data": {"augment": {"erase": 1.5}}}, "data.augment.erase"),
    ({"train": {"layer_decay": 0}}, "train.layer_decay"),
    ({"train": {"layer_decay": 1.5}}, "train.layer_decay"),
    ({"train": {"opt": 3}}, "train.opt"),
    ({"model": {"drop_path": 1.0}}, "model.drop_path"),
    ({"model": {"drop_path": 0.1, "kwargs": {"drop_path_rate": 0.2}}}, "model.drop_path"),
    ({"train": {"grad_checkpointing": "yes"}}, "train.grad_checkpointing"),
    ({"train": {"channels_last": 1}}, "train.channels_last"),
    ({"train": {"compile": "no"}}, "train.compile"),
    ({"train": {"log": ["tensorbord"]}}, "train.log"),
    ({"train": {"log": [1]}}, "train.log"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_bad_value_is_one_line_naming_the_field(raw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as e:
        resolve(raw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
@pytest.mark.parametrize("key,value", [("mixup", 0.2), ("cutmix", 1.0), ("rand", "rand-m9-mstd0.5"), ("erase", 0.25)])
def test_detection_and_segmentation_refuse_classification_augments_by_name(task, key, value):
    with pytest.raises(VisloraError, match=rf"data\.augment\.{key} is for classification only, not task {task}"):
        resolve({"task": task, "data": {"augment": {key: value}}})
    resolve({"task": task, "model": {"drop_path": 0.1}})  # drop_path applies to every timm backbone


@pytest.mark.parametrize("word,field", [("model_ema", "train.ema"), ("aa", "data.augment.rand"),
                                        ("reprob", "data.augment.erase"), ("drop_path_rate", "model.drop_path"),
                                        ("layer_decay", "train.layer_decay"), ("cutmix", "data.augment.cutmix"),
                                        ("torchcompile", "train.compile")])
def test_timm_argument_names_find_the_field(word, field):
    from vislora.recipe import find_key

    assert find_key(word) == field


def test_every_knob_is_off_by_default():
    r = resolve({})
    t, a = r["train"], r["data"]["augment"]
    assert (t["opt"], t["layer_decay"], t["ema"], t["log"]) == ("adamw", None, None, [])
    assert not (t["grad_checkpointing"] or t["channels_last"] or t["compile"])
    assert (a["mixup"], a["cutmix"], a["rand"], a["erase"], r["model"]["drop_path"]) == (0, 0, None, 0, None)
    assert resolve({"train": {"ema": True}})["train"]["ema"] == {"decay": 0.9998, "warmup": True}


# ---- optimizer and layer decay -----------------------------------------------------------------------------
def lora_vit(depth=3):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                              depth=depth)
    return inject(model, LoraConfig(r=4, targets="vit", train=("head",)))


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD),
                                      ("lion", timm.optim.Lion), ("lamb", timm.optim.Lamb),
                                      ("AdamW", torch.optim.AdamW)])
def test_opt_picks_the_timm_optimizer(name, cls):
    t = resolve({"train": {"opt": name}})["train"]
    optimizer, _ = knobs.build_optimizer(lora_vit(1), t, steps_per_epoch=4)
    assert type(optimizer) is cls


def test_an_unknown_opt_is_one_line_with_valid_names():
    with pytest.raises(VisloraError, match=r"train\.opt='adamx' is not a timm optimizer .*adamw, sgd, lion") as e:
        knobs.build_optimizer(lora_vit(1), resolve({"train": {"opt": "adamx"}})["train"], steps_per_epoch=4)
    assert "\n" not in str(e.value)


def test_default_adamw_steps_exactly_as_torch_adamw():
    """opt adamw through timm's factory: the numbers of the torch.optim.AdamW vislora used before."""
    t = resolve({"train": {"lr": 1e-2, "warmup_epochs": 0}})["train"]  # LambdaLR's factor 1 at step 0
    a, b = lora_vit(1), lora_vit(1)
    ours, _ = knobs.build_optimizer(a, t, steps_per_epoch=4)
    groups = knobs.param_groups(b, t["weight_decay"], knobs.head_parameter_ids(b))
    for g in groups:
        g["lr"] = t["lr"]
    before = torch.optim.AdamW(groups, lr=t["lr"])
    x = torch.randn(4, 3, 32, 32)
    for model, opt in ((a, ours), (b, before)):
        for _ in range(3):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("adapter", ["lora", "lora+", "full"])
def test_layer_decay_gives_per_depth_lrs(adapter):
    torch.manual_seed(0)
    model = lora_vit(3) if adapter != "full" else timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8, depth=3)
    t = resolve({"train": {"lr": 1e-2, "layer_decay": 0.5, "lora_plus_ratio": 4 if adapter == "lora+" else None}})
    optimizer, _ = knobs.build_optimizer(model, t["train"], steps_per_epoch=4)
    lr = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}  # the peak lr
    fast = knobs.lora_plus_ids(model) if adapter == "lora+" else set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # timm's ViT grouping: embeddings 0, block i at i + 1, the final norm with the last block, the head last
        depth = int(name.split(".")[1]) + 1 if name.startswith("blocks.") else 0 if "embed" in name or \
            name == "cls_token" else 3 if name.startswith("norm.") else 4
        want = 1e-2 * 0.5 ** (4 - depth) * (4 if id(p) in fast else 1)
        assert lr[id(p)] == pytest.approx(want), name
    assert adapter == "full" or fast or any("lora" in n or ".A" in n for n, _ in model.named_parameters())
    head = next(g for g in optimizer.param_groups if g["head"])
    assert head["initial_lr"] == pytest.approx(1e-2)  # the head group composes with layer decay at scale 1


def test_layer_decay_without_depths_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(VisloraError, match=r"train\.layer_decay"):
        knobs.build_optimizer(model, resolve({"train": {"layer_decay": 0.7}})["train"], steps_per_epoch=2)


# ---- drop path, mixup, rand augment, erasing ---------------------------------------------------------------
@pytest.mark.parametrize("rate", [None, 0.2])
def test_drop_path_sets_the_models_rate(folder, rate):
    recipe = recipe_for(folder, model={**VIT, "drop_path": rate})
    model = classification.build_model(recipe, ["a", "b", "c"])
    last = model.blocks[-1].drop_path1
    assert (isinstance(last, torch.nn.Identity) if rate is None else last.drop_prob == pytest.approx(rate))


@pytest.mark.parametrize("rate", [None, 0.2])
def test_drop_path_reaches_a_detection_backbone(rate):
    body = create_body({"name": "test_resnet", "pretrained": False, "kwargs": {}, "checkpoint": None,
                        "drop_path": rate})
    rates = [m.drop_prob for m in body.modules() if isinstance(m, timm.layers.DropPath)]
    assert rates == [] if rate is None else rates and max(rates) == pytest.approx(rate)


def test_mixup_gives_soft_targets_and_the_soft_loss():
    mix = knobs.BatchMix(0.8, 1.0, num_classes=3, smoothing=0.0)
    np.random.seed(0)
    images, labels = torch.rand(9, 3, 16, 16), torch.tensor([0, 1, 2] * 3)
    mixed, targets = mix((images.clone(), labels))
    assert len(mixed) == 8 and targets.shape == (8, 3) and targets.is_floating_point()  # an odd image left out
    assert torch.allclose(targets.sum(1), torch.ones(8)) and (targets.max(1).values < 1).any()
    assert not torch.equal(mixed, images[:8])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    value, logs, n = classification.loss(model, (mixed, targets), torch.device("cpu"), resolve({}))
    expected = timm.loss.SoftTargetCrossEntropy()(model(mixed), targets)
    assert torch.allclose(value, expected) and n == 8 and 0 <= logs["acc"] <= 1


@pytest.mark.parametrize("augment,step", [({"rand": "rand-m9-mstd0.5"}, "pil_op"), ({"rand": "trivial"}, "pil_op"),
                                          ({"erase": 0.5}, "tensor_op")])
def test_rand_and_erase_are_timm_steps_of_the_pipeline(augment, step):
    pre = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}
    plain, tuned = train_pipeline(pre), train_pipeline(pre, augment)
    names = [getattr(getattr(s, "custom_apply_fns", {}).get("image"), "func", None) for s in tuned.transforms]
    assert step in [f.__name__ for f in names if f is not None]
    assert len(tuned.transforms) == len(plain.transforms) + 1 - ("rand" in augment)  # rand: no colour jitter
    rgb = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    assert tuned(image=rgb)["image"].shape == (3, 32, 32)


# ---- EMA -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,ema,want", [(0.5, 0.6, (0.6, True)), (0.6, 0.5, (0.6, False)), (0.5, 0.5, (0.5, False)),
                                          (float("nan"), 0.4, (0.4, True))])
def test_the_better_of_raw_and_ema_is_kept(raw, ema, want):
    assert knobs.kept_score({"val_top1": raw, "val_ema_top1": ema}, "val_top1") == want


def test_ema_weights_differ_and_are_what_eval_reports_when_kept(tmp_path, folder, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(knobs, "kept_score", lambda row, score: (row["val_ema_top1"], True))  # always the EMA's
    run = vtrain.train(recipe_for(folder, ema={"decay": 0.9, "warmup": False}, epochs=2), tmp_path / "run")
    rows = rows_of(run)
    assert all("val_ema_top1" in r for r in rows) and rows[0]["ema_kept"]
    assert any(r["val_ema_loss"] != r["val_loss"] for r in rows)  # other weights than the raw ones
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["ema"]
    kept = max((r for r in rows if r.get("ema_kept")), key=lambda r: r["epoch"])
    assert "(EMA weights) at epoch" in capsys.readouterr().out  # the closing line says which weights were kept
    report = evaluate(run, out=tmp_path / "report.json")
    assert report["top1"] == pytest.approx(kept["val_ema_top1"], abs=1e-6)


# ---- resume exactness ------------------------------------------------------------------------------------------
def interrupted_then_resumed(recipe, tmp_path, monkeypatch):
    """An uninterrupted run and one stopped by Ctrl-C in epoch 2, then resumed: both last.pt states."""
    vtrain.train(recipe, tmp_path / "straight")
    real, calls = classification.validate, []

    per_epoch = 1 + (recipe["train"]["ema"] is not None)  # the EMA is validated too

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == per_epoch + 1:
            raise KeyboardInterrupt  # Ctrl-C in epoch 2, after epoch 1's checkpoint
        return real(*args, **kwargs)

    monkeypatch.setattr(classification, "validate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        vtrain.train(recipe, tmp_path / "resumed")
    monkeypatch.setattr(classification, "validate", real)
    assert torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)["epoch"] == 1
    vtrain.train(recipe, tmp_path / "resumed", resume=True)
    return [torch.load(tmp_path / f"{name}/checkpoints/last.pt", weights_only=True) for name in ("straight", "resumed")]


@pytest.mark.parametrize("knob", [
    {"ema": {"decay": 0.8, "warmup": True}},
    {"ema": {"decay": 0.8, "warmup": False}, "kept": True},
    {"augment": {"mixup": 0.8, "cutmix": 1.0}},
    {"augment": {"rand": "rand-m9-mstd0.5", "erase": 0.5}},
], ids=["ema", "ema-kept", "mixup-cutmix", "rand-erase"])
def test_resume_is_exact(tmp_path, folder, monkeypatch, one_thread, knob):
    if knob.get("kept"):  # the EMA's weights are saved as the run's model every epoch: last.pt keeps the raw ones
        monkeypatch.setattr(knobs, "kept_score", lambda row, score: (row["val_ema_top1"], True))
    recipe = recipe_for(folder, augment=knob.get("augment"), ema=knob.get("ema"))
    a, b = interrupted_then_resumed(recipe, tmp_path, monkeypatch)
    for part in ("model", "ema") if "ema" in knob else ("model",):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.allclose(a[part][k], b[part][k], atol=1e-6), (part, k)
    assert [r["train_loss"] for r in a["history"]] == pytest.approx([r["train_loss"] for r in b["history"]])


@pytest.mark.parametrize("change,refused", [
    ("train.ema.decay=0.5", True), ("data.augment.mixup=0.2", True), ("train.opt=sgd", True),
    ("train.layer_decay=0.7", True), ("model.drop_path=0.1", True), ("train.compile=true", True),
    ("train.log=[tensorboard]", False),
])
def test_resume_refuses_a_changed_knob(tmp_path, change, refused):
    from vislora.recipe import apply_overrides

    raw = {"train": {"ema": {"decay": 0.9}}}
    save_recipe(resolve(raw), tmp_path / runpaths.RECIPE)
    (tmp_path / runpaths.CHECKPOINTS).mkdir()
    (tmp_path / runpaths.CHECKPOINTS / "last.pt").write_bytes(b"")
    changed = resolve(apply_overrides(raw, [change]))
    if refused:
        with pytest.raises(ValueError, match=change.split("=")[0].replace(".", r"\.")):
            runpaths.check_resumable(tmp_path, changed)
    else:
        runpaths.check_resumable(tmp_path, changed)


# ---- memory and speed ------------------------------------------------------------------------------------------
def test_grad_checkpointing_and_channels_last_keep_the_gradients():
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for t in ({"grad_checkpointing": False, "channels_last": False}, {"grad_checkpointing": True,
                                                                      "channels_last": True}):
        model = knobs.prepare(lora_vit(2).train(), t)
        model(x).square().mean().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
    torch.manual_seed(0)
    cnn = knobs.prepare(timm.create_model("test_efficientnet", num_classes=3), {"grad_checkpointing": True,
                                                                                 "channels_last": True})
    assert cnn.conv_stem.weight.is_contiguous(memory_format=torch.channels_last) and cnn.grad_checkpointing


def test_a_channels_last_run_writes_plain_files(tmp_path, folder, one_thread):
    run = vtrain.train(recipe_for(folder, model=CNN, adapter={"r": 4, "targets": "conv"}, epochs=1, max_steps=2,
                                  channels_last=True, grad_checkpointing=True), tmp_path / "run")
    assert 0 <= evaluate(run, out=tmp_path / "r.json")["top1"] <= 1


def compile_works() -> bool:
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
        return True
    except Exception:  # noqa: BLE001 - no compiler on this platform
        return False


def test_a_compiled_run_writes_eager_files(tmp_path, folder, caplog, one_thread):
    if not compile_works():
        pytest.skip("torch.compile cannot run here")
    with caplog.at_level(logging.WARNING, logger="vislora.knobs"):
        run = vtrain.train(recipe_for(folder, epochs=1, max_steps=2, compile=True), tmp_path / "run")
    assert not [r for r in caplog.records if "train.compile" in r.getMessage()]  # it compiled, no fallback
    from safetensors.torch import load_file

    keys = list(load_file(str(run / "adapter/adapter_model.safetensors")))
    for name in ("last.pt", "best.pt"):
        state = torch.load(run / "checkpoints" / name, weights_only=True)
        keys += list(state["model"]) + [str(k) for k in state["optimizer"]["state"]]
    assert keys and not [k for k in keys if "_orig_mod" in k]


def test_compile_falls_back_with_one_warning(tmp_path, folder, monkeypatch, caplog, one_thread):
    def broken(net):
        def fail(*args, **kwargs):
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="vislora.knobs"):
        run = vtrain.train(recipe_for(folder, epochs=2, compile=True), tmp_path / "run")
    warned = [r for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(warned) == 1 and "no compiler here" in warned[0].getMessage()
    assert len(rows_of(run)) == 2


# ---- logs ------------------------------------------------------------------------------------------------------
def test_summary_csv_and_tensorboard_events(tmp_path, folder, one_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = vtrain.train(recipe_for(folder, epochs=2, log=["tensorboard"]), tmp_path / "run")
    with open(run / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and list(rows[0])[:5] == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5"]
    assert list(rows[0])[-1] == "lr" and [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["eval_top1"]) == pytest.approx(rows_of(run)[1]["val_top1"])
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"train/train_loss", "train/lr", "epoch/val_top1", "epoch/train_loss"} <= set(tags["scalars"])
    steps = [e.step for e in events.Scalars("train/train_loss")]
    assert steps == list(range(1, rows_of(run)[-1]["step"] + 1))  # one point per optimizer step
    assert "confusion_matrix" in tags["images"]


def test_a_missing_logger_names_its_pip_package(tmp_path, folder, monkeypatch):
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VisloraError, match=r"^train\.log: mlflow is not installed: pip install mlflow-skinny$"):
        loggers.Loggers(recipe_for(folder, log=["mlflow"]), tmp_path, None, True)


def test_mlflow_local_store(tmp_path, folder, one_thread):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = vtrain.train(recipe_for(folder, epochs=2, log=["mlflow"]), tmp_path / "run")
    ids = json.loads((run / "loggers.json").read_text())
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    history = client.get_metric_history(ids["mlflow"], "epoch/val_top1")
    assert [m.value for m in history] == pytest.approx([r["val_top1"] for r in rows_of(run)])
    assert client.get_run(ids["mlflow"]).data.params["train.lr"] == "0.003"


def test_wandb_offline(tmp_path, folder, one_thread, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = vtrain.train(recipe_for(folder, epochs=1, log=["wandb"]), tmp_path / "run")
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
