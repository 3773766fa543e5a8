"""Stage two end to end: distill from a store, exact resume, outputs, online parity, crop ranges, evaluate, train."""

import functools
import json
import shutil

import numpy as np
import pytest
import timm
import torch
import conftest
from conftest import cache_args, run_cli

from mealv2.distill.targets import CachedTargets, HardTargets, OnlineTargets
from bench.imagegen import save
from mealv2.pipeline.crops import CropSpec
from mealv2.pipeline.dataset import DatasetIndex
from mealv2.pipeline.loader import ReplayLoader
from mealv2.softlabels.store import LabelStore
from mealv2.softlabels.teachers import TeacherEnsemble, parse_teachers

pytestmark = pytest.mark.slow

# a learning rate that moves the tiny student within four epochs, cut tenfold after the third
distill_args = functools.partial(conftest.distill_args, recipe=("--lr", "0.05", "--lr-steps", "3"))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(small_root, reference_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "full"
    result = run_cli(*distill_args(small_root, reference_store, out, 4))
    assert result.exit_code == 0, result.output
    return out


def test_distill_writes_every_output(full_run, tmp_path):
    (tmp_path / "mine").touch()  # what the user's umask gives a new file
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in full_run.iterdir() if path.is_file()}
    assert set(modes.values()) == {oct((tmp_path / "mine").stat().st_mode & 0o777)}, modes
    rows = metrics(full_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"epoch", "lr", "loss", "kd_loss", "disc_loss", "val_top1", "val_top5",
                            "val_crop_pct", "val_interpolation", "val_crop_mode", "images_per_sec", "seconds"}
    # test_resnet's own timm eval transform, not a hard-coded 0.875 bilinear
    assert (rows[0]["val_crop_pct"], rows[0]["val_interpolation"]) == (0.95, "bilinear")
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.05, 0.05, 0.005])  # --lr-steps 3: epochs 4+
    assert rows[-1]["kd_loss"] < rows[0]["kd_loss"]
    assert all(r["val_top1"] is not None and 0 <= r["val_top1"] <= r["val_top5"] <= 100 for r in rows)
    config = json.loads((full_run / "config.json").read_text())
    assert config["res"] == 32 and config["weight_decay"] == 0.0 and config["mode"] == "distill"
    state = torch.load(full_run / "checkpoint-last.pth", weights_only=True)
    assert state["epoch"] == 4 and state["store"]["seeds"] == [0, 1] and state["discriminator"]
    model = timm.create_model("test_resnet", num_classes=3, checkpoint_path=str(full_run / "model.safetensors"))
    torch.testing.assert_close(model.state_dict()["fc.weight"], state["student"]["fc.weight"])


def test_resume_after_an_epoch_matches_the_uninterrupted_run(full_run, small_root, reference_store, tmp_path):
    out = tmp_path / "resumed"
    first = run_cli(*distill_args(small_root, reference_store, out, 2))
    assert first.exit_code == 0, first.output
    again = run_cli(*distill_args(small_root, reference_store, out, 2))
    assert again.exit_code == 1 and "--resume" in again.output
    second = run_cli(*distill_args(small_root, reference_store, out, 4, "--resume"))
    assert second.exit_code == 0, second.output
    resumed = torch.load(out / "checkpoint-last.pth", weights_only=True)["student"]
    uninterrupted = torch.load(full_run / "checkpoint-last.pth", weights_only=True)["student"]
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=key)
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3, 4]


