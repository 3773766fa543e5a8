"""The pretrained teachers shipped for `mealv2 demo`: pinned, loadable, small, and made by the demo's own recipe."""

import pytest

from mealv2.demo import FULL, Demo
from mealv2.pretrained import SHIPPED, PinnedTeacher, export_float16, read_manifest, verified_spec, write_manifest
from mealv2.pipeline.models import create_model

RUN_ONLY = {"--data", "--out", "--workers", "--val-every", "--no-progress"}  # where and how visibly, not what


def training_options(argv) -> dict:
    """`mealv2 train` arguments as {flag: values} without the options that do not change what is trained."""
    options, flag = {}, None
    for arg in map(str, argv[1:]):
        if arg.startswith("--"):
            flag = arg
            options[flag] = []
        else:
            options[flag].append(arg)
    return {flag: values for flag, values in options.items() if flag not in RUN_ONLY}


def test_shipped_teachers_are_the_plans_pinned_and_under_25_mb():
    teachers, spec = verified_spec(SHIPPED)
    assert [t.model for t in teachers] == list(FULL.teachers)
    assert sum((SHIPPED / t.file).stat().st_size for t in teachers) <= 25 * 2**20
    assert spec == ",".join(f"{t.model}={SHIPPED / t.file}" for t in teachers)


@pytest.mark.parametrize("teacher", read_manifest(SHIPPED), ids=lambda t: t.model)
def test_shipped_teacher_loads_and_was_trained_as_the_demo_trains_it(teacher):
    create_model(teacher.model, 10, checkpoint=str(SHIPPED / teacher.file))  # strict: every tensor fits
    recipe = Demo("mealv2-demo", 0, FULL, run_command=None, train_teachers=True).teacher_args(teacher.model)
    assert training_options(teacher.command) == training_options(recipe)


def test_manifest_round_trip_and_bad_manifest_is_one_line(tmp_path):
    model = create_model("test_resnet", 10)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "fp32.safetensors"))
    sha256 = export_float16(tmp_path / "fp32.safetensors", tmp_path / "t.safetensors")
    pinned = [PinnedTeacher("test_resnet", "t.safetensors", sha256, 12.5, ("train", "--model", "test_resnet"))]
    write_manifest(tmp_path, pinned)
    assert read_manifest(tmp_path) == pinned
    assert (tmp_path / "t.safetensors").stat().st_size < 0.6 * (tmp_path / "fp32.safetensors").stat().st_size
    (tmp_path / "teachers.json").write_text('{"teachers": [{"model": "x"}]}')
    with pytest.raises(ValueError, match="teachers.json: expected"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="no teachers manifest"):
        read_manifest(tmp_path / "elsewhere")
