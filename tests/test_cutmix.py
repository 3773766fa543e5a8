"""Consistent CutMix: timm's boxes, a fixed pairing, whole pairs in every batch, stage one's composites
replayed by stage two with one decode per image, verified against PIL composites."""

import hashlib
import shutil

import numpy as np
import pytest
import torch
import zarr
from conftest import cache_args, run_cli, store_files

from mealv2.pipeline import mix as mixing
from mealv2.pipeline.crops import CropSpec
from mealv2.pipeline.dataset import DatasetIndex
from mealv2.pipeline.loader import epoch_order
from mealv2.pipeline.mix import MIX_ALGORITHM, MixSpec, SlotMix, beta_quantile, cutmix_boxes
from mealv2.pipeline.pil_replay import PilDecoder
from mealv2.softlabels.store import LabelStore


def test_boxes_are_timms_rand_bbox(monkeypatch):
    import timm.data.mixup as timm_mixup

    rng = np.random.default_rng(0)
    for res in (7, 32, 224):
        lam, centre_y, centre_x = rng.random(200), rng.random(200), rng.random(200)
        ours = cutmix_boxes(lam, centre_y, centre_x, res)
        for j in range(200):
            centres = iter([int(centre_y[j] * res), int(centre_x[j] * res)])
            monkeypatch.setattr(timm_mixup.np.random, "randint", lambda low, high, size=None: next(centres))
            yl, yh, xl, xh = timm_mixup.rand_bbox((3, res, res), lam[j])
            assert ours[j].tolist() == [yl, xl, yh - yl, xh - xl]


def test_lambda_follows_beta_alpha_alpha_as_timms_cutmix_alpha():
    u = np.linspace(0, 1, 100_001, endpoint=False)
    assert np.array_equal(beta_quantile(u, 1.0), u)  # α = 1: the uniform itself, as before α existed
    arcsine = np.sin(np.pi * u / 2) ** 2  # Beta(1/2, 1/2)'s inverse CDF in closed form
    assert np.abs(beta_quantile(u, 0.5) - arcsine).max() < 1e-8
    x = beta_quantile(u, 2.0)  # Beta(2, 2): F(x) = 3x² - 2x³
    assert np.abs(3 * x ** 2 - 2 * x ** 3 - u).max() < 1e-7
    assert np.all(np.diff(beta_quantile(u, 8.0)) >= 0)
    spread = [MixSpec(alpha).draw(5, 20_001, 64) for alpha in (0.2, 1.0, 8.0)]
    shares = [(slot.boxes[:, 2] * slot.boxes[:, 3]).std() for slot in spread]
    assert shares[0] > shares[1] > shares[2]  # small α: all or nothing; large α: about half pasted


def test_alpha_one_replays_stores_made_before_alpha_existed():
    before = {"prob": 0.5, "algorithm": MIX_ALGORITHM}  # the mix attribute of a store made with `--cutmix 0.5`
    assert MixSpec.from_attrs(before) == MixSpec(1, 0.5) and MixSpec(1, 0.5).attrs() == before
    drawn = MixSpec(1, 0.5).draw(7, 30, 32)  # digest of the same draw by the code before alpha (commit 53cef81)
    assert hashlib.sha256(drawn.partner.tobytes() + drawn.boxes.tobytes()).hexdigest()[:16] == "610f4b8b2ed2f69f"
    assert MixSpec(2, 0.5).attrs() == before | {"alpha": 2.0}
    assert MixSpec.from_attrs(MixSpec(2, 0.5).attrs()) == MixSpec(2, 0.5)