def test_resume_takes_the_runs_recipe_or_refuses_in_one_line(full_run, small_root, reference_store, tmp_path):
    """A flag that changes what the run trains is refused on --resume, naming it (--lr and --lr-steps used to be
    written into config.json but not applied, --batch-size and --seed taken silently mid-run, --weight-decay and
    --no-discriminator refused in torch's words); --epochs may grow a step-schedule run; a finished run says so."""
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    resume = functools.partial(distill_args, small_root, reference_store, run, 4, "--resume")
    for flag, value, was in [("--lr", "0.5", "0.05"), ("--lr-steps", "1", "3"), ("--batch-size", "4", "8"),
                             ("--seed", "5", "0"), ("--weight-decay", "0.1", "0.0"), ("--kd-weight", "0", "1.0"),
                             ("--sched", "cosine", "step"), ("--d-lr", "5", "None")]:
        refused = run_cli(*resume(flag, value))
        assert refused.exit_code == 1, (flag, refused.output)
        assert f"was trained with {flag} {was}; resume with the run's own {flag}" in refused.output, refused.output
    refused = run_cli(*resume("--no-discriminator"))
    assert refused.exit_code == 1 and "was trained with --discriminator True" in refused.output, refused.output
    done = run_cli(*resume())
    assert done.exit_code == 0 and f"nothing to train: {run} has trained 4 epoch(s) of --epochs 4" in done.output
    longer = run_cli(*distill_args(small_root, reference_store, run, 5, "--resume"))
    assert longer.exit_code == 0 and "epoch 5/5" in longer.output, longer.output
    assert [row["epoch"] for row in metrics(run)] == [1, 2, 3, 4, 5]


