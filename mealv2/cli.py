"""The `mealv2` command line: wiring from options to the library, no logic of its own."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import types
from pathlib import Path

import click
from click.core import ParameterSource

from mealv2.distill.config import AMP_MODES, DISC_HEADS, SCHEDULES
from mealv2.distill.config import defaults as train_defaults
from mealv2 import __version__
from mealv2.pipeline.dataset import FINGERPRINTS
from mealv2.pipeline.decoders import DECODERS, INTERPOLATIONS
from mealv2.pipeline.errors import first_line
from mealv2.softlabels.cache_config import RESIDUALS, CacheJob, parse_shard

CACHE = {f.name: f.default for f in dataclasses.fields(CacheJob)}  # cache-teachers defaults, declared once
DISTILL = train_defaults("distill")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mealv2")
@click.option("--debug", is_flag=True, help="show the traceback behind an error instead of its one line")
@click.pass_context
def main(ctx, debug):
    """MEAL V2 distillation: cache a teacher ensemble's soft labels once, train many students from them."""
    ctx.meta["mealv2.debug"] = debug


def run() -> None:
    """The console entry point (and `python -m mealv2`): the command line, less what zarr's and aiobotocore's
    abandoned asynchronous reads print at exit after a one-line error (the "Exception ignored" blocks of
    coroutines closed outside the context they began in, asyncio's "Task exception was never retrieved" for reads
    that met a shut-down executor): harmless, and --debug shows them."""
    if "--debug" not in sys.argv[1:]:
        default = sys.unraisablehook

        def quiet(unraisable) -> None:
            if not (isinstance(unraisable.object, types.CoroutineType)
                    and "was created in a different Context" in str(unraisable.exc_value)):
                default(unraisable)

        sys.unraisablehook = quiet
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    main()


def _debugging() -> bool:
    """Whether this command line asked for tracebacks (--debug)."""
    return click.get_current_context().meta.get("mealv2.debug", False)


def _fail_cleanly(run):
    """Turn the library's bad-input errors into one-line messages and exit status 1 (with --debug: the traceback)."""
    try:
        return run()
    except (ValueError, OSError, RuntimeError) as err:
        if _debugging():
            raise
        raise click.ClickException(first_line(err)) from None


