"""The ``cliper-prod`` command line.

Exit codes: 0 success; 1 unexpected failure; 2 bad option or config; 3 bad input data;
4 bad checkpoint; 5 training diverged; 130 interrupted. Expected problems print one line
``error: ...`` and never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

from cliper_prod import __version__
from cliper_prod.config import available_backbones
from cliper_prod.errors import CliperError, ConfigError

BACKBONE_CHOICES = available_backbones()

DEFAULT_CHECKPOINTS = Path("models") / "checkpoints"


def _split_assignment(pair: str, option: str) -> tuple[str, str, str]:
    key, sep, raw = pair.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or section not in ("model", "train"):
        raise ConfigError(f"{option} expects section.key=value with section model or train, "
                          f"got {pair!r}")
    return section, name, raw


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word is a string


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``model.dropout=0.5`` -> {"model": {"dropout": 0.5}}; values are parsed as TOML."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        section, name, raw = _split_assignment(pair, "--set")
        out.setdefault(section, {})[name] = _parse_value(raw)
    return out


def parse_grid(pairs: tuple[str, ...], config: dict) -> dict[str, list]:
    """``model.reg_weight=0,1e-4`` -> {"model.reg_weight": [0, 0.0001]}, keys checked."""
    grid: dict[str, list] = {}
    for pair in pairs:
        section, name, raw = _split_assignment(pair, "--grid")
        if name not in config[section]:
            raise ConfigError(f"--grid: unknown key [{section}] {name}")
        grid[f"{section}.{name}"] = [_parse_value(v) for v in raw.split(",")]
    return grid


def format_metrics(metrics: dict[str, float], topk: tuple[int, ...] | list[int]) -> str:
    names = ("recall", "ndcg", "precision", "map")
    header = "        " + "".join(f"{n + '@' + str(k):>14}" for k in topk for n in names[:2])
    row = "        " + "".join(f"{metrics[f'{n}@{k}']:>14.4f}" for k in topk for n in names[:2])
    return header + "\n" + row


class CliperGroup(click.Group):
    """Turns expected errors into one line on stderr and the error's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CliperError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=CliperGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cliper-prod")
@click.option("-v", "--verbose", is_flag=True, help="Log debugging detail.")
def cli(verbose: bool) -> None:
    """CLIPER multi-modal recommendation: train graph backbones on MMRec-format data, evaluate
    them with full ranking, and (later stages) export and serve them."""
    # third-party libraries (the ONNX exporter's passes) stay at WARNING; this package speaks
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("cliper_prod").setLevel(logging.DEBUG if verbose else logging.INFO)