def test_evaluate_reproduces_the_final_validation(full_run, small_root):
    result = run_cli("evaluate", "--data", small_root, "--model", "test_resnet", "--checkpoint",
                     full_run / "model.safetensors", "--res", "32", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["images"] == 12
    assert scores["decoder"] == "torch"  # "auto" for one pass on the CPU, small pictures too (DALI's start not repaid)
    assert scores["top1"] == pytest.approx(metrics(full_run)[-1]["val_top1"])


def test_evaluate_an_ensemble_of_one_equals_that_model(full_run, small_root):
    alone = run_cli("evaluate", "--data", small_root, "--model", "test_resnet", "--checkpoint",
                    full_run / "model.safetensors", "--res", "32", "--json", "--device", "cpu")
    ensemble = run_cli("evaluate", "--data", small_root, "--teachers",
                       f"test_resnet={full_run / 'model.safetensors'}", "--res", "32", "--json", "--device", "cpu")
    assert ensemble.exit_code == 0, ensemble.output
    assert json.loads(ensemble.output) == pytest.approx(json.loads(alone.output))
    neither = run_cli("evaluate", "--data", small_root, "--model", "test_resnet", "--device", "cpu")
    assert neither.exit_code == 1 and "--teachers" in neither.output


def test_online_targets_with_k_equal_c_match_the_cache(small_root, teacher_files, tmp_path, device):
    store = tmp_path / "full_k.zarr"
    args = cache_args(small_root, store, teacher_files)
    args[args.index("--topk") + 1] = "3"
    assert run_cli(*args).exit_code == 0
    index = DatasetIndex.scan(small_root / "train")
    cached = CachedTargets(LabelStore.open(str(store)), torch.device(device))
    ensemble = TeacherEnsemble(parse_teachers(teacher_files, 32), 3, device)
    online = OnlineTargets(ensemble, index, seeds=2, crop=CropSpec(), disc_input="logprobs")
    loader = ReplayLoader(index, 32, 8, device, "dali")
    # the store was labelled on the CPU (cache_args), in float32 from libjpeg's pixels; on a GPU the online
    # teachers run in bf16 (8 mantissa bits) on DALI's nvJPEG/hardware-decoded pixels (a few grey levels off)
    tolerance = 1e-3 if device == "cpu" else 2e-2
    for epoch in (0, 1, 2):
        boxes, flips = cached.crops(epoch)
        online_boxes, online_flips = online.crops(epoch)
        np.testing.assert_array_equal(boxes, online_boxes)
        np.testing.assert_array_equal(flips, online_flips)
        for images, indices in loader.epoch(np.arange(len(index)), boxes, flips, progress=False):
            torch.testing.assert_close(cached(images, indices).probs, online(images, indices).probs,
                                       atol=tolerance, rtol=0)


def test_online_mode_trains(small_root, teacher_files, tmp_path, device):
    out = tmp_path / "online"
    result = run_cli("distill", "--online", "--teachers", teacher_files, "--data", small_root, "--student",
                     "test_resnet", "--init", "scratch", "--out", out, "--epochs", "1", "--batch-size", "8",
                     "--res", "32", "--seeds", "2", "--disc-input", "logits", "--no-progress", "--device", device)
    assert result.exit_code == 0, result.output
    assert metrics(out)[0]["disc_loss"] is not None


def test_the_start_line_says_how_often_a_crop_repeats_and_warns_below_the_advice(small_root, reference_store,
                                                                                 tmp_path):
    """docs/slots.md: at least one seed slot per two epochs; fewer is said, with the command that extends the store."""
    few = run_cli(*distill_args(small_root, reference_store, tmp_path / "few", 3, "--seeds", "1"))
    assert few.exit_code == 0, few.output
    assert "; 1 seed slot(s): each crop seen up to 3 times;" in few.output
    assert ("warning: 1 seed slot(s) for 3 epochs shows each crop up to 3 times; docs/slots.md measured" in few.output
            and "(cache-teachers --seeds 2 extends the store)" in few.output)
    enough = run_cli(*distill_args(small_root, reference_store, tmp_path / "enough", 1))
    assert "; 2 seed slot(s): each crop seen up to 1 times;" in enough.output and "seed slot(s) for" not in enough.output


def test_refusals(small_root, reference_store, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(small_root, other)
    (other / "train" / "class_2" / "img_000.jpg").unlink()
    result = run_cli(*distill_args(other, reference_store, tmp_path / "a", 1))
    assert result.exit_code == 1 and "labels are for another dataset" in result.output
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(reference_store, incomplete)
    import zarr
    zarr.open_group(str(incomplete), mode="r+", use_consolidated=False)["done"][1, 2] = False
    result = run_cli(*distill_args(small_root, incomplete, tmp_path / "b", 1))
    assert result.exit_code == 1 and "incomplete" in result.output
    result = run_cli(*distill_args(small_root, reference_store, tmp_path / "c", 1, "--disc-input", "logits"))
    assert result.exit_code == 1 and "needs --online" in result.output
    result = run_cli(*distill_args(small_root, reference_store, tmp_path / "d", 1, "--batch-size", "0"))
    assert result.exit_code == 1 and "--batch-size must be at least 1" in result.output
    for init in ("scratch", "pretrained"):  # the rule the teachers' names meet too (softlabels.models)
        result = run_cli(*distill_args(small_root, reference_store, tmp_path / init, 1, "--student", "resnet5O",
                                       "--init", init))
        assert result.exit_code == 1 and "resnet5O: not a timm model name" in result.output


def test_crops_follow_the_store_and_the_options(mild_store, small_root, tmp_path):
    result = run_cli(*distill_args(small_root, mild_store, tmp_path / "replayed", 1))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "replayed" / "config.json").read_text())["scale"] == [0.5, 1.0]
    result = run_cli(*distill_args(small_root, mild_store, tmp_path / "other", 1, "--scale", "0.08", "1"))
    assert result.exit_code == 1 and "holds crops drawn with scale 0.5 1.0" in result.output
    # hard-label training with the store's ranges and seed count sees the store's very crops
    index = DatasetIndex.scan(small_root / "train")
    cached = CachedTargets(LabelStore.open(str(mild_store)), torch.device("cpu"))
    hard = HardTargets(index, 2, CropSpec(scale=(0.5, 1)), torch.device("cpu"))
    for epoch in (0, 1, 2):
        for stored, drawn in zip(cached.crops(epoch), hard.crops(epoch)):
            np.testing.assert_array_equal(stored, drawn)
    train = ["train", "--data", small_root, "--model", "test_resnet", "--init", "scratch", "--out",
             tmp_path / "train", "--batch-size", "8", "--res", "32", "--device", "cpu", "--no-progress"]
    result = run_cli(*train, "--epochs", "1", "--scale", "0.5", "1")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "train" / "config.json").read_text())["scale"] == [0.5, 1.0]
    result = run_cli(*train, "--epochs", "2", "--resume")  # the default range is not the checkpoint's
    assert result.exit_code == 1 and "--scale 0.08 1.0: " in result.output and "was trained with --scale 0.5 1.0;" in result.output
    assert run_cli(*train, "--epochs", "2", "--resume", "--scale", "0.5", "1").exit_code == 0


