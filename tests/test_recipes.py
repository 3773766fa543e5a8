"""Stage two the timm way: timm's optimizer, schedule and EMA, local inits with a new head, config files,
logs outside a terminal, `report`, and the discriminator that does not learn (issue 30)."""

import csv
import hashlib
import json
import math
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from conftest import distill_args, run_cli
from safetensors.torch import load_file, save_file
from test_reliability import kill_when, mealv2_process

from mealv2.cli import main
from mealv2.distill.losses import Discriminator, discriminator_loss

pytestmark = pytest.mark.slow

TIMM_RECIPE = ("--opt", "adamw", "--lr", "0.003", "--sched", "cosine", "--warmup-epochs", "1", "--warmup-lr",
               "0.0005", "--min-lr", "0.0001", "--model-ema", "--model-ema-decay", "0.5", "--clip-grad", "1.0")


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(first, second):
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def timm_run(small_root, reference_store, tmp_path_factory):
    """Three epochs of AdamW, cosine after a warm-up epoch, an EMA and gradient clipping, step lines every step."""
    out = tmp_path_factory.mktemp("recipes") / "timm"
    result = run_cli(*distill_args(small_root, reference_store, out, 3, *TIMM_RECIPE, "--log-interval", "1"))
    assert result.exit_code == 0, result.output
    return out, result.output


def test_timm_recipe_follows_timm_factories(timm_run):
    out, output = timm_run
    rows = metrics(out)
    expected = timm.scheduler.CosineLRScheduler(torch.optim.SGD([torch.zeros(1)], lr=0.003), t_initial=3,
                                                lr_min=0.0001, warmup_t=1, warmup_lr_init=0.0005)
    assert [r["lr"] for r in rows] == pytest.approx([expected._get_lr(e)[0] for e in range(3)])
    assert rows[0]["lr"] == pytest.approx(0.0005) and rows[1]["lr"] > rows[2]["lr"] > 0.0001
    assert all(r["val_top1_ema"] is not None for r in rows)
    assert (out / "model_ema.safetensors").is_file()
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["betas"]  # AdamW's, not SGD's
    assert state["updates"] == 3 * 4 and state["ema"]  # 30 images in batches of 8: 4 steps an epoch
    assert "adamw lr 0.003, cosine schedule after 1 warm-up epoch(s), EMA of the weights" in output
    assert "batch 8 global (8 per rank × 1)" in output
    assert "best: the" in output


def test_a_killed_timm_run_resumes_exactly(timm_run, small_root, reference_store, tmp_path):
    """SIGKILL once two epochs are logged: the resume ends on the uninterrupted run's weights and EMA."""
    uninterrupted, _ = timm_run
    out = tmp_path / "killed"
    args = distill_args(small_root, reference_store, out, 3, *TIMM_RECIPE, "--log-interval", "1")
    lines = out / "metrics.jsonl"
    kill_when(mealv2_process(*args), lambda: lines.exists() and lines.read_text().count("\n") >= 2, "two epochs")
    resumed = subprocess.run([sys.executable, "-m", "mealv2", *map(str, args), "--resume"], capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(out / "model.safetensors", uninterrupted / "model.safetensors")
    assert_same_weights(out / "model_ema.safetensors", uninterrupted / "model_ema.safetensors")
    assert [r["lr"] for r in metrics(out)] == pytest.approx([r["lr"] for r in metrics(uninterrupted)])
    with open(out / "summary.csv") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2", "3"]


def test_logs_outside_a_terminal(timm_run):
    out, output = timm_run
    step_lines = [line for line in output.splitlines() if " step " in line and "img/s" in line]
    assert len(step_lines) == 3 * 4  # --log-interval 1, no terminal here: a line per step
    assert "epoch 1/3 step 1 | 8/30 img | loss " in step_lines[0] and "eta" in step_lines[0]
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:4] == ["epoch", "train_loss", "train_kd_loss", "train_disc_loss"]  # timm's update_summary columns
    assert {"eval_top1", "eval_top5", "eval_top1_ema", "lr"} <= rows[0].keys() and len(rows) == 3
    assert float(rows[2]["eval_top1"]) == pytest.approx(metrics(out)[2]["val_top1"])
    log = (out / "log.txt").read_text()
    assert step_lines[-1] in log and "epoch 3/3 |" in log


