"""Hub weights without a network: one line at once, naming the fix, instead of huggingface_hub's minute of retries."""

import os
import subprocess
import sys

TIMED_COMMAND = """
import sys, time
import mealv2.distill.trainer  # what the command imports, loaded before the clock starts (minutes under load)
from mealv2.cli import main
started = time.perf_counter()
try:
    main(sys.argv[1:])
except SystemExit as exit:
    print(f"exit {exit.code} after {time.perf_counter() - started:.1f} s", file=sys.stderr)
"""


def test_an_unreachable_hub_fails_at_once_in_one_line_naming_hf_hub_offline(small_root, tmp_path):
    """`train` and `distill` start the student from hub weights by default. An unreachable Hub was asked for two
    files, five retries each with back-off (1, 2, 4, 8, 8 s: 46 s of waiting, 47 s measured) before a three-line
    error. The Hub here is a closed local port (HF_ENDPOINT), refused at once on any machine."""
    env = os.environ | {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    run = subprocess.run([sys.executable, "-c", TIMED_COMMAND, "train", "--data", str(small_root), "--out",
                          str(tmp_path / "run"), "--model", "test_resnet", "--epochs", "1", "--device", "cpu",
                          "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    *lines, timing = run.stderr.strip().splitlines()
    assert len(lines) == 1 and timing.startswith("exit 1 after "), run.stderr
    assert "test_resnet: the Hugging Face Hub cannot be reached (http://127.0.0.1:9" in lines[0]
    assert "set HF_HUB_OFFLINE=1" in lines[0] and "--pretrained-path FILE" in lines[0]
    assert float(timing.split()[-2]) < 10, timing