def make_red_blue(root, split, per_class, seed):
    """Two classes anyone can tell apart: reddish and bluish noisy squares."""
    rng = np.random.default_rng(seed)
    for label, channel in enumerate((0, 2)):
        for j in range(per_class):
            image = rng.integers(0, 120, (40, 40, 3)).astype(np.uint8)
            image[..., channel] += 130
            save(image, root / split / f"class_{label}" / f"{j:03d}.jpg")


def test_train_learns_a_separable_toy_set(tmp_path):
    root = tmp_path / "toy"
    make_red_blue(root, "train", 24, seed=5)
    make_red_blue(root, "val", 10, seed=6)
    out = tmp_path / "train"
    result = run_cli("train", "--data", root, "--model", "test_resnet", "--init", "scratch", "--out", out,
                     "--epochs", "6", "--lr", "0.05", "--batch-size", "8", "--res", "32", "--device", "cpu",
                     "--no-progress")
    assert result.exit_code == 0, result.output
    rows = metrics(out)
    assert rows[-1]["kd_loss"] is None and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["val_top1"] >= 90.0


def set_option(args: list, name: str, value) -> list:
    args = [str(a) for a in args]
    args[args.index(name) + 1] = str(value)
    return args


def test_a_resumed_run_keeps_its_slots_after_a_teammate_extends_the_store(small_root, reference_store,
                                                                          teacher_files, tmp_path):
    whole, resumed, store = tmp_path / "whole", tmp_path / "resumed", tmp_path / "growing.zarr"
    shutil.copytree(reference_store, store)
    assert run_cli(*distill_args(small_root, reference_store, whole, 3)).exit_code == 0
    assert run_cli(*distill_args(small_root, store, resumed, 1)).exit_code == 0
    grown = run_cli(*set_option(cache_args(small_root, store, teacher_files), "--seeds", 3))
    assert grown.exit_code == 0, grown.output
    assert LabelStore.open(str(store)).seeds == [0, 1, 2]
    result = run_cli(*distill_args(small_root, store, resumed, 3, "--resume"))
    assert result.exit_code == 0, result.output
    assert json.loads((resumed / "config.json").read_text())["seeds"] == 2  # epoch 3 read slot 0, not slot 2
    final, expected = (torch.load(run / "checkpoint-last.pth", weights_only=True)["student"] for run in (resumed, whole))
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=0, atol=0, msg=key)


def test_resume_refuses_another_store(small_root, reference_store, teacher_files, tmp_path):
    out, other = tmp_path / "run", tmp_path / "other.zarr"
    assert run_cli(*distill_args(small_root, reference_store, out, 1)).exit_code == 0
    swapped = ",".join(reversed(teacher_files.split(",")))
    assert run_cli(*cache_args(small_root, other, swapped)).exit_code == 0
    result = run_cli(*distill_args(small_root, other, out, 2, "--resume"))
    assert result.exit_code == 1 and f"--labels {other}: is not the store" in result.output
    assert "teachers" in result.output


def test_distill_reads_the_complete_slots_of_a_store_being_extended(small_root, teacher_files, tmp_path):
    store = tmp_path / "extending.zarr"
    assert run_cli(*set_option(cache_args(small_root, store, teacher_files), "--seeds", 1)).exit_code == 0
    half = run_cli(*cache_args(small_root, store, teacher_files, "--shard", "0/2"))  # slot 1: half its units
    assert half.exit_code == 0 and "incomplete" in half.output
    result = run_cli(*distill_args(small_root, store, tmp_path / "run", 1))
    assert result.exit_code == 0, result.output
    assert "reading seed slots 0-0 of the store's 2" in result.output
    refused = run_cli(*distill_args(small_root, store, tmp_path / "two", 1, "--seeds", "2"))
    assert refused.exit_code == 1 and "is incomplete from slot 1 on" in refused.output
