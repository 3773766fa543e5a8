"""Every command block of README.md, docs/sharing.md and docs/recipes.md runs, as written but at the tests' scale.

A command keeps its flags; only what cannot run offline on 2 CPU cores in seconds is scaled down: the data is
the tests' tiny ImageFolder, models are timm's test models with local weights, resolution 32 px, one epoch, a
small batch, paths under a temporary folder, `torchrun` one process. Commands that cannot run here at all (an
elided `...`, an S3 bucket, hub weights) are listed in NOT_RUN with the reason, so a new command in the docs is
either run or named there.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/sharing.md", "docs/recipes.md")
DATA = {"ROOT", "/data/imagenet"}
NOT_RUN = {  # command (as written, continuation lines joined) → why it cannot run here
    "mealv2 cache-teachers ... --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT": "elided (test_cache: shards)",
    "mealv2 labels finalize s3://team-labels/...": "an S3 bucket, elided (test_scale: S3 on loopback)",
    "mealv2 cache-teachers ... --seeds 32": "elided (test_cache: more seeds extend a store)",
    "mealv2 labels info s3://team-labels/... --storage-option endpoint_url=https://minio.internal:9000":
        "an S3 bucket (test_scale: S3 on loopback)",
    "mealv2 distill ... --labels zip::/shared/labels/in1k-224.zip": "elided (test_scale: zip packs serve distill)",
    "mealv2 distill --online --teachers senet154.gluon_in1k,resnet152s.gluon_in1k --disc-input logits ...": "elided",
    "mealv2 distill --no-discriminator ...": "elided",
    "mealv2 cache-teachers --scale 0.25 1 ... && mealv2 distill --labels STORE ...": "elided",
    "mealv2 train --scale 0.25 1 --seeds 16 ...": "elided",
}
S3_COMMANDS = ("torchrun --nproc-per-node 8 -m mealv2 cache-teachers --data /data/imagenet --res 224 --seeds 16 "
               "--store s3://team-labels/imagenet-1k/senet154+resnet152s/224px-top5.zarr",
               "mealv2 distill --data /data/imagenet --student resnet50.tv_in1k --out runs/r50 "
               "--labels s3://team-labels/imagenet-1k/senet154+resnet152s/224px-top5.zarr")
NOT_RUN |= dict.fromkeys(S3_COMMANDS, "an S3 bucket (test_scale: S3 on loopback)")


def doc_commands(doc: str) -> list[tuple[str, dict[str, str]]]:
    """(command, files its block writes with heredocs) for each shell line of the doc's ```bash blocks, in order;
    continuation lines joined, comments dropped, the block's VAR=value lines expanded."""
    commands, variables, files = [], {}, {}  # a variable or file of one block serves the doc's later blocks
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), re.S):
        block = block.replace("\\\n", " ")
        lines = iter(block.splitlines())
        for line in lines:
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if not line:
                continue
            heredoc = re.fullmatch(r"cat > (\S+) <<'(\w+)'", line)
            if heredoc:
                files[heredoc[1]] = "".join(f"{text}\n" for text in iter(lines.__next__, heredoc[2]))
                continue
            assignment = re.fullmatch(r"(\w+)=(\S+)", line)
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            commands.append((re.sub(r"\s+", " ", line), dict(files)))
    return commands