@cli.command()
@click.option("--backbone", type=click.Choice(BACKBONE_CHOICES), default="freedom",
              show_default=True, help="Recommender to train.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="MMRec-format dataset folder (<name>.inter, optional *_feat.npy).")
@click.option("--features", type=click.Choice(["vanilla", "cliper"]), default="vanilla",
              show_default=True, help="vanilla: the data folder's *_feat.npy as given; cliper: "
                                      "the output of `cliper-prod embed` (see --features-dir).")
@click.option("--features-dir", type=click.Path(path_type=Path),
              help="Folder written by `cliper-prod embed` [default: DATA/cliper].")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML file overriding the backbone's defaults (models/<backbone>.toml).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one setting, e.g. --set model.dropout=0.5 (repeatable).")
@click.option("--grid", "grid_pairs", multiple=True, metavar="SECTION.KEY=V1,V2,...",
              help="Train every combination and keep the best on validation, e.g. "
                   "--grid model.reg_weight=0,1e-5,1e-4,1e-3 (repeatable). Test is ranked "
                   "once, for the selected point only.")
@click.option("--seed", type=int, help="Random seed (overrides [train] seed).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help=f"Checkpoint folder [default: {DEFAULT_CHECKPOINTS}/<backbone>-<dataset>].")
@click.option("--mask-valid-in-test", is_flag=True,
              help="Also hide validation items when ranking for test (MMRec does not).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from its last epoch (same options).")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
def train(backbone: str, data_dir: Path, features: str, features_dir: Path | None,
          config_file: Path | None, overrides: tuple[str, ...], grid_pairs: tuple[str, ...],
          seed: int | None, out_dir: Path | None, mask_valid_in_test: bool, resume: bool,
          quiet: bool) -> None:
    """Train a backbone with BPR, early-stopped on the validation split.

    Writes model.pt, user/item embedding tables, history.json, metrics.json and
    training_curve.png to the checkpoint folder.
    """
    from cliper_prod.config import load_config
    from cliper_prod.data.mmrec import load_dataset
    from cliper_prod.training import train_model

    extra = parse_overrides(overrides)
    if seed is not None:
        extra.setdefault("train", {})["seed"] = seed
    config = load_config(backbone, config_file, extra)
    grid = parse_grid(grid_pairs, config)
    if features == "cliper":
        features_dir = features_dir or data_dir / "cliper"
    elif features_dir is not None:
        raise ConfigError("--features-dir needs --features cliper")
    data = load_dataset(data_dir, features_dir=features_dir)
    click.echo(data.summary(), err=True)
    out_dir = out_dir or DEFAULT_CHECKPOINTS / f"{backbone}-{data.name}"
    result = train_model(backbone, data, config, out_dir, progress=not quiet,
                         mask_valid_in_test=mask_valid_in_test, grid=grid, resume=resume)
    if result.grid:
        click.echo(f"selected on validation: {result.config['model']}")
    click.echo(f"best epoch {result.best_epoch} of {len(result.history)}; checkpoint: {out_dir}")
    click.echo("valid:\n" + format_metrics(result.valid, config["train"]["topk"]))
    click.echo("test (at the best valid epoch):\n" + format_metrics(result.test,
                                                                   config["train"]["topk"]))


@cli.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
              help="Folder written by `cliper-prod train`.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Dataset folder [default: the one the model was trained on].")
@click.option("--split", type=click.Choice(["valid", "test"]), default="test", show_default=True)
@click.option("--mask-valid-in-test", is_flag=True,
              help="Also hide validation items when ranking for test.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(checkpoint: Path, data_dir: Path | None, split: str, mask_valid_in_test: bool,
             as_json: bool) -> None:
    """Full-ranking Recall/NDCG/Precision/MAP of a trained model on one split."""
    from cliper_prod.checkpoint import load_model
    from cliper_prod.config import TrainSettings, build
    from cliper_prod.training import evaluate_model, ranking_tasks

    model, data, payload = load_model(checkpoint, data_dir)
    settings = build(TrainSettings, payload["config"]["train"], "train")
    metrics = evaluate_model(model, ranking_tasks(data, mask_valid_in_test)[split], settings)
    if as_json:
        click.echo(json.dumps(metrics, indent=2, sort_keys=True))
    else:
        click.echo(f"{payload['backbone']} on {data.name}, {split}:\n"
                   + format_metrics(metrics, settings.topk))


FIXED_IN_BUNDLE = ("random_init", "fusion", "tau", "fields", "no_global_view", "missing_word",
                   "chunk_long_text")


@cli.command()
@click.argument("items", type=click.Path(path_type=Path))
@click.option("--clip", "clip_source",
              help="PyTorch path: CLIP or Long-CLIP checkpoint, a local folder or a hub id.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path),
              help="ONNX Runtime path: a bundle written by `cliper-prod export` (its views, "
                   "fusion and tau are fixed at export).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Output folder (image_feat.npy, text_feat.npy, item_ids.txt, errors.jsonl).")
@click.option("--random-init", is_flag=True,
              help="Build the model from the folder's config with RANDOM weights (plumbing only).")
@click.option("--fusion", type=click.Choice(["sa", "sum", "concat", "mlp"]), default="sa",
              show_default=True, help="How the view embeddings become one text feature (mlp: "
                                      "written as concat, fused by a layer trained with the "
                                      "recommender).")
@click.option("--tau", type=click.FloatRange(min=0, min_open=True), default=0.1,
              show_default=True, help="Temperature of the view-image similarity.")
@click.option("--fields", default="title,brand,categories,description", show_default=True,
              help="Comma-separated text fields that make views.")
@click.option("--no-global-view", is_flag=True, help="Leave out the global view.")
@click.option("--missing-word", default="Missing", show_default=True,
              help="Fills a field-view whose field is absent.")
@click.option("--chunk-long-text", is_flag=True,
              help="Embed over-long text in windows and sum them, instead of truncating "
                   "(PyTorch path only).")
@click.option("--save-views", is_flag=True, help="Also write view_feat.npy and similarity.npy.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="auto: the GPU when one is usable.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32",
              show_default=True, help="Which exported graphs to run (--bundle only).")
@click.option("--strict", is_flag=True,
              help="Fail (exit 3) at the first item error instead of listing it and going on.")
@click.option("--resume", is_flag=True,
              help="Continue a run that was interrupted (same input and options).")
@click.option("--shard-items", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Items per crash-safe shard: the most work a kill can lose.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=64_000_000,
              show_default=True, help="Larger images are refused before decoding.")
@click.option("--max-text-chars", type=click.IntRange(min=1), default=20_000,
              show_default=True, help="Longer text fields are cut (and reported).")
@click.option("--max-line-bytes", type=click.IntRange(min=1), default=8 << 20,
              show_default=True, help="Longer JSONL lines are skipped (and reported).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Distribute reading, image preprocessing and ONNX inference over Ray Data "
                   "(needs --bundle); same outputs byte for byte.")
@click.option("--address", help="Ray cluster to join with --ray (default: start a local one).")
@click.option("--ray-actors", type=click.IntRange(min=1),
              help="Encode actors with --ray [default: one per GPU, else one].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def embed(ctx: click.Context, items: Path, clip_source: str | None, bundle_dir: Path | None,
          out_dir: Path, random_init: bool, fusion: str, tau: float, fields: str,
          no_global_view: bool, missing_word: str, chunk_long_text: bool, save_views: bool,
          batch_size: int, device: str, precision: str, strict: bool, resume: bool,
          shard_items: int, max_image_pixels: int, max_text_chars: int, max_line_bytes: int,
          use_ray: bool, address: str | None, ray_actors: int | None, quiet: bool) -> None:
    """Embed the items of a JSON Lines file, or of a folder of *.jsonl shards read in path
    order as one catalog, into CLIPER features.

    Each item's text fields become view prompts, CLIP encodes the views and the image, and the
    view-image similarities weight the fusion. Runs CLIP in PyTorch (--clip) or an exported
    bundle on ONNX Runtime (--bundle; no torch needed). Bad items are listed in errors.jsonl
    with the reason; see README for the per-item policy.
    """
    from dataclasses import replace

    from cliper_prod.features.embed import EmbedOptions, check_catalog, embed_catalog
    from cliper_prod.features.items import ItemLimits

    check_catalog(items, out_dir)  # before the model loads
    if (clip_source is None) == (bundle_dir is None):
        raise ConfigError("pass exactly one of --clip (PyTorch) or --bundle (ONNX Runtime)")
    if (address or ray_actors) and not use_ray:
        raise ConfigError("--address and --ray-actors go with --ray")
    if use_ray and bundle_dir is None:
        raise ConfigError("--ray runs the exported ONNX graphs: export a bundle (`cliper-prod "
                          "export --clip ...`) and pass --bundle")
    if bundle_dir is not None:
        from cliper_prod.runtime.bundle import Bundle
        from cliper_prod.runtime.encoder import OnnxEncoder

        fixed = [f"--{name.replace('_', '-')}" for name in FIXED_IN_BUNDLE
                 if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
        if fixed:
            raise ConfigError(f"{', '.join(fixed)}: fixed in the bundle at export; drop the "
                              f"option(s) or embed with --clip")
        encoder = OnnxEncoder(Bundle(bundle_dir, device), precision)
        options = EmbedOptions(views=encoder.views, fusion=encoder.fusion, tau=encoder.tau,
                               batch_size=batch_size, save_views=save_views)
    else:
        encoder, options = _torch_encoder(clip_source, random_init, fusion, tau, fields,
                                          no_global_view, missing_word, chunk_long_text,
                                          save_views, batch_size, device)
    if encoder.random_init:
        click.echo("note: CLIP built from its config with RANDOM weights: the features prove "
                   "the plumbing, not semantic quality.", err=True)
    options = replace(options, strict=strict, shard_items=shard_items,
                      max_image_pixels=max_image_pixels,
                      limits=ItemLimits(max_line_bytes=max_line_bytes,
                                        max_text_chars=max_text_chars))
    runner = None
    if use_ray:
        from cliper_prod.features.embed_ray import RaySettings, ray_runner

        runner = ray_runner(bundle_dir, RaySettings(address, ray_actors, device, precision))
    summary = embed_catalog(items, encoder, out_dir, options, progress=not quiet, resume=resume,
                            runner=runner)
    click.echo(f"embedded {summary['embedded']} item(s), skipped {summary['skipped']}, kept with "
               f"a fallback {summary['kept_with_fallback']}, text cut at {encoder.max_tokens} "
               f"tokens for {summary['truncated_items']} -> {out_dir}")


def _torch_encoder(clip_source: str, random_init: bool, fusion: str, tau: float, fields: str,
                   no_global_view: bool, missing_word: str, chunk_long_text: bool,
                   save_views: bool, batch_size: int, device: str):
    import torch

    from cliper_prod.features.clip_towers import ClipTowers
    from cliper_prod.features.embed import EmbedOptions
    from cliper_prod.features.views import DEFAULT_TEMPLATES, GLOBAL_TEMPLATE, ViewSpec

    names = tuple(f.strip() for f in fields.split(",") if f.strip())
    unknown = [n for n in names if n not in DEFAULT_TEMPLATES]
    if unknown:
        raise ConfigError(f"--fields: unknown field(s) {unknown}; known: {list(DEFAULT_TEMPLATES)}")
    spec = ViewSpec(fields=names, global_template=None if no_global_view else GLOBAL_TEMPLATE,
                    missing_word=missing_word)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    towers = ClipTowers(clip_source, device=device, random_init=random_init)
    return towers, EmbedOptions(views=spec, fusion=fusion, tau=tau, batch_size=batch_size,
                                chunk_long_text=chunk_long_text, save_views=save_views)


@cli.command()
@click.option("--backbone", type=click.Choice(BACKBONE_CHOICES), default="freedom",
              show_default=True, help="Backbone of the checkpoint (checked).")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
              help="Folder written by `cliper-prod train`.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="The training data, if it moved since training.")
@click.option("--clip", "clip_source",
              help="CLIP checkpoint for the feature graphs [default: the one the model's "
                   "CLIPER features were embedded with; none for vanilla features].")
@click.option("--random-init", is_flag=True, help="CLIP with RANDOM weights from its config.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Bundle folder [default: export/<backbone>].")
@click.option("--max-k", type=click.IntRange(min=1), default=100, show_default=True,
              help="Most items per user the top-K graph returns (topk -k may ask for fewer).")
@click.option("--chunk-items", type=click.IntRange(min=1), default=1 << 16, show_default=True,
              help="Items scored at a time by the top-K graph (exact; bounds its memory to "
                   "batch x chunk instead of batch x catalog).")
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True)
@click.option("--no-fp16", is_flag=True, help="Skip the fp16 variants of the CLIP graphs.")
@click.option("--no-torchscript", is_flag=True, help="Skip the TorchScript twins.")
def export(backbone: str, checkpoint: Path, data_dir: Path | None, clip_source: str | None,
           random_init: bool, out_dir: Path | None, max_k: int, chunk_items: int, opset: int,
           no_fp16: bool, no_torchscript: bool) -> None:
    """Export a trained model to a self-verifying ONNX/TorchScript bundle.

    The bundle holds the top-K graph over the final embedding tables (training items
    excluded), the CLIP image tower and the text+fusion graph (fp32 and fp16), the tokenizer,
    the id maps, and manifest.json with versions, hashes and the parity measured against
    PyTorch. Export fails if any graph misses the parity bounds.
    """
    from cliper_prod.export.bundle import export_bundle

    out_dir = out_dir or Path("export") / backbone
    manifest = export_bundle(checkpoint, backbone, out_dir, clip_source, random_init, data_dir,
                             max_k, opset, not no_fp16, not no_torchscript, chunk_items,
                             log=lambda m: click.echo(m, err=True))
    for name, graph in manifest["graphs"].items():
        figures = ", ".join(f"{variant} cos {p['min_cosine']:.6f} max|d| {p['max_abs']:.1e}"
                            for variant, p in graph["parity"].items())
        click.echo(f"{name}: {figures}")
    click.echo(f"bundle -> {out_dir} ({len(manifest['files'])} files)")


@cli.command()
@click.option("--users", "users_file", type=click.Path(path_type=Path), required=True,
              help="One user id per line (the dataset's ids); # comments, blank lines allowed.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path),
              default=Path("export") / "freedom", show_default=True)
@click.option("-k", "k", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--out", "out_file", type=click.Path(path_type=Path),
              help="JSON Lines output [default: stdout].")
@click.option("--skip-unknown", is_flag=True,
              help="Skip unknown, duplicate and malformed lines (reported on stderr) instead "
                   "of stopping at the first.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--backbone", type=click.Choice(BACKBONE_CHOICES),
              help="Refuse a bundle of another backbone (a guard for deployment scripts).")
def topk(users_file: Path, bundle_dir: Path, k: int, out_file: Path | None, skip_unknown: bool,
         batch_size: int, device: str, backbone: str | None) -> None:
    """Top-K items for each user of a file, training items excluded, as JSON Lines
    ({"user_id", "items", "scores"}), from an exported bundle on ONNX Runtime."""
    from cliper_prod.runtime.bundle import Bundle
    from cliper_prod.runtime.topk import recommend, recommend_to_file

    if not users_file.is_file():
        raise ConfigError(f"{users_file}: users file not found")
    bundle = Bundle(bundle_dir, device, backbone)
    if out_file is None:
        summary = recommend(bundle, users_file, sys.stdout, k, skip_unknown, batch_size)
    else:
        summary = recommend_to_file(bundle, users_file, out_file, k, skip_unknown, batch_size)
    for skipped in summary.skipped:
        click.echo(f"{users_file}:{skipped['line']}: skipped: {skipped['reason']}", err=True)
    click.echo(f"top-{k} for {summary.users} user(s), {len(summary.skipped)} line(s) skipped"
               + (f" -> {out_file}" if out_file else ""), err=True)


@cli.command()
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path),
              default=Path("export") / "freedom", show_default=True,
              help="Bundle folder written by `cliper-prod export`.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--address", help="Ray cluster to deploy on (default: start a local Ray).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--image-root", type=click.Path(path_type=Path, file_okay=False),
              help="Folder that /embed image paths resolve under (default: paths refused, "
                   "base64 images only).")