def test_config_json_reproduces_the_run(timm_run, small_root, tmp_path):
    out, _ = timm_run
    config = json.loads((out / "config.json").read_text())
    ran = config["ran"]
    assert ran["decoder"] in ("dali", "torch", "pil") and ran["device"] == "cpu" and ran["world_size"] == 1
    assert ran["autocast"] == "off" and ran["torch"] == torch.__version__ and ran["timm"] == timm.__version__
    assert ran["store"]["seeds"] == [0, 1] and ran["store"]["fingerprint"]
    again = tmp_path / "again"
    result = run_cli("distill", "--config", out / "config.json", "--out", again)
    assert result.exit_code == 0, result.output
    assert_same_weights(again / "model.safetensors", out / "model.safetensors")
    assert_same_weights(again / "model_ema.safetensors", out / "model_ema.safetensors")
    recorded = json.loads((again / "config.json").read_text())
    assert {k: v for k, v in recorded.items() if k not in ("out", "ran")} == \
        {k: v for k, v in config.items() if k not in ("out", "ran")}


def test_config_yaml_with_flags_overriding_and_unknown_keys(small_root, reference_store, tmp_path):
    options = {"data": str(small_root), "labels": str(reference_store), "model": "test_resnet", "init": "scratch",
               "epochs": 5, "batch-size": 8, "lr_steps": [1], "device": "cpu", "progress": False}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(options))
    out = tmp_path / "yaml"
    result = run_cli("distill", "--config", tmp_path / "run.yaml", "--out", out, "--epochs", "2")
    assert result.exit_code == 0, result.output
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["lr"] == pytest.approx(0.001)  # 0.01 × 0.1 after 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(options | {"batchsize": 8}))
    bad = run_cli("distill", "--config", tmp_path / "bad.yaml", "--out", tmp_path / "bad")
    assert bad.exit_code == 1 and "unknown key 'batchsize'" in bad.output and "bad.yaml" in bad.output
    assert not (tmp_path / "bad").exists()
    wrong = run_cli("train", "--config", out / "config.json", "--out", tmp_path / "wrong")
    assert wrong.exit_code == 1 and "holds a 'distill' run" in wrong.output