def test_pairing_is_a_fixed_symmetric_matching():
    n, res = 10_001, 32
    drawn = MixSpec(1, 0.5).draw(7, n, res)
    again = MixSpec(1, 0.5).draw(7, n, res)
    assert np.array_equal(drawn.partner, again.partner) and np.array_equal(drawn.boxes, again.boxes)
    mixed = np.flatnonzero(drawn.partner >= 0)
    assert np.array_equal(drawn.partner[drawn.partner[mixed]], mixed)  # partners of partners are themselves
    assert (drawn.partner[mixed] != mixed).all()
    pairs = len(mixed) // 2
    assert abs(pairs - n // 2 * 0.5) < 5 * np.sqrt(n // 2 * 0.25)  # binomial(5000, 0.5) within 5 sd
    assert (drawn.boxes[drawn.partner < 0] == 0).all()
    top, left, height, width = drawn.boxes[mixed].T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= res).all() and (left + width <= res).all()
    share = (height * width / res ** 2).mean()
    assert 0.25 < share < 0.45  # E[1 - λ] = 0.5 before clipping at the borders
    assert not np.array_equal(MixSpec(1, 0.5).draw(8, n, res).partner, drawn.partner)
    assert (MixSpec(0).draw(7, n, res).partner == -1).all()
    assert (MixSpec(1.0).draw(7, n, res).partner >= 0).sum() == n - 1  # an odd count leaves one unmixed


def test_composite_takes_the_box_from_the_partner():
    slot = MixSpec(1.0).draw(3, 6, 16)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    indices = torch.tensor([4, 0, 5, 2, 1, 3])
    batch = slot.batch(indices)
    composed = batch.images(images)
    for j, i in enumerate(indices.tolist()):
        partner_at = indices.tolist().index(int(slot.partner[i]))
        assert batch.partner_at[j] == partner_at
        expected = images[j].clone()
        top, left, height, width = slot.boxes[i]
        expected[:, top:top + height, left:left + width] = images[partner_at, :, top:top + height, left:left + width]
        assert torch.equal(composed[j], expected)
    lone = slot.batch(indices[:1])  # a partner outside the batch: left unmixed
    assert lone.partner_at.tolist() == [-1] and torch.equal(lone.images(images[:1]), images[:1])


def test_blend_weights_each_target_by_the_pasted_area():
    slot = MixSpec(1.0).draw(1, 4, 10)
    batch = slot.batch(torch.arange(4))
    targets = torch.eye(4)
    blended = batch.blend(targets)
    share = torch.from_numpy(slot.boxes[:, 2] * slot.boxes[:, 3] / 100.0).float()
    for i in range(4):
        expected = (1 - share[i]) * targets[i] + share[i] * targets[int(slot.partner[i])]
        assert torch.allclose(blended[i], expected)
    assert torch.allclose(blended.sum(1), torch.ones(4))


@pytest.mark.parametrize("n,world_size", [(31, 1), (30, 1), (31, 2), (29, 3)])
def test_epoch_orders_hold_whole_pairs(n, world_size):
    slot = MixSpec(1, 0.6).draw(2, n, 32)
    trainable = np.setdiff1d(np.arange(n), [5])  # an unlabelled image: its partner goes unmixed
    orders = [epoch_order(trainable, 0, 3, rank=r, world_size=world_size, mix=slot) for r in range(world_size)]
    assert len({len(o) for o in orders}) == 1
    seen = np.concatenate(orders)
    assert set(seen) == set(trainable)
    if world_size == 1:
        assert len(seen) == len(trainable)  # each once
    for order in orders:
        for i in order:
            if slot.partner[i] >= 0 and slot.partner[i] != 5:
                at = int(np.flatnonzero(order == i)[0])
                assert order[at ^ 1] == slot.partner[i]  # the pair sits at (2m, 2m + 1): even batches hold it
    assert not np.array_equal(orders[0], epoch_order(trainable, 0, 4, world_size=world_size, mix=slot))


