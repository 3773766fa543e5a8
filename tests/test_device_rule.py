"""Every test that runs a model says on which device (issue 29): the CPU where it checks exactness (stores equal
byte for byte, weights equal after a resume, exact figures, tight tolerances), or the `device` fixture, whose
[cuda] cases state tolerances that hold on a GPU. Left to "auto" it would take the GPU of a GPU machine, where
bf16 teachers, cuDNN's autotuned kernels and nvJPEG or the hardware JPEG decoder change the last bits."""

import ast
import inspect
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent
COMMANDS = {"cache-teachers", "distill", "train", "evaluate"}  # each places models on a device; `labels verify`
# only with --recompute (without it, it reads the store and runs nothing)


def _device_position(name: str) -> int:
    """Where ``device`` stands among the positional parameters of the library call ``name`` (default "auto")."""
    from mealv2.distill.config import TrainConfig
    from mealv2.distill.evaluate import evaluate_saved
    from mealv2.pipeline.distributed import setup
    from mealv2.softlabels.cache_config import CacheJob
    from mealv2.softlabels.verify import recompute, verify

    calls = {"TrainConfig": TrainConfig, "CacheJob": CacheJob, "verify": verify, "recompute": recompute,
             "evaluate_saved": evaluate_saved, "setup": setup}
    parameters = inspect.signature(calls[name]).parameters
    assert parameters["device"].default == "auto", name
    return list(parameters).index("device")


LIBRARY_CALLS = ("TrainConfig", "CacheJob", "verify", "recompute", "evaluate_saved", "setup")


def _words(elements: list[ast.expr]) -> list[str | None]:
    return [e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else None for e in elements]


def _sequences(tree: ast.AST):
    """(node, elements) of every list, tuple and call's positional arguments."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple)):
            yield node, node.elts
        elif isinstance(node, ast.Call):
            yield node, node.args


def _after_module_flag(words: list[str | None]) -> int | None:
    """Where the mealv2 command starts in a process's argv (`... -m mealv2 COMMAND`), if it is one."""
    return next((i + 2 for i in range(len(words) - 1) if words[i:i + 2] == ["-m", "mealv2"]), None)


def _command(words: list[str | None]) -> str | None:
    """The command a sequence of arguments starts with, when it is literal and places models on a device."""
    start = _after_module_flag(words) or 0
    first = words[start:start + 2]
    if first == ["labels", "verify"]:
        return "labels verify"
    return first[0] if first and first[0] in COMMANDS else None


def missing_devices(source: str, name: str = "<test>") -> list[str]:
    """``FILE:LINE: what`` for each command line or library call in ``source`` that leaves the device to "auto".

    A command line is a list, tuple or call's arguments starting with a literal command and naming an option
    ("--..."), in a module that runs the CLI (imports mealv2.cli or starts `-m mealv2`; elsewhere such a list
    is a recorded command, not a run); its options include those of a list it unpacks by name (``*common``)
    that the module assigns literally. A helper taking the command as a parameter (``[mode, ...]``) is not
    seen. A library call is one of LIBRARY_CALLS imported from mealv2, its device given by keyword or position.
    """
    tree = ast.parse(source)
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported = {alias.asname or alias.name for node in imports if (node.module or "").startswith("mealv2")
                for alias in node.names}
    runs_cli = any(node.module == "mealv2.cli" for node in imports) or any(
        _after_module_flag(_words(elements)) is not None for _, elements in _sequences(tree))
    assigned: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.List, ast.Tuple)):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, []).extend(w for w in _words(node.value.elts) if w)
    found = []
    for node in ast.walk(tree):
        callee = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None
        if callee in LIBRARY_CALLS and callee in imported:
            given = any(k.arg in ("device", None) for k in node.keywords) or \
                any(isinstance(a, ast.Starred) for a in node.args) or len(node.args) > _device_position(callee)
            if not given:
                found.append((node.lineno, f"{callee}(...) without device"))
    for node, elements in _sequences(tree) if runs_cli else ():
        words = _words(elements)
        command = _command(words)
        if command is None:
            continue
        unpacked = [e.value.id for e in elements if isinstance(e, ast.Starred) and isinstance(e.value, ast.Name)]
        options = [w for w in words if w] + [option for named in unpacked for option in assigned.get(named, [])]
        if not any(option.startswith("--") for option in options):
            continue  # not a command line: ``mktemp("distill")``, a tuple of command names
        runs = not {"--help", "--config"} & set(options)  # --help runs nothing; a --config file names its device
        if runs and (command != "labels verify" or "--recompute" in options) and "--device" not in options:
            found.append((node.lineno, f"{command} without --device"))
    return [f"{name}:{line}: {what}" for line, what in sorted(found)]


def test_every_test_that_runs_a_model_names_its_device():
    lapses = textwrap.dedent('''
        from mealv2.cli import main
        from mealv2.distill.config import TrainConfig
        from mealv2.softlabels.verify import verify
        common = ["--data", "d", "--device", "cpu"]
        run_cli("distill", "--labels", "s", "--student", "m")
        subprocess.run([sys.executable, "-m", "mealv2", "cache-teachers", "--data", "d"])
        args = ("labels", "verify", "s", "--recompute", "4")
        TrainConfig(mode="train", data="d", out="o")
        verify("s", "d", 4)
        run_cli("train", "--model", "m", "--device", device)  # the fixture: the test takes a device
        run_cli("evaluate", "--data", "d", *common)
        run_cli("labels", "verify", "s", "--data", "d")  # no --recompute: no model runs
        verify("s", "d", 4, None, "cpu")
        setup()  # not the library's: not imported from mealv2
    ''')
    assert missing_devices(lapses) == [f"<test>:{line}: {what}" for line, what in [
        (6, "distill without --device"), (7, "cache-teachers without --device"),
        (8, "labels verify without --device"), (9, "TrainConfig(...) without device"),
        (10, "verify(...) without device")]]
    assert missing_devices('PinnedTeacher("m", "m.safetensors", ("train", "--model", "m"))') == []  # no run
    found = [lapse for path in sorted(TESTS.glob("*.py")) if path.name != Path(__file__).name
             for lapse in missing_devices(path.read_text(), path.name)]
    assert not found, "say --device cpu (exactness) or take the `device` fixture:\n" + "\n".join(found)