def _storage_options(pairs: tuple[str, ...]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--storage-option")
        options[key] = value
    return options


def _apply(options: list):
    """Decorate a command with ``options`` in the order listed."""
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


runtime_options = _apply([
    click.option("--device", default=DISTILL["device"], show_default=True, help="auto, cpu, cuda or cuda:N"),
    click.option("--decoder", type=click.Choice(DECODERS), default=DISTILL["decoder"], show_default=True,
                 help="crop replay: DALI, torchvision, the PIL reference, or auto (the fastest for this device "
                      "and image size)"),
    click.option("--workers", type=click.IntRange(min=1), default=None,
                 help="decoder threads (file reads use twice as many) [default: the CPUs per process here]"),
])  # how and where crops are decoded and models run
compile_option = click.option(
    "--compile", is_flag=True, help="torch.compile the models (the first batches wait for the compiler)")
hw_decoder_option = click.option(
    "--hw-decoder-load", type=click.FloatRange(0, 1), default=None,
    help="DALI on A100/H100: share of JPEGs for the hardware decoder [default: DALI's]")


def crop_options(note: str = ""):
    """--scale and --ratio: the RandomResizedCrop ranges, spelled as in timm's train.py."""
    def decorate(command):
        for name, bounds in reversed([("scale", "0.08 1"), ("ratio", "0.75 1.333")]):
            command = click.option(f"--{name}", type=float, nargs=2, default=None, metavar="MIN MAX",
                                   help=f"RandomResizedCrop {name} range [default: {bounds}{note}]")(command)
        return command
    return decorate


def mix_options(alpha: float, prob: float, labels: str) -> list:
    """--cutmix ALPHA and --mixup-prob P, as timm's train.py names them (mealv2.pipeline.mix.MixSpec)."""
    return [click.option("--cutmix", type=click.FloatRange(min=0), default=alpha, show_default=True, metavar="ALPHA",
                         help="CutMix's alpha, as in timm: each mixed crop keeps a share λ ~ Beta(α, α) of itself "
                              f"(1: uniform; 0: no mixing); {labels}"),
            click.option("--mixup-prob", type=click.FloatRange(0, 1), default=prob, show_default=True, metavar="P",
                         help="with --cutmix: the probability that a pair of crops is mixed (timm's name)")]


class GroupedHelp(click.Command):
    """A command whose --help lists its options under headings, in the order given, as timm's train.py groups its
    arguments; every option belongs to exactly one group (a test checks), so none drops out of the listing."""

    def __init__(self, *args, groups: tuple[tuple[str, tuple[str, ...]], ...], **kwargs):
        super().__init__(*args, **kwargs)
        self.groups = groups

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        params = {param.name: param for param in self.get_params(ctx)}
        for title, names in self.groups + (("Other options", tuple(set(params) - self.grouped())),):
            rows = [record for name in names if name in params and (record := params[name].get_help_record(ctx))]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def grouped(self) -> set[str]:
        """The names of the options some group lists."""
        return {name for _, names in self.groups for name in names}


_DATA_GROUP = ("data", "out", "config", "batch_size", "res", "seeds", "skip_bad")
_SCHEDULE_GROUP = ("epochs", "sched", "lr_steps", "decay_rate", "warmup_epochs", "warmup_lr", "min_lr")
_OPTIMIZER_GROUP = ("opt", "opt_eps", "lr", "momentum", "weight_decay", "clip_grad", "clip_mode", "model_ema",
                    "model_ema_decay")
_LOGGING_GROUP = ("progress", "log_interval", "log_tb", "log_wandb")
_RUNTIME_GROUP = ("device", "decoder", "workers", "hw_decoder_load", "compile", "amp", "resume", "seed")


def training_help(mode: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The --help groups of distill (``mode`` "distill") and train, timm's headings with distillation's own."""
    store = ("labels", "storage_options") if mode == "distill" else ()
    distillation = (("Distillation", ("online", "teachers", "kd_weight", "discriminator", "disc_weight", "d_lr",
                                      "disc_input", "disc_head")),) if mode == "distill" else ()
    return (("Data", store + _DATA_GROUP),
            ("Model", ("model", "init", "pretrained_path", "drop", "drop_path", "sync_bn")),
            *distillation,
            ("Optimizer", _OPTIMIZER_GROUP),
            ("Learning rate schedule", _SCHEDULE_GROUP),
            ("Augmentation", ("scale", "ratio", "cutmix", "mixup_prob")),
            ("Validation", ("val_every", "crop_pct", "eval_interpolation")),
            ("Logging", _LOGGING_GROUP),
            ("Runtime", _RUNTIME_GROUP))


CACHE_HELP = (
    ("Data and store", ("data", "store", "like", "storage_options", "shard", "skip_bad", "fingerprint", "chunk_rows")),
    ("Labels", ("teachers", "res", "interpolation", "seeds", "topk", "residual")),
    ("Crops and mixing", ("scale", "ratio", "cutmix", "mixup_prob")),
    ("Logging", ("log_interval",)),
    ("Runtime", ("device", "decoder", "workers", "hw_decoder_load", "batch_size", "compile")),
)


def storage_option(command):
    return click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                        help="fsspec option for the store's filesystem (repeatable)")(command)


@main.command("cache-teachers", cls=GroupedHelp, groups=CACHE_HELP)
@click.option("--data", required=True, type=click.Path(file_okay=False), help="dataset ROOT (uses ROOT/train)")
@click.option("--store", required=True, help="label store path or fsspec URL")
@click.option("--res", type=click.IntRange(min=1), default=CACHE["res"], show_default=True, help="crop resolution")
@click.option("--teachers", default=None, help="NAME or NAME=PATH, comma-separated [default: the paper's, by res]")
@click.option("--seeds", type=int, default=CACHE["seeds"], show_default=True,
              help="seed slots 0..N-1 (more extends a store)")
@click.option("--topk", type=int, default=CACHE["topk"], show_default=True)
@click.option("--residual", type=click.Choice(RESIDUALS), default=CACHE["residual"], show_default=True)
@click.option("--interpolation", type=click.Choice(INTERPOLATIONS), default=CACHE["interpolation"],
              show_default=True)
@click.option("--batch-size", type=int, default=None,
              help="[default: on a GPU the largest that fits, up to 1024; on the CPU 64]")
@click.option("--shard", default="{}/{}".format(*CACHE["shard"]), show_default=True,
              help="I/N: do only units u with u % N == I")
@click.option("--skip-bad", is_flag=True, help="leave unreadable images out (recorded in the store)")
@click.option("--fingerprint", type=click.Choice(FINGERPRINTS), default=CACHE["fingerprint"],
              show_default=True, help="what identifies the data beside paths and labels: byte sizes, or every "
              "file's bytes (hashed here and wherever the store meets its data; catches an image edited at equal "
              "size)")
@click.option("--log-interval", type=click.IntRange(min=0), default=CACHE["log_interval"], show_default=True,
              help="batches between progress lines when no bar is shown (Slurm, nohup; also in STORE.log beside a "
                   "local store); one at least every 30 s; 0: none")
@click.option("--chunk-rows", type=int, default=CACHE["chunk_rows"], show_default=True,
              help="images per store chunk")
@_apply(mix_options(CACHE["cutmix"], CACHE["mixup_prob"], "the teachers label the composites and stage two "
                    "replays them"))
@crop_options()
@runtime_options
@hw_decoder_option
@compile_option
@click.option("--like", default=None, metavar="STORE",
              help="take the crops' settings (seeds, res, interpolation, top-k, residual, crop, mix, chunk rows, "
                   "fingerprint) from this store, so that `labels merge` can add this job's teachers to it")
@storage_option
def cache_teachers(storage_options, shard, scale, ratio, like, **options):
    """Stage one: run the teachers once per seed slot and store their top-k mean softmax."""
    from mealv2.pipeline.crops import CropSpec
    from mealv2.softlabels.cache import job_log, run_cache

    if like:
        options.update(scale=scale, ratio=ratio)
        _take_like(like, options, storage_options)
        scale, ratio = options.pop("scale"), options.pop("ratio")

    def run():
        job = CacheJob(**options, shard=parse_shard(shard), crop=CropSpec.from_options(scale, ratio),
                       storage_options=_storage_options(storage_options))
        log = job_log(click.echo, job.store)
        summary = run_cache(job, log=log)
        if summary["rank"] != 0:  # under torchrun rank 0 speaks for the job
            return
        log(f"{summary['images']} images × {summary['seed_slots']} seed slot(s): "
                   f"{summary['images_labelled']} labelled in {summary['labelling_seconds']:.1f} s "
                   f"({summary['images_per_sec']:.1f} img/s; {summary['seconds']:.1f} s in all); "
                   f"store {summary['bytes'] / 1e6:.2f} MB, "
                   f"{summary['bytes_per_crop']:.1f} B/crop, {'complete' if summary['complete'] else 'incomplete'}")
    _fail_cleanly(run)


def _take_like(like: str, options: dict, storage_options: tuple[str, ...]) -> None:
    """Put the settings of store ``like`` into ``options`` (cache-teachers'); a flag given with another value is
    refused (its store would not merge with ``like``)."""
    from mealv2.softlabels.merge import like_options

    source = click.get_current_context().get_parameter_source
    for name, value in _fail_cleanly(lambda: like_options(like, _storage_options(storage_options))).items():
        if source(name) is ParameterSource.COMMANDLINE and options[name] != value:
            raise click.UsageError(f"--{name.replace('_', '-')} {options[name]}: {like} was made with {value}; "
                                   "leave the flag out to take the store's")
        options[name] = value


@main.group()
def labels():
    """Inspect, check, finish and pack label stores."""


@labels.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@storage_option
def labels_info(store, as_json, storage_options):
    """Teachers, resolution, k, seed slots, images, completeness, bytes per crop."""
    from mealv2.pipeline.mix import MixSpec
    from mealv2.softlabels.store import LabelStore

    info = _fail_cleanly(lambda: LabelStore.open(store, "r", _storage_options(storage_options)).info())
    if as_json:
        click.echo(json.dumps(info))
        return info
    teachers = ", ".join(t["name"] + " (" + (t.get("pretrained") or "sha256 " + t["checkpoint_sha256"][:12]) + ")"
                         for t in info["teachers"])
    for key, value in [("store", info["url"]), ("teachers", teachers), ("res", info["res"]),
                       ("interpolation", info["interpolation"]), ("top-k", info["topk"]),
                       ("residual", info["residual"]),
                       ("crop", "scale {:.4g} {:.4g}, ratio {:.4g} {:.4g}".format(
                           *info["crop"]["scale"], *info["crop"]["ratio"])),
                       ("cutmix", MixSpec.from_attrs(info["mix"]).describe()),
                       ("seed slots", info["seeds"]), ("images", info["images"]),
                       ("classes", info["classes"]),
                       ("complete", f"{info['complete']} ({info['units_done']}/{info['units']} units"
                                    + (f", {info['missing_chunks']} chunk(s) missing)" if info["missing_chunks"] else ")")),
                       ("bytes", f"{info['bytes']} ({info['bytes_per_crop']:.1f} per crop)"),
                       ("fingerprint", info["fingerprint"]), ("skipped images", info["skipped"])]:
        click.echo(f"{key:>15}: {value}")
    for parent in info["merged_from"]:  # labels merge: each parent, its teachers and weight
        click.echo(f"{'merged from':>15}: {parent['url']} (created {parent['created']}; "
                   f"{', '.join(t['name'] for t in parent['teachers'])}; weight {parent['weight']:g})")
    for made in info["made_with"]:  # one line per kind of job that wrote units (stores made before say nothing)
        versions = ", ".join(f"{name} {made[name]}" for name in ("torch", "timm", "dali", "zarr") if made.get(name))
        click.echo(f"{'made with':>15}: {made['decoder']} decoder on {made.get('device_name') or made['device']}, "
                   f"autocast {made['autocast']}; {versions}")


@labels.command("stats")
@click.argument("store")
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="dataset ROOT whose train/ must be the data the store was made from (fingerprint)")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="also draw the figures into this PNG")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@storage_option
def labels_stats(store, data, plot, as_json, storage_options):
    """Per seed slot: entropy, top-1 and top-k mass, teachers' top-1 vs the labels, top-1 agreement between slots."""
    from mealv2.softlabels.stats import plot_stats, store_stats

    stats = _fail_cleanly(lambda: store_stats(store, data, _storage_options(storage_options)))
    if plot:
        _fail_cleanly(lambda: plot_stats(stats, plot))
    click.echo(json.dumps(stats.to_dict()) if as_json else "\n".join(stats.table()))
    return stats


@labels.command("finalize")
@click.argument("store")
@storage_option
def labels_finalize(store, storage_options):
    """Mark a store filled by --shard jobs complete (the last job to finish does this too)."""
    from mealv2.softlabels.schema import StoreError
    from mealv2.softlabels.writer import StoreWriter

    def run():
        opened = StoreWriter.open(store, _storage_options(storage_options))
        if not opened.finalize():
            done = opened.done()
            raise StoreError(f"{store}: {int((~done).sum())} of {done.size} (seed, chunk) units are not written yet")
    _fail_cleanly(run)
    click.echo(f"{store}: complete")


@labels.command("merge")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", required=True, help="the merged store's path or URL (new, or a killed merge's to resume)")
@click.option("--topk", type=click.IntRange(min=1), default=None,
              help="classes kept per row [default: the parents' largest; up to their sum keeps the mean exact]")
@click.option("--weights", default=None, metavar="W,W,...",
              help="one weight per store [default: its number of teachers: the mean over all teachers]")
@click.option("--progress/--no-progress", default=True, show_default=True)
@storage_option
def labels_merge(stores, out, topk, weights, progress, storage_options):
    """Labels of a larger ensemble without running any teacher again: the weighted mean of stores made on the same
    crops (cache the new teacher alone with `cache-teachers --like STORE`)."""
    from mealv2.softlabels.merge import merge_stores

    if len(stores) < 2:
        raise click.UsageError("labels merge: give two or more stores")
    try:
        parsed = None if weights is None else [float(w) for w in weights.split(",")]
    except ValueError:
        raise click.BadParameter(f"{weights!r}: expected numbers separated by commas", param_hint="--weights") from None
    result = _fail_cleanly(lambda: merge_stores(stores, out, topk, parsed, _storage_options(storage_options),
                                                progress, log=click.echo))
    click.echo(f"{out}: {'complete' if result['complete'] else 'incomplete'} ({result['units_merged']} unit(s) "
               f"merged, top-{result['topk']}, weights {result['weights']})")


@labels.command("pack")
@click.argument("store")
@click.argument("out", type=click.Path(dir_okay=False))
@storage_option
def labels_pack(store, out, storage_options):
    """Copy a complete store into one read-only zip; consumers open it as zip::OUT."""
    from mealv2.softlabels.packing import pack
    from mealv2.softlabels.store import open_store

    nbytes = _fail_cleanly(lambda: pack(open_store(store, _storage_options(storage_options)), out))
    click.echo(f"{out}: {nbytes / 1e6:.2f} MB; open it as zip::{out}")


@labels.command("verify")
@click.argument("store")
@click.option("--data", type=click.Path(file_okay=False), help="dataset ROOT whose train/ must match")
@click.option("--recompute", type=click.IntRange(min=0), default=0,
              help="re-run the teachers on N stored crops, spread over every seed slot")
@click.option("--teachers", default=None, help="NAME=PATH specs when the store's teachers are local checkpoints")
@click.option("--max-dp", type=float, default=0.02, show_default=True, help="tolerance on max |Δp|")
@click.option("--max-kl", type=float, default=1e-3, show_default=True, help="tolerance on the mean KL")
@runtime_options
@storage_option
def labels_verify(store, data, recompute, teachers, max_dp, max_kl, device, decoder, workers, storage_options):
    """Completeness, chunk checksums, dataset fingerprint, and optionally recomputed labels."""
    from mealv2.softlabels.verify import verify

    if recompute and not data:
        raise click.UsageError("--recompute needs --data")
    report = _fail_cleanly(lambda: verify(store, data, recompute, teachers, device, decoder, max_dp, max_kl,
                                          _storage_options(storage_options), workers))
    if "recompute" in report:
        r = report["recompute"]
        worst = f" (slot {r['worst_slot']})" if r["worst_slot"] is not None else ""
        click.echo(f"recomputed {r['crops']} crops over {r['slots']} seed slot(s): max |dp| {r['max_abs_dp']:.5f}"
                   f"{worst}, mean KL {r['mean_kl']:.2e}")
    for problem in report["problems"]:
        click.echo(f"FAIL {problem}", err=True)
    if report["problems"]:
        raise SystemExit(1)
    click.echo(f"{store}: ok")


def eval_transform_options() -> list:
    """--crop-pct and --eval-interpolation: override the evaluated model's own timm eval transform."""
    return [
        click.option("--crop-pct", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="evaluation centre crop fraction [default: the model's timm data config; the paper's: 0.875]"),
        click.option("--eval-interpolation", type=click.Choice(INTERPOLATIONS), default=None,
                     help="evaluation resize [default: the model's timm data config; the paper's: bilinear]"),
    ]


CUTMIX_HELP = {
    "distill": "--online the teachers label the composites; from a store, its labels are mixed by area (FKD's "
               "way). A store made with --cutmix replays its own mixes",
    "train": "the hard labels are weighted by area (timm's CutMix)",
}


def config_file_option(command: str):
    """--config FILE: a YAML or JSON file of options (a run's config.json is one); flags given override it."""
    def load(ctx, _param, path):
        if path:
            from mealv2.distill.config import read_run_file

            known = {param.name for param in ctx.command.params}
            values = _fail_cleanly(lambda: read_run_file(path, command, known))
            ctx.default_map = (ctx.default_map or {}) | values
        return path
    return click.option("--config", type=click.Path(dir_okay=False, exists=True), is_eager=True, expose_value=False,
                        callback=load, help="YAML or JSON file of options (a run's config.json reproduces it); "
                        "flags given here override it")


def recipe_options(default: dict) -> list:
    """timm's optimisation options, under timm's train.py names; defaults are the paper's (or train's)."""
    return [
        click.option("--opt", default=default["opt"], show_default=True,
                     help="timm optimizer (create_optimizer_v2): momentum is SGD with momentum, as the paper; "
                          "timm's sgd is Nesterov; adamw, lamb, ..."),
        click.option("--opt-eps", type=float, default=None, help="optimizer epsilon [default: timm's]"),
        click.option("--lr", type=float, default=default["lr"], show_default=True),
        click.option("--sched", type=click.Choice(SCHEDULES), default=default["sched"], show_default=True,
                     help="lr schedule (timm's scheduler factory); step and multistep: ×decay-rate at each of "
                          "--lr-steps, as the paper"),
        click.option("--lr-steps", default=",".join(map(str, default["lr_steps"])), show_default=True,
                     help="step, multistep: comma-separated epochs after which the lr is multiplied by --decay-rate"),
        click.option("--decay-rate", type=float, default=default["decay_rate"], show_default=True),
        click.option("--warmup-epochs", type=click.IntRange(min=0), default=default["warmup_epochs"],
                     show_default=True, help="epochs of linear warm-up from --warmup-lr"),
        click.option("--warmup-lr", type=float, default=default["warmup_lr"], show_default=True),
        click.option("--min-lr", type=float, default=default["min_lr"], show_default=True,
                     help="the lr cosine, tanh and poly end at"),
        click.option("--momentum", type=float, default=default["momentum"], show_default=True),
        click.option("--weight-decay", type=float, default=default["weight_decay"], show_default=True,
                     help="biases and norms are not decayed (timm's rule)"),
        click.option("--clip-grad", type=float, default=None, help="clip gradients at this threshold [default: no "
                     "clipping]"),
        click.option("--clip-mode", type=click.Choice(["norm", "value", "agc"]), default=default["clip_mode"],
                     show_default=True),
        click.option("--model-ema", is_flag=True, help="keep timm's ModelEmaV3 of the weights, validated and saved "
                     "beside them (model_ema.safetensors)"),
        click.option("--model-ema-decay", type=float, default=default["model_ema_decay"], show_default=True),
    ]


def log_options(default: dict) -> list:
    """Where a run reports beside metrics.jsonl, summary.csv and log.txt."""
    return [
        click.option("--log-interval", type=click.IntRange(min=0), default=default["log_interval"],
                     show_default=True, help="steps between progress lines when no bar is shown (a log file, "
                     "Slurm, nohup); one at least every 30 s; 0: none"),
        click.option("--log-tb", type=click.Path(file_okay=False), default=None,
                     help="also write TensorBoard scalars to this folder (pip install 'mealv2[tensorboard]')"),
        click.option("--log-wandb", is_flag=True, help="also log to Weights & Biases (pip install wandb)"),
    ]


def training_options(mode: str):
    """Options distill and train share; defaults differ (the paper's distill recipe vs a supervised one)."""
    default = train_defaults(mode)
    return _apply([
        config_file_option(mode),
        click.option("--data", required=True, type=click.Path(file_okay=False), help="dataset ROOT (train/, val/)"),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder"),
        click.option("--epochs", type=int, default=default["epochs"], show_default=True),
        click.option("--batch-size", type=int, default=default["batch_size"], show_default=True,
                     help="global batch, split over ranks (timm's --batch-size is per process)"),
        click.option("--res", type=int, default=None, help="training resolution [default: the store's, or 224]"),
        *recipe_options(default),
        click.option("--init", default=default["init"], show_default=True,
                     help="pretrained (timm hub weights), scratch, or a weights PATH (a head for another class "
                          "count starts new)"),
        click.option("--pretrained-path", default=None, help="timm's name for --init PATH"),
        click.option("--seeds", type=click.IntRange(min=1), default=None,
                     help="distill: read seed slots 0..N-1 [default: every complete slot]; train, --online: "
                          "crop seeds cycle e mod N [default: new crops each epoch]"),
        *mix_options(default["cutmix"], default["mixup_prob"], CUTMIX_HELP[mode]),
        click.option("--drop", type=float, default=None, help="timm drop_rate [default: the model's]"),
        click.option("--drop-path", type=float, default=None, help="timm drop_path_rate [default: the model's]"),
        click.option("--sync-bn", is_flag=True,
                     help="synchronise batch norm statistics over GPUs (off, as in the official code)"),
        click.option("--seed", type=int, default=default["seed"], show_default=True, help="run seed (init and shuffling)"),
        click.option("--resume", is_flag=True, help="continue from OUT/checkpoint-last.pth"),
        click.option("--amp", type=click.Choice(AMP_MODES), default=default["amp"], show_default=True,
                     help="mixed precision on CUDA (fp16 with a gradient scaler, for GPUs without bf16)"),
        click.option("--val-every", type=int, default=default["val_every"], show_default=True,
                     help="validate every N epochs"),
        *eval_transform_options(),
        click.option("--skip-bad", is_flag=True, help="leave unreadable images out"),
        click.option("--progress/--no-progress", default=True, show_default=True),
        *log_options(default),
        runtime_options,
        hw_decoder_option,
        compile_option,
    ])


def _take_pretrained_path(options: dict) -> None:
    """timm's --pretrained-path PATH is --init PATH; both on one command line, naming two things, is refused."""
    path = options.pop("pretrained_path")
    if path is None:
        return
    given = click.get_current_context().get_parameter_source("init") is ParameterSource.COMMANDLINE
    if given and options["init"] != path:
        raise click.UsageError(f"--init {options['init']} and --pretrained-path {path}: give one of them")
    options["init"] = path


def _run_paths_follow_out(options: dict) -> None:
    """A --config run's own folder for TensorBoard (--log-tb) follows a new --out given on the command line, unless
    given again: two runs never write event files into one folder."""
    ctx = click.get_current_context()
    source, old_out = ctx.get_parameter_source, (ctx.default_map or {}).get("out")
    if (options.get("log_tb") is None or old_out is None or source("out") is not ParameterSource.COMMANDLINE
            or source("log_tb") is not ParameterSource.DEFAULT_MAP):
        return
    try:
        inside = Path(options["log_tb"]).resolve().relative_to(Path(old_out).resolve())
    except ValueError:
        raise click.UsageError(f"--log-tb {options['log_tb']} (from --config) lies outside its run {old_out}: give "
                               f"--log-tb again for --out {options['out']}") from None
    options["log_tb"] = str(Path(options["out"]) / inside)


def _fit(mode: str, options: dict, storage_options: tuple[str, ...] = ()) -> None:
    from mealv2.distill.trainer import TrainConfig, Trainer
    from mealv2.pipeline.distributed import leave

    _take_pretrained_path(options)
    _run_paths_follow_out(options)

    def run():
        steps = tuple(int(v) for v in options.pop("lr_steps").split(",") if v.strip())
        config = TrainConfig(mode=mode, lr_steps=steps, storage_options=_storage_options(storage_options),
                             **options)
        trainer = Trainer(config, log=click.echo)
        trainer.fit()
        leave(trainer.world)
    _fail_cleanly(run)


@main.command(cls=GroupedHelp, groups=training_help("distill"))
@click.option("--labels", default=None, help="label store path or URL (from cache-teachers)")
@click.option("--student", "--model", "model", required=True, help="timm model name of the student")
@click.option("--online", is_flag=True, help="run the teachers in the loop instead of reading a store")
@click.option("--teachers", default=None, help="online mode: NAME or NAME=PATH, comma-separated")
@click.option("--d-lr", type=float, default=None, help="discriminator lr [default: the student's]")
@click.option("--discriminator/--no-discriminator", default=True, show_default=True)
@click.option("--disc-input", type=click.Choice(["logprobs", "logits"]), default=DISTILL["disc_input"],
              show_default=True,
              help="what the discriminator sees (logits: online mode, as the official code)")
@click.option("--kd-weight", type=float, default=DISTILL["kd_weight"], show_default=True)
@click.option("--disc-weight", type=float, default=DISTILL["disc_weight"], show_default=True)
@click.option("--disc-head", type=click.Choice(DISC_HEADS), default=DISTILL["disc_head"], show_default=True,
              help="the discriminator's last layer: relu as the official code (can be inert: loss ln 2), or linear")
@training_options("distill")
@crop_options(note="; from a store: its crops")
@storage_option
def distill(online, storage_options, **options):
    """Stage two: train a student on the cached soft labels (MEAL V2), or online with --online."""
    _fit("online" if online else "distill", options, storage_options)


@main.command(cls=GroupedHelp, groups=training_help("train"))
@click.option("--model", required=True, help="timm model name")
@training_options("train")
@crop_options()
def train(**options):
    """Plain supervised training with hard labels: the vanilla baseline, or teachers for custom data."""
    _fit("train", options)


@main.command()
@click.option("--data", required=True, type=click.Path(file_okay=False), help="dataset ROOT (uses ROOT/val)")
@click.option("--model", default=None, help="timm model name (with --checkpoint)")
@click.option("--checkpoint", default=None, help="model.safetensors or checkpoint-last.pth")
@click.option("--pretrained", is_flag=True, help="score the model's timm hub weights (instead of --checkpoint)")
@click.option("--teachers", default=None, help="instead of one model: NAME=PATH,... scored by their mean softmax")
@click.option("--res", type=int, default=None,
              help="[default: the run's training resolution, else the model's timm data config; teachers: 224]")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--predictions", "predictions_path", type=click.Path(dir_okay=False), default=None,
              help="also write each image's top-1 class to this .npy (ROOT/val's index order)")
@runtime_options
@_apply(eval_transform_options())
def evaluate(as_json, predictions_path, **options):
    """Top-1 / top-5 on ROOT/val with the model's own eval transform (crop fraction, interpolation)."""
    import numpy as np

    from mealv2.distill.evaluate import evaluate_saved

    result = _fail_cleanly(lambda: evaluate_saved(**options, predictions=predictions_path is not None))
    if predictions_path is not None:
        np.save(predictions_path, result.pop("predictions"))
        result["predictions"] = predictions_path
    click.echo(json.dumps(result) if as_json else
               f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  ({result['images']} images; "
               f"crop {result['crop_pct']:g} {result['crop_mode']}, {result['interpolation']})")
    return result


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--out", default="report.png", show_default=True, type=click.Path(dir_okay=False),
              help="the PNG to write")
def report(runs, out):
    """Curves of one or several runs (validation top-1, loss, lr) in one PNG, to compare runs from one store."""
    from pathlib import Path

    from mealv2.report import plot_runs

    _fail_cleanly(lambda: plot_runs([Path(run) for run in runs], Path(out)))
    click.echo(f"{out}: {len(runs)} run(s)")


@main.group()
def data():
    """Prepare datasets as ImageFolder splits (train/, val/)."""


@data.command("fashion-mnist")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="dataset ROOT to write")
@click.option("--limit-train", type=click.IntRange(min=1), default=None, help="first N training images")
@click.option("--limit-val", type=click.IntRange(min=1), default=None, help="first N test images")
@click.option("--source", type=click.Path(file_okay=False), default=None, help="folder of the four IDX files")
def data_fashion_mnist(out, limit_train, limit_val, source):
    """Fashion-MNIST (Debian's dataset-fashion-mnist, --source, or torchvision's download) as JPEG folders."""
    from mealv2.pipeline.fashion_mnist import write_fashion_mnist

    counts = _fail_cleanly(lambda: write_fashion_mnist(out, limit_train, limit_val, source))
    click.echo(f"{out}: {counts['train']} training and {counts['val']} validation images")