def test_cutmix_store_schema_and_identity(cutmix_store, reference_store, small_root, teacher_files, tmp_path):
    group = zarr.open_group(str(cutmix_store), mode="r")
    assert group["mix_partner"].shape == (2, 30) and group["mix_partner"].dtype == np.int32
    assert group["mix_boxes"].shape == (2, 30, 4) and group["mix_boxes"].chunks == group["boxes"].chunks
    store = LabelStore.open(str(cutmix_store))
    assert store.mix == MixSpec(1, 0.5)
    for slot in range(2):
        labels = store.read_slot(slot)
        drawn = MixSpec(1, 0.5).draw(store.seeds[slot], 30, 32)
        assert np.array_equal(labels.mix_partner, drawn.partner)  # every image decoded: every drawn pair mixed
        assert np.array_equal(labels.mix_boxes, drawn.boxes)
        assert (labels.mix_partner >= 0).any()
    assert LabelStore.open(str(reference_store)).read_slot(0).mix_partner is None

    for source, flags in [(cutmix_store, ("--cutmix", "1", "--mixup-prob", "0.25")),
                          (cutmix_store, ("--cutmix", "2", "--mixup-prob", "0.5")),
                          (reference_store, ("--cutmix", "1", "--mixup-prob", "0.5")), (cutmix_store, ("--cutmix", "0"))]:
        copy = tmp_path / f"copy-{source.name}-{'-'.join(flags)}"
        shutil.copytree(source, copy)
        result = run_cli(*cache_args(small_root, copy, teacher_files, *flags))
        assert result.exit_code == 1 and "mix" in result.output, result.output
        assert store_files(copy) == store_files(source)


def test_cutmix_store_is_the_same_bytes_when_made_in_shards(cutmix_store, small_root, teacher_files, tmp_path):
    store = tmp_path / "sharded.zarr"
    for shard in ("1/2", "0/2"):
        result = run_cli(*cache_args(small_root, store, teacher_files, "--cutmix", "1", "--mixup-prob", "0.5",
                                    "--shard", shard))
        assert result.exit_code == 0, result.output
    assert store_files(store) == store_files(cutmix_store)


def test_verify_recomputes_mixed_rows_on_pil_composites(cutmix_store, small_root, teacher_files, tmp_path):
    result = run_cli("labels", "verify", cutmix_store, "--data", small_root, "--recompute", 60,
                     "--teachers", teacher_files, "--max-dp", "0.02", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "recomputed 60 crops" in result.output
    # labels of the unmixed crops under the mixed rows: the composite is what they were computed on
    damaged = tmp_path / "unmixed-partners.zarr"
    shutil.copytree(cutmix_store, damaged)
    group = zarr.open_group(str(damaged), mode="r+")
    partner = group["mix_partner"][...]
    group["mix_partner"][...] = np.where(partner >= 0, np.roll(partner, 1, axis=1), -1)
    result = run_cli("labels", "verify", damaged, "--data", small_root, "--recompute", 60,
                     "--teachers", teacher_files, "--max-dp", "1e-3", "--device", "cpu")
    assert result.exit_code == 1 and "recomputed labels differ" in result.output, result.output


def _record_composites(monkeypatch) -> dict:
    """Spy on mealv2.pipeline.mix: every mixed image's composites, by dataset position."""
    seen: dict[int, torch.Tensor] = {}
    batch, images = SlotMix.batch, mixing.BatchMix.images

    def spy_batch(self, indices):
        made = batch(self, indices)
        made.spied_indices = indices.tolist()
        return made

    def spy_images(self, decoded):
        composed = images(self, decoded)
        for i, image, mixed in zip(self.spied_indices, composed, self.mixed.tolist()):
            if mixed:
                seen.setdefault(i, []).append(image.cpu().clone())
        return composed

    monkeypatch.setattr(SlotMix, "batch", spy_batch)
    monkeypatch.setattr(mixing.BatchMix, "images", spy_images)
    return seen


def test_stage_two_replays_stage_ones_composites_decoding_each_image_once(small_root, teacher_files, tmp_path,
                                                                          monkeypatch):
    stage_one = _record_composites(monkeypatch)
    store = tmp_path / "labels.zarr"
    result = run_cli(*cache_args(small_root, store, teacher_files, "--cutmix", "1", "--mixup-prob", "0.5",
                                 "--seeds", "1", "--decoder", "pil"))
    assert result.exit_code == 0, result.output
    first = {i: images[0] for i, images in stage_one.items()}
    stage_one.clear()

    decoded = []
    replay = PilDecoder.replay
    monkeypatch.setattr(PilDecoder, "replay", staticmethod(lambda *args: decoded.append(args[1]) or replay(*args)))
    result = run_cli("distill", "--data", small_root, "--labels", store, "--student", "test_convnext",
                     "--init", "scratch", "--out", tmp_path / "run", "--epochs", 2, "--batch-size", 6,
                     "--decoder", "pil", "--device", "cpu", "--no-progress", "--val-every", 5)
    assert result.exit_code == 0, result.output
    labels = LabelStore.open(str(store)).read_slot(0)
    mixed = set(np.flatnonzero(labels.mix_partner >= 0).tolist())
    assert mixed and set(stage_one) == mixed
    for i in mixed:
        assert len(stage_one[i]) == 2  # both epochs replay slot 0
        for image in stage_one[i]:
            assert torch.equal(image, first[i])
    val = len(DatasetIndex.scan(str(small_root / "val")))
    assert len(decoded) == 2 * 30 + val  # each training image once an epoch, and the validation at the end


def test_targets_blend_by_area_without_a_teacher_on_the_composite(reference_store, small_root):
    from mealv2.distill.targets import CachedTargets, HardTargets

    index = DatasetIndex.scan(str(small_root / "train"))
    store = LabelStore.open(str(reference_store))
    cached = CachedTargets(store, torch.device("cpu"), res=32, cutmix=MixSpec(1.0))
    plain = CachedTargets(store, torch.device("cpu"), res=32)
    hard = HardTargets(index, 2, CropSpec(), torch.device("cpu"), MixSpec(1.0), res=32)
    for source in (cached, plain, hard):
        source.crops(1)
    assert plain.mix is None
    assert np.array_equal(cached.mix.partner, MixSpec(1.0).draw(store.seeds[1], 30, 32).partner)
    assert np.array_equal(hard.mix.partner, cached.mix.partner)
    indices = torch.arange(30)
    batch = cached.mix.batch(indices)
    images = torch.zeros(30, 3, 32, 32, dtype=torch.uint8)
    assert torch.allclose(cached(images, indices, batch).probs, batch.blend(plain(images, indices).probs))
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(index.labels.astype(np.int64)), 3).float()
    assert torch.allclose(hard(images, indices, batch).labels, batch.blend(one_hot))


