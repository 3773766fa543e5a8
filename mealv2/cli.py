"""The `mealv2` command line: wiring from options to the library, no logic of its own."""

from __future__ import annotations

import json

import click

from mealv2 import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mealv2")
def main():
    """MEAL V2 distillation: cache a teacher ensemble's soft labels once, train many students from them."""


def _fail_cleanly(run):
    """Turn the library's bad-input errors into one-line messages and exit status 1."""
    try:
        return run()
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as err:
        raise click.ClickException(str(err).splitlines()[0]) from None


def _storage_options(pairs: tuple[str, ...]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--storage-option")
        options[key] = value
    return options


def runtime_options(command):
    """--device, --decoder, --workers: how and where crops are decoded and models run."""
    for option in reversed([
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N"),
        click.option("--decoder", type=click.Choice(["auto", "dali", "pil"]), default="auto", show_default=True,
                     help="DALI replay (auto when installed) or the PIL reference"),
        click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
                     help="decoder threads (file reads use twice as many)"),
    ]):
        command = option(command)
    return command


def storage_option(command):
    return click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                        help="fsspec option for the store's filesystem (repeatable)")(command)


@main.command("cache-teachers")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="dataset ROOT (uses ROOT/train)")
@click.option("--store", required=True, help="label store path or fsspec URL")
@click.option("--res", type=click.IntRange(min=1), default=224, show_default=True, help="crop resolution")
@click.option("--teachers", default=None, help="NAME or NAME=PATH, comma-separated [default: the paper's, by res]")
@click.option("--seeds", type=int, default=1, show_default=True, help="seed slots 0..N-1 (more extends a store)")
@click.option("--topk", type=int, default=5, show_default=True)
@click.option("--residual", type=click.Choice(["uniform", "renorm"]), default="uniform", show_default=True)
@click.option("--interpolation", type=click.Choice(["bilinear", "bicubic"]), default="bilinear", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--shard", default="0/1", show_default=True, help="I/N: do only units u with u % N == I")
@click.option("--skip-bad", is_flag=True, help="leave unreadable images out (recorded in the store)")
@click.option("--chunk-rows", type=int, default=65536, show_default=True, help="images per store chunk")
@runtime_options
@storage_option
def cache_teachers(storage_options, shard, **options):
    """Stage one: run the teachers once per seed slot and store their top-k mean softmax."""
    from softlabels.cache import CacheJob, parse_shard, run_cache

    def run():
        job = CacheJob(**options, shard=parse_shard(shard), storage_options=_storage_options(storage_options))
        summary = run_cache(job, log=click.echo)
        click.echo(f"{summary['images']} images × {summary['seed_slots']} seed slot(s): "
                   f"{summary['images_labelled']} labelled in {summary['seconds']:.1f} s "
                   f"({summary['images_per_sec']:.1f} img/s); store {summary['bytes'] / 1e6:.2f} MB, "
                   f"{summary['bytes_per_crop']:.1f} B/crop, {'complete' if summary['complete'] else 'incomplete'}")
    _fail_cleanly(run)


@main.group()
def labels():
    """Inspect and check label stores."""


@labels.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@storage_option
def labels_info(store, as_json, storage_options):
    """Teachers, resolution, k, seed slots, images, completeness, bytes per crop."""
    from softlabels.store import LabelStore

    info = _fail_cleanly(lambda: LabelStore.open(store, "r", _storage_options(storage_options)).info())
    if as_json:
        click.echo(json.dumps(info))
        return
    teachers = ", ".join(t["name"] + " (" + (t.get("pretrained") or "sha256 " + t["checkpoint_sha256"][:12]) + ")"
                         for t in info["teachers"])
    for key, value in [("store", info["url"]), ("teachers", teachers), ("res", info["res"]),
                       ("interpolation", info["interpolation"]), ("top-k", info["topk"]),
                       ("residual", info["residual"]), ("seed slots", info["seeds"]), ("images", info["images"]),
                       ("classes", info["classes"]),
                       ("complete", f"{info['complete']} ({info['units_done']}/{info['units']} units)"),
                       ("bytes", f"{info['bytes']} ({info['bytes_per_crop']:.1f} per crop)"),
                       ("fingerprint", info["fingerprint"]), ("skipped images", info["skipped"])]:
        click.echo(f"{key:>15}: {value}")


@labels.command("verify")
@click.argument("store")
@click.option("--data", type=click.Path(file_okay=False), help="dataset ROOT whose train/ must match")
@click.option("--recompute", type=click.IntRange(min=0), default=0, help="re-run the teachers on N stored crops")
@click.option("--teachers", default=None, help="NAME=PATH specs when the store's teachers are local checkpoints")
@click.option("--max-dp", type=float, default=0.02, show_default=True, help="tolerance on max |Δp|")
@click.option("--max-kl", type=float, default=1e-3, show_default=True, help="tolerance on the mean KL")
@runtime_options
@storage_option
def labels_verify(store, data, recompute, teachers, max_dp, max_kl, device, decoder, workers, storage_options):
    """Completeness, chunk checksums, dataset fingerprint, and optionally recomputed labels."""
    from softlabels.verify import verify

    if recompute and not data:
        raise click.UsageError("--recompute needs --data")
    report = _fail_cleanly(lambda: verify(store, data, recompute, teachers, device, decoder, max_dp, max_kl,
                                          _storage_options(storage_options)))
    if "recompute" in report:
        r = report["recompute"]
        click.echo(f"recomputed {r['crops']} crops: max |dp| {r['max_abs_dp']:.5f}, mean KL {r['mean_kl']:.2e}")
    for problem in report["problems"]:
        click.echo(f"FAIL {problem}", err=True)
    if report["problems"]:
        raise SystemExit(1)
    click.echo(f"{store}: ok")


def _not_built(name: str, issue: int):
    @main.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                  help=f"(not built yet: issue {issue})")
    def command():
        raise click.ClickException(f"`mealv2 {name}` is not built yet (issue {issue})")
    return command


for _name, _issue in [("distill", 4), ("train", 4), ("evaluate", 4), ("data", 5), ("demo", 5)]:
    _not_built(_name, _issue)