@data.command("check")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--decoder", type=click.Choice(DECODERS), default="auto", show_default=True,
              help="the decoder the jobs will use")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="decoder threads [default: the CPUs per process here]")
def data_check(root, decoder, workers):
    """Decode every image of ROOT/train and ROOT/val; list those that fail (exit status 1 if any)."""
    from pathlib import Path

    from mealv2.pipeline.check import check_split

    splits = [Path(root) / name for name in ("train", "val") if (Path(root) / name).is_dir()]
    if not splits:
        raise click.ClickException(f"{root}: expected train/ or val/ split folders")
    failed = 0
    for split in splits:
        images, bad = _fail_cleanly(lambda: check_split(split, decoder, workers))
        for line in bad:
            click.echo(f"BAD {line}")
        click.echo(f"{split}: {images} images, {len(bad)} cannot be decoded")
        failed += len(bad)
    if failed:
        raise SystemExit(1)


@main.command()
@click.option("--out", default="mealv2-demo", show_default=True, type=click.Path(file_okay=False),
              help="folder for the data, every run, summary.json and report.png (must be new or empty)")
@click.option("--seed", type=int, default=0, show_default=True, help="run seed of every training run")
@click.option("--quick", is_flag=True, help="a few hundred images, tiny models, one epoch each (about a minute)")
@click.option("--source", type=click.Path(file_okay=False), default=None, help="folder of the Fashion-MNIST IDX files")
@click.option("--slots-study", is_flag=True,
              help="instead: the distilled student from 1, 2, 4, 8 and 16 seed slots and online, over run seeds "
                   "SEED, SEED+1, SEED+2 (over an hour on 2 cores; --quick: 1 and 2 slots, one seed)")