def test_cutmix_training_options(cutmix_store, small_root, tmp_path):
    common = ["--data", small_root, "--init", "scratch", "--epochs", 1, "--device", "cpu", "--no-progress"]
    result = run_cli("distill", "--labels", cutmix_store, "--student", "test_convnext", "--out", tmp_path / "a",
                     "--batch-size", 5, *common)
    assert result.exit_code == 1 and "expected an even number of images per rank" in result.output
    result = run_cli("distill", "--labels", cutmix_store, "--student", "test_convnext", "--out", tmp_path / "b",
                     "--batch-size", 6, "--cutmix", "1", *common)
    assert result.exit_code == 1 and "replays the mixes it was made with" in result.output
    result = run_cli("train", "--model", "test_convnext", "--out", tmp_path / "c", "--batch-size", 6,
                     "--cutmix", "0.5", "--mixup-prob", "0.5", "--res", 32, *common)
    assert result.exit_code == 0, result.output
    resumed = ["train", "--model", "test_convnext", "--out", tmp_path / "c", "--batch-size", 6, "--res", 32,
               "--resume", *common]
    result = run_cli(*resumed, "--cutmix", "1", "--mixup-prob", "0.5")
    assert result.exit_code == 1, result.output
    assert "--cutmix 1.0: " in result.output and "was trained with --cutmix 0.5;" in result.output
    result = run_cli(*resumed, "--cutmix", "0.5")
    assert result.exit_code == 1, result.output
    assert "--mixup-prob 1.0: " in result.output and "was trained with --mixup-prob 0.5;" in result.output
    for flag, value in [("--mixup-prob", "1.5"), ("--cutmix", "-1")]:
        result = run_cli("cache-teachers", "--data", small_root, "--store", tmp_path / "s.zarr", flag, value,
                         "--device", "cpu")
        assert result.exit_code == 2 and flag in result.output, result.output
