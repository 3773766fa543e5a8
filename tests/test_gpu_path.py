"""What the GPU path adds, run where the CPU can run it: --compile and the batch that fills a GPU
(the GPU bench runs in tests/test_gpu_check.py)."""

import math

import pytest
import torch

from mealv2.distill.config import TrainConfig
from mealv2.distill.trainer import Trainer
from mealv2.softlabels.teachers import CPU_BATCH, TeacherEnsemble, fitting_batch, parse_teachers

pytestmark = pytest.mark.slow


def test_fitting_batch_takes_the_largest_power_of_two_that_fits(teacher_files):
    def probe_under(limit_images, share_per_image=0.001):
        tried = []

        def peak_share(batch):
            tried.append(batch)
            if batch > limit_images:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return batch * share_per_image
        return peak_share, tried

    peak_share, tried = probe_under(300)
    assert fitting_batch(peak_share) == 256 and tried == [1024, 512, 256]
    peak_share, _ = probe_under(5000, share_per_image=0.002)  # fits, but 512 would take 1.02 of the memory
    assert fitting_batch(peak_share) == 256
    peak_share, _ = probe_under(0)
    assert fitting_batch(peak_share) == 1
    assert TeacherEnsemble(parse_teachers(teacher_files, 32), 3, "cpu").batch_size(224) == CPU_BATCH


def test_compiled_teachers_give_the_eager_teachers_probabilities(teacher_files):
    specs = parse_teachers(teacher_files, 32)[:1]
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    eager, _ = TeacherEnsemble(specs, 3, "cpu")(images)
    compiled, _ = TeacherEnsemble(specs, 3, "cpu", compile=True)(images)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_compile_wraps_the_module_the_training_step_calls(small_root, tmp_path, monkeypatch):
    """torch.compile gets the step's module (DDP's wrapper under torchrun) and the step goes through it."""
    compiled = []

    class Compiled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, x):
            self.calls += 1
            return self.module(x)

    def spy_compile(module):
        compiled.append(Compiled(module))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", spy_compile)
    trainer = Trainer(TrainConfig(mode="train", data=str(small_root), out=str(tmp_path / "run"), model="test_resnet",
                                  init="scratch", epochs=1, batch_size=8, res=32, device="cpu", progress=False,
                                  compile=True))
    assert [c.module for c in compiled] == [trainer.student] and trainer.student_parallel is compiled[0]
    stats = trainer.train_epoch(0)
    assert compiled[0].calls == -(-30 // 8) and math.isfinite(stats["loss"])