@click.option("--no-batching", is_flag=True, help="Run each /topk request alone.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="/topk requests merged into one ONNX run.")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="How long a /topk request waits for others to batch with.")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=16 << 20,
              show_default=True)
def serve(bundle_dir: Path, replicas: int, host: str, port: int, address: str | None,
          device: str, image_root: Path | None, no_batching: bool, max_batch_size: int,
          batch_wait_ms: float, max_request_bytes: int) -> None:
    """Serve a bundle over HTTP on Ray Serve: POST /topk, POST /embed, GET /healthz,
    GET /metadata (OpenAPI schema at /openapi.json). Stops cleanly on Ctrl-C or SIGTERM."""
    import signal
    import threading

    from cliper_prod.runtime.bundle import Bundle

    Bundle(bundle_dir, device)  # a broken bundle fails here, with its exit code
    if image_root is not None and not image_root.is_dir():
        raise ConfigError(f"--image-root {image_root}: not a folder")
    try:
        from cliper_prod.serving.app import ServeSettings, connect, start_service, stop_service
    except ImportError as exc:
        raise ConfigError(f"serve needs Ray Serve ({exc.name} missing): pip install "
                          f"'cliper-prod[ray]'") from None
    settings = ServeSettings(bundle=str(bundle_dir.resolve()), device=device,
                             image_root=str(image_root.resolve()) if image_root else None,
                             batching=not no_batching, max_batch_size=max_batch_size,
                             batch_wait_timeout_s=batch_wait_ms / 1000,
                             max_request_bytes=max_request_bytes)
    connect(address)
    stop = threading.Event()  # a signal from here on drains and stops, even during start-up
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    url = start_service(settings, replicas, host, port, address)
    click.echo(f"serving {bundle_dir} at {url} ({replicas} replica(s)); API schema at "
               f"{url}/docs; Ctrl-C stops", err=True)
    stop.wait()
    click.echo("draining in-flight requests and stopping", err=True)
    stop_service()