@click.option("--train-teachers", is_flag=True,
              help="train the teachers here with the recorded settings (pinned in OUT/teachers) instead of using "
                   "the pretrained ones shipped in the package")
@click.option("--teachers-from", type=click.Path(file_okay=False, exists=True), default=None,
              help="a folder of pinned teachers (teachers.json and weights, as --train-teachers writes) instead of "
                   "the shipped ones")
def demo(out, seed, quick, source, slots_study, train_teachers, teachers_from):
    """MEAL V2 in miniature on Fashion-MNIST: teachers, cache, baseline and distilled student, on the CPU."""
    from mealv2.demo import FULL, QUICK, Demo

    def run_command(argv: list[str]):
        return main.main(["--debug", *argv] if _debugging() else argv, prog_name="mealv2", standalone_mode=False)

    plan = QUICK if quick else FULL
    teachers = {"teachers_from": teachers_from, "train_teachers": train_teachers}
    if not slots_study:
        return Demo(out, seed, plan, run_command, source, **teachers).run()
    from mealv2.slots_study import SLOTS, SlotsStudy

    slots, run_seeds = ((1, 2), (seed,)) if quick else (SLOTS, (seed, seed + 1, seed + 2))
    return SlotsStudy(out, seed, plan, run_command, source, slots=slots, run_seeds=run_seeds, **teachers).run()