def test_a_1000_class_local_init_trains_on_3_classes(small_root, reference_store, tmp_path):
    torch.manual_seed(1)
    imagenet = timm.create_model("test_resnet", num_classes=1000)
    weights = tmp_path / "imagenet.safetensors"
    save_file(imagenet.state_dict(), str(weights))
    out = tmp_path / "init"
    scratch = distill_args(small_root, reference_store, out, 1, "--pretrained-path", weights)
    conflict = run_cli(*scratch)  # --init scratch (the shared arguments') and timm's --pretrained-path name two things
    assert conflict.exit_code == 2 and f"--init scratch and --pretrained-path {weights}: give one" in conflict.output
    assert not out.exists()
    at = scratch.index("--init")
    result = run_cli(*scratch[:at], *scratch[at + 2:])  # timm's name for --init PATH
    assert result.exit_code == 0, result.output
    assert "its head has 1000 classes, the data 3: the backbone is loaded and the classifier starts new" in result.output
    trained = load_file(str(out / "model.safetensors"))
    assert trained["fc.weight"].shape == (3, imagenet.fc.in_features)
    config = json.loads((out / "config.json").read_text())
    assert config["ran"]["init_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    other = tmp_path / "other.safetensors"
    save_file(timm.create_model("test_efficientnet", num_classes=3).state_dict(), str(other))
    refused = run_cli(*distill_args(small_root, reference_store, tmp_path / "refused", 1, "--init", other))
    assert refused.exit_code == 1 and "does not fit test_resnet" in refused.output


def test_evaluate_takes_the_run_resolution_and_refuses_offline_hub_weights(timm_run, small_root, monkeypatch):
    out, _ = timm_run
    result = run_cli("evaluate", "--data", small_root, "--model", "test_resnet", "--checkpoint",
                     out / "model.safetensors", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["res"] == 32 and scores["top1"] == pytest.approx(metrics(out)[-1]["val_top1"])
    # what HF_HUB_OFFLINE=1 sets when huggingface_hub is imported, which it was before this test (a variable set
    # now would be read by nobody, and the hub's five retries over the network took 23 s of sleeps)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    hub = run_cli("evaluate", "--data", small_root, "--model", "test_resnet", "--pretrained", "--device", "cpu")
    assert hub.exit_code == 1 and "test_resnet" in hub.output and "Traceback" not in hub.output


def test_report_draws_the_curves_of_several_runs(timm_run, small_root, reference_store, tmp_path):
    out, _ = timm_run
    png = tmp_path / "compare.png"
    result = run_cli("report", out, out, "--out", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    missing = run_cli("report", tmp_path, "--out", png)
    assert missing.exit_code == 1 and "metrics.jsonl: not found" in missing.output


def test_tensorboard_scalars(small_root, reference_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = tmp_path / "tb-run", tmp_path / "tb"
    result = run_cli(*distill_args(small_root, reference_store, out, 2, "--log-tb", tb))
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tb))
    events.Reload()
    assert [s.step for s in events.Scalars("val_top1")] == [1, 2]
    assert events.Scalars("loss")[-1].value == pytest.approx(metrics(out)[-1]["loss"])


def test_a_run_from_another_runs_config_writes_its_own_tensorboard_folder(small_root, reference_store, tmp_path):
    """--config RUN/config.json --out NEW: the TensorBoard folder that lay inside RUN follows to NEW (the two runs'
    curves never mix); one outside RUN must be given again."""
    first = tmp_path / "first"
    made = run_cli(*distill_args(small_root, reference_store, first, 1, "--log-tb", first / "tb"))
    assert made.exit_code == 0, made.output
    before = sorted((first / "tb").iterdir())
    second = tmp_path / "second"
    again = run_cli("distill", "--config", first / "config.json", "--out", second)
    assert again.exit_code == 0, again.output
    assert sorted((first / "tb").iterdir()) == before and len(list((second / "tb").iterdir())) == 1
    assert json.loads((second / "config.json").read_text())["log_tb"] == str(second / "tb")
    shared = tmp_path / "shared-tb"
    outside = run_cli(*distill_args(small_root, reference_store, tmp_path / "third", 1, "--log-tb", shared))
    assert outside.exit_code == 0, outside.output
    refused = run_cli("distill", "--config", tmp_path / "third" / "config.json", "--out", tmp_path / "fourth")
    assert refused.exit_code == 2 and f"--log-tb {shared} (from --config) lies outside its run" in refused.output


def test_wandb_missing_is_one_line(small_root, reference_store, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as where wandb is not installed
    result = run_cli(*distill_args(small_root, reference_store, tmp_path / "wandb", 1, "--log-wandb"))
    assert result.exit_code == 1 and "--log-wandb: needs the wandb package" in result.output


def test_flags_a_timm_user_reads_right():
    for command in ("distill", "train"):
        help_text = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output
        assert "global batch, split over ranks" in help_text and "--model" in help_text
        for flag in ("--opt", "--sched", "--model-ema", "--clip-grad", "--pretrained-path", "--cutmix ALPHA",
                     "--mixup-prob P", "--config"):
            assert flag in help_text, (command, flag)


def test_train_takes_the_same_timm_recipe(small_root, tmp_path):
    out = tmp_path / "train"
    result = run_cli("train", "--data", small_root, "--model", "test_resnet", "--init", "scratch", "--out", out,
                     "--epochs", "2", "--batch-size", "8", "--res", "32", "--no-progress", "--device", "cpu",
                     *TIMM_RECIPE, "--cutmix", "0.5")
    assert result.exit_code == 0, result.output
    lines = metrics(out)
    cosine_at_1_of_2 = 0.0001 + 0.5 * (0.003 - 0.0001) * (1 + math.cos(math.pi / 2))  # timm: t over all epochs
    assert [line["lr"] for line in lines] == pytest.approx([0.0005, cosine_at_1_of_2])  # warm-up, then cosine
    assert all(line["val_top1_ema"] is not None for line in lines) and (out / "model_ema.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["cutmix"] == 0.5


def test_a_dead_last_relu_gives_ln2_and_no_gradient_where_the_linear_head_learns():
    """Once the official form's two output logits are below 0 for every input (its last ReLU gives 0), the loss is
    exactly ln 2 and no parameter gets a gradient; the same weights without that ReLU still learn."""
    torch.manual_seed(0)
    official = Discriminator(3)
    with torch.no_grad():
        official.layers[4].bias.fill_(-10.0)  # the state the runs below reach by their own steps
    linear = Discriminator(3, head="linear")
    linear.load_state_dict(official.state_dict())
    student, teacher = torch.log_softmax(torch.randn(16, 3), -1), torch.log_softmax(3 * torch.randn(16, 3), -1)
    loss = discriminator_loss(official, student, teacher)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and all(not p.grad.any() for p in official.parameters())
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1, momentum=0.9)
    for _ in range(100):
        loss = discriminator_loss(linear, student, teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < math.log(2) - 0.01


def test_an_inert_discriminator_is_reported(small_root, reference_store, tmp_path):
    official = run_cli(*distill_args(small_root, reference_store, tmp_path / "relu", 2))
    assert official.exit_code == 0, official.output
    linear = run_cli(*distill_args(small_root, reference_store, tmp_path / "linear", 2, "--disc-head", "linear"))
    assert linear.exit_code == 0, linear.output
    assert "did not learn in this epoch" in official.output and "did not learn" not in linear.output
    assert all(r["disc_loss"] == pytest.approx(math.log(2), abs=1e-4) for r in metrics(tmp_path / "relu"))
    assert any(abs(r["disc_loss"] - math.log(2)) > 1e-4 for r in metrics(tmp_path / "linear"))