@cli.command("convert-clip")
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="New transformers CLIP folder.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True, help="A CLIP folder whose tokenizer files are copied (same BPE).")
def convert_clip(checkpoint: Path, out_dir: Path, tokenizer_dir: Path) -> None:
    """Convert an OpenAI-format CLIP or Long-CLIP .pt checkpoint into a transformers folder
    usable with `embed --clip`."""
    from cliper_prod.features.convert_clip import convert_checkpoint

    click.echo(convert_checkpoint(checkpoint, out_dir, tokenizer_dir))


@cli.command("ablate-fusion")
@click.option("--items", type=click.Path(path_type=Path, exists=True), required=True,
              help="Items JSONL of the dataset's items.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="MMRec-format folder (its i_id_mapping.csv names the items).")
@click.option("--clip", "clip_source", required=True, help="CLIP checkpoint folder or hub id.")
@click.option("--random-init", is_flag=True, help="RANDOM weights from the folder's config.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("runs/ablate-fusion"),
              show_default=True)
@click.option("--modes", default="sa,sum,concat", show_default=True)
@click.option("--backbone", type=click.Choice(["freedom"]), default="freedom", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), help="Cap on training epochs.")
@click.option("--reg-weight", type=click.FloatRange(min=0), default=None,
              help="FREEDOM's modality-loss weight for every mode (mlp needs > 0).")