class Scaled:
    """Turns a documented command line into the same command at the tests' scale, under ``work``."""

    def __init__(self, work: Path, data: Path, teachers: str, reference_store: Path, weights: Path):
        self.work, self.data, self.teachers, self.reference, self.weights = work, data, teachers, reference_store, weights

    def path(self, value: str) -> str:
        """A file or folder the command names, moved under the work folder (zip:: kept)."""
        prefix, _, path = value.rpartition("::")
        return f"{prefix}::" * bool(prefix) + str(self.work / path.lstrip("/"))

    def argv(self, words: list[str]) -> list[str]:
        if words[0] == "torchrun":  # one process: the ranks' path is test_scale's
            words = words[words.index("-m") + 1:]
        assert words[0] == "mealv2", words
        command, args, out = words[1], [], []
        options = iter(words[2:])
        for word in options:
            value = None
            if word.startswith("--") and word not in ("--model-ema", "--resume", "--online", "--no-discriminator",
                                                      "--pretrained", "--json"):
                value = next(options)
                if word in ("--res",):
                    value = "32"
                elif word in ("--teachers",):
                    value = self.teachers
                elif word in ("--student", "--model"):
                    value = "test_resnet"
                elif word == "--pretrained-path" or (word == "--init" and value not in ("scratch", "pretrained")):
                    value = str(self.weights)
                elif word == "--init":  # hub weights cannot be fetched here
                    value = "scratch"
                elif word in ("--seeds",):
                    value = "2"
                elif word in ("--topk",):
                    value = "2"
                elif word in ("--data",) and value in DATA:
                    value = str(self.data)
                elif word in ("--store", "--labels", "--out", "--log-tb", "--checkpoint") or value.endswith(
                        (".zarr", ".zip", ".png", ".yaml")):
                    value = self.path(value)
                args += [word, value]
            elif word.endswith((".zarr", ".zip")) or word.startswith("runs/"):
                args.append(self.path(word))
            else:
                args.append(word)
        if command == "cache-teachers":
            out = ["--chunk-rows", "8", "--batch-size", "4", "--device", "cpu"]
            out += [] if "--teachers" in args else ["--teachers", self.teachers]
            out += [] if "--topk" in args else ["--topk", "2"]  # the tests' data has 3 classes
        elif command in ("distill", "train"):
            warmup = "--warmup-epochs" in args or "--config" in args  # the recipes' warm-up takes 5 epochs
            out = ["--epochs", "6" if warmup else "1", "--batch-size", "8", "--device", "cpu", "--no-progress"]
            if "--init" not in args and "--pretrained-path" not in args:
                out += ["--init", "scratch"]
        elif command in ("evaluate",) or (command == "labels" and "--recompute" in args):
            out = ["--device", "cpu"] + (["--teachers", self.teachers] if command == "labels" else [])
        return [command, *args, *out]

    def inputs(self, argv: list[str]) -> None:
        """Stores a command reads that no earlier command of its doc made: copies of the tests' reference store."""
        for value in argv:
            path = Path(value.rpartition("::")[2])
            written = argv[argv.index(value) - 1] in ("--store", "--out")  # what cache-teachers or merge makes
            if value.endswith(".zarr") and self.work in path.parents and not path.exists() and not written:
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(self.reference, path)


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_runs(doc, small_root, teacher_files, reference_store, tmp_path):
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "imagenet.safetensors"  # a local backbone for --pretrained-path
    save_file(timm.create_model("test_resnet", num_classes=3).state_dict(), str(weights))
    scaled = Scaled(tmp_path / "work", small_root, teacher_files, reference_store, weights)
    ran, skipped = [], []
    for command, files in doc_commands(doc):
        if command in NOT_RUN:
            skipped.append(command)
            continue
        words = shlex.split(command)
        if words[0] not in ("mealv2", "torchrun"):
            assert words[0] == "make", command  # make demo and make test: what CI runs
            continue
        for name, text in files.items():
            (tmp_path / "work").mkdir(exist_ok=True)
            (tmp_path / "work" / name).write_text(text)
        argv = scaled.argv(words)
        scaled.inputs(argv)
        result = run_cli(*argv)
        assert result.exit_code == 0, f"{doc}: {command}\n  ran as: mealv2 {' '.join(argv)}\n{result.output}"
        ran.append(command)
    assert ran and set(skipped) <= set(NOT_RUN)


def test_every_command_not_run_is_still_in_the_docs():
    """NOT_RUN names commands of the docs as they stand: an entry left behind by an edit is found."""
    documented = {command for doc in DOCS for command, _ in doc_commands(doc)}
    assert set(NOT_RUN) <= documented, set(NOT_RUN) - documented
