"""The bench's verdicts: each figure against its target. The bench itself runs with `make bench` (speed belongs to
its own verdicts, measured on a quiet machine, not to timed tests), so only the judging is tested here."""

import pytest

from bench.__main__ import TARGETS, _target_values, _verdicts
from bench.gpu import GPU_TARGETS, gpu_verdicts
from bench.scale import SCALE_TARGETS, projected, scale_verdicts, slopes

ONLINE_IDEAL, ONLINE_IDEAL_CPU = 3.0, 2.5


def at_targets(**changes: float) -> dict:
    """A bench's figures, each exactly at its target (so every one is met), then ``changes``."""
    results = {key: target for key, (target, _) in TARGETS.items()}
    results |= {"stage2_online_ideal": ONLINE_IDEAL, "stage2_online_ideal_cpu": ONLINE_IDEAL_CPU,
                "stage2_cached_vs_online": 0.9 * ONLINE_IDEAL,
                "label_slot_load_ms_per_million_100k": 80.0, "label_slot_load_ms_per_million_1000k": 96.0}
    return results | changes


def test_a_figure_at_its_target_meets_it():
    verdicts = _verdicts(at_targets())
    assert set(verdicts) == set(TARGETS) | {"stage2_cached_vs_online", "stage2_cached_vs_online_cpu",
                                            "label_slot_load_linear"}
    assert all(verdicts.values()), verdicts


@pytest.mark.parametrize("key", sorted(TARGETS))
def test_each_figure_misses_on_its_own_wrong_side_only(key):
    """A ratio must reach its target, a size must stay under it: the wrong side misses that target and no other."""
    target, op = TARGETS[key]
    worse, better = (target * 1.01, target * 0.99) if op == "<=" else (target * 0.99, target * 1.01)
    missed = _verdicts(at_targets(**{key: worse}))
    assert [name for name, met in missed.items() if not met] == [key]
    assert all(_verdicts(at_targets(**{key: better})).values())


def test_the_online_target_is_nine_tenths_of_the_ideal_on_each_side():
    """stage2_cached_vs_online is judged against 0.9 × the ideal speed-up, and separately against the CPU's ideal
    (which counts the decoding both modes pay)."""
    assert _target_values(at_targets())["stage2_cached_vs_online"] == pytest.approx(0.9 * ONLINE_IDEAL)
    between = _verdicts(at_targets(stage2_cached_vs_online=0.9 * ONLINE_IDEAL - 0.01))
    assert not between["stage2_cached_vs_online"] and between["stage2_cached_vs_online_cpu"]
    below = _verdicts(at_targets(stage2_cached_vs_online=0.9 * ONLINE_IDEAL_CPU - 0.01))
    assert not below["stage2_cached_vs_online"] and not below["stage2_cached_vs_online_cpu"]


@pytest.mark.parametrize("large, linear", [(80.0, True), (96.0, True), (96.1, False), (40.0, True)])
def test_slot_loads_are_linear_while_the_cost_per_million_grows_at_most_a_fifth(large, linear):
    results = at_targets(label_slot_load_ms_per_million_1000k=large)
    assert _verdicts(results)["label_slot_load_linear"] is linear


def test_verdicts_compare_each_figure_with_its_target():
    results = {"stage2_cached_vs_plain": 0.96, "stage1_efficiency": 0.89, "store_bytes_per_crop": 28.5,
               "store_bytes_per_crop_cutmix": 27.5,
               "loader_dali_vs_torch": 1.3, "loader_auto_vs_torch_375x500_to_224": 0.99,
               "stage2_cached_vs_online": 2.5, "stage2_online_ideal": 2.9, "stage2_online_ideal_cpu": 2.7,
               "label_slot_load_ms_per_million_100k": 80.0, "label_slot_load_ms_per_million_1000k": 97.0}
    verdicts = _verdicts(results)
    assert verdicts == {"stage2_cached_vs_plain": True, "stage1_efficiency": False, "store_bytes_per_crop": False,
                        "store_bytes_per_crop_cutmix": True,
                        "loader_dali_vs_torch": True, "loader_auto_vs_torch_375x500_to_224": False,
                        "stage2_cached_vs_online": False, "stage2_cached_vs_online_cpu": True,
                        "label_slot_load_linear": False}
    assert _target_values(results)["stage2_cached_vs_online"] == pytest.approx(0.9 * 2.9)


def test_gpu_verdicts_judge_the_figures_measured_so_far():
    """A GPU check cut short records what it measured: only those figures are judged, each met from its target up."""
    assert gpu_verdicts({}) == {}
    loader, stage1 = GPU_TARGETS["gpu_loader_vs_torchvision"], GPU_TARGETS["gpu_stage1_vs_forward"]
    results = {"gpu_loader_vs_torchvision": loader, "gpu_stage1_vs_forward": stage1 - 0.01, "gpu_decode_ms": 1.0}
    assert gpu_verdicts(results) == {"gpu_loader_vs_torchvision": True, "gpu_stage1_vs_forward": False}
    assert gpu_verdicts(dict(GPU_TARGETS)) == dict.fromkeys(GPU_TARGETS, True)


def scale_figures(**changes: float) -> dict:
    """`--scale` figures of one size, each target met, then ``changes``."""
    return {key: target for key, (target, _) in SCALE_TARGETS.items()} | {"verify_s": 10.0} | changes


def test_scale_slopes_are_bytes_per_image_and_seconds_per_million_and_project_linearly():
    small = {"index_bytes_per_image": 70.0, "distill_peak_mb": 900.0, "verify_s": 2.0}
    large = {"index_bytes_per_image": 66.0, "distill_peak_mb": 990.0, "verify_s": 11.0}
    slope = slopes(small, large, 100_000, 1_000_000)
    assert slope == pytest.approx({"distill_peak_mb": 90 * 2**20 / 900_000, "verify_s": 9 / 0.9})
    at = projected(large, slope, 1_000_000, 2_000_000)
    assert at == pytest.approx({"distill_peak_mb": 1090.0, "verify_s": 21.0})


def test_scale_verdicts_judge_both_sizes_and_the_first_step_at_the_larger_only():
    assert all(scale_verdicts(scale_figures(), scale_figures(verify_s=100.0), 1000, 10_000).values())
    for key, (target, _) in SCALE_TARGETS.items():
        over = scale_verdicts(scale_figures(**{key: target * 1.01}), scale_figures(verify_s=100.0), 1000, 10_000)
        assert [name for name, met in over.items() if not met] == ([] if key == "distill_first_step_s" else [key])
        over = scale_verdicts(scale_figures(), scale_figures(verify_s=100.0, **{key: target * 1.01}), 1000, 10_000)
        assert [name for name, met in over.items() if not met] == [key]


@pytest.mark.parametrize("large_verify_s, linear", [(100.0, True), (120.0, True), (121.0, False), (50.0, True)])
def test_verify_is_linear_while_its_time_per_image_grows_at_most_a_fifth(large_verify_s, linear):
    verdicts = scale_verdicts(scale_figures(verify_s=10.0), scale_figures(verify_s=large_verify_s), 1000, 10_000)
    assert verdicts["verify_linear"] is linear