@click.option("--quiet", is_flag=True)
def ablate_fusion(items: Path, data_dir: Path, clip_source: str, random_init: bool,
                  workdir: Path, modes: str, backbone: str, epochs: int | None,
                  reg_weight: float | None, quiet: bool) -> None:
    """Train the backbone on features of each fusion mode and print a table (selected on
    validation, test at that epoch)."""
    from cliper_prod.io import write_json
    from cliper_prod.pipeline import run_fusion_ablation

    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    bad = [m for m in chosen if m not in ("sa", "sum", "concat", "mlp")]
    if bad:
        raise ConfigError(f"--modes: unknown fusion(s) {bad}; available: sa, sum, concat, mlp")
    overrides = {"model": {"reg_weight": reg_weight}} if reg_weight is not None else {}
    if epochs is not None:
        overrides["train"] = {"epochs": epochs}
    rows = run_fusion_ablation(items, data_dir, clip_source, workdir, chosen, backbone,
                               overrides, random_init, progress=not quiet)
    write_json(workdir / "ablation.json", rows)
    click.echo("| fusion | best epoch | valid R@20 | test R@20 | test N@20 | test R@50 |")
    click.echo("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        click.echo(f"| {r['fusion']} | {r['best_epoch']} | {r['valid']['recall@20']:.4f} | "
                   f"{r['test']['recall@20']:.4f} | {r['test']['ndcg@20']:.4f} | "
                   f"{r['test']['recall@50']:.4f} |")
    click.echo("note: with a random-weight CLIP these rows only prove the plumbing; use a "
               "pretrained checkpoint for a real ablation." if random_init else
               "note: differences between single runs within a few percent are seed noise.")


PAPER_BACKBONES = "lattice,mmgcn,dualgnn,slmrec,freedom"  # the paper's Table 2


@cli.command()
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="MMRec-format dataset folder.")
@click.option("--features-vanilla", type=click.Path(path_type=Path),
              help="Folder of the vanilla features [default: the data folder's *_feat.npy].")
@click.option("--features-cliper", type=click.Path(path_type=Path),
              help="Folder written by `cliper-prod embed` [default: DATA/cliper].")
@click.option("--backbones", default=PAPER_BACKBONES, show_default=True,
              help="Comma-separated backbones to train.")
@click.option("--seeds", default="999,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a setting of every backbone, e.g. --set train.epochs=50.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              default=Path("runs") / "compare", show_default=True)
@click.option("--quiet", is_flag=True)
def compare(data_dir: Path, features_vanilla: Path | None, features_cliper: Path | None,
            backbones: str, seeds: str, overrides: tuple[str, ...], out_dir: Path,
            quiet: bool) -> None:
    """Train each backbone on vanilla and on CLIPER features over several seeds; write the
    paper's Table 2 layout (compare.md, compare.json) and a bar chart (compare.png)."""
    from cliper_prod.comparison import compare_backbones, table, write_report

    names = [b.strip() for b in backbones.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKBONE_CHOICES]
    if not names or unknown:
        raise ConfigError(f"--backbones: unknown {unknown}; available: {BACKBONE_CHOICES}")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r}: comma-separated integers") from None
    if not seed_list:
        raise ConfigError("--seeds: give at least one seed")
    features = {"vanilla": features_vanilla,
                "cliper": features_cliper or data_dir / "cliper"}
    result = compare_backbones(data_dir, features, names, seed_list, parse_overrides(overrides),
                               progress=not quiet)
    write_report(result, out_dir)
    click.echo(table(result))
    click.echo(f"-> {out_dir}/compare.md, compare.json, compare.png", err=True)


@cli.command("random-features")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="MMRec-format folder whose .inter defines the items.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="New folder: links to the .inter and id maps plus the generated features.")
@click.option("--seed", type=int, default=0, show_default=True)
def random_features_cmd(data_dir: Path, out_dir: Path, seed: int) -> None:
    """Add standard-normal stand-in features (4096-d image, 384-d text) to a dataset without any.

    They carry no item semantics: for comparing implementations side by side only.
    """
    from cliper_prod.data.random_features import with_random_features

    click.echo(with_random_features(data_dir, out_dir, seed))


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--users", type=int, default=600, show_default=True)
@click.option("--items", type=int, default=400, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing catalog folder.")
def synthetic(out_dir: Path, users: int, items: int, seed: int, overwrite: bool) -> None:
    """Generate the built-in synthetic catalog (items with text and images, users,
    interactions, split) in MMRec format."""
    from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog

    try:
        spec = SyntheticSpec(n_users=users, n_items=items, seed=seed)
        click.echo(generate_catalog(out_dir, spec, overwrite=overwrite))
    except (ValueError, FileExistsError) as exc:
        raise ConfigError(str(exc)) from None


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Where the catalog and checkpoints go.")
@click.option("--epochs", type=click.IntRange(min=1),
              help="Cap on training epochs [default: models/freedom.toml's, with early stopping].")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
def demo(workdir: Path, epochs: int | None, quiet: bool) -> None:
    """The main job on the built-in default: synthetic catalog -> train FREEDOM -> evaluate.

    Needs no downloads. The synthetic features are random projections of hidden item
    factors, so the accuracy shows the pipeline works, not multi-modal quality.
    """
    from cliper_prod.pipeline import run_demo

    run_demo(workdir, progress=not quiet, max_epochs=epochs)


def main() -> None:
    cli(prog_name="cliper-prod")
