"""``cliper-prod embed``: a catalog's items -> CLIPER features, in PyTorch or from a bundle."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cliper_prod.commands.common import (PROVIDERS, argument_or_option, device_option,
                                         inter_op_threads_option, precision_option,
                                         quiet_option, strict_option)
from cliper_prod.errors import ConfigError
from cliper_prod.fusion_modes import FUSION_MODES, FUSION_NAMES

if TYPE_CHECKING:  # the command imports its work only when it runs
    from cliper_prod.features.embed import EmbedOptions, Encoder, Runner
    from cliper_prod.runtime.sessions import OrtThreads
    from cliper_prod.features.views import ViewSpec

#: Options a bundle fixes at export: giving one with --bundle is an error, not ignored.
FIXED_IN_BUNDLE = ("random_init", "fusion", "tau", "fields", "no_global_view", "missing_word",
                   "chunk_long_text")


@dataclass(frozen=True)
class EmbedArgs:
    """The command line of ``embed``, checked as a whole (see :meth:`check`)."""

    items: Path
    clip_source: str | None
    bundle_dir: Path | None
    out_dir: Path
    random_init: bool
    fusion: str
    tau: float
    fields: str
    no_global_view: bool
    missing_word: str
    chunk_long_text: bool
    save_views: bool
    batch_size: int
    device: str
    provider: str | None
    precision: str
    intra_op_threads: int
    inter_op_threads: int
    strict: bool
    resume: bool
    shard_items: int
    max_image_pixels: int
    max_text_chars: int
    max_line_bytes: int
    decode: str
    workers: int | None
    decoders: str
    prefetch: int
    out_format: str
    use_ray: bool
    address: str | None
    ray_actors: int | None
    gpus_per_actor: float | None
    quiet: bool

    def check(self, given: set[str]) -> None:
        """Refuse combinations that cannot mean what the user asked, before any model loads;
        ``given`` names the options set on the command line."""
        from cliper_prod.features.embed import check_catalog
        from cliper_prod.io import check_output

        check_output(self.out_dir, "folder")
        check_catalog(self.items, self.out_dir)
        if self.out_format == "parquet":
            from cliper_prod.features.parquet_catalog import arrow

            arrow()
        if (self.clip_source is None) == (self.bundle_dir is None):
            raise ConfigError("pass exactly one of --clip (PyTorch) or --bundle (ONNX Runtime)")
        if (self.address or self.ray_actors or self.gpus_per_actor is not None) \
                and not self.use_ray:
            raise ConfigError("--address, --ray-actors and --gpus-per-actor go with --ray")
        if self.provider is not None and self.bundle_dir is None:
            raise ConfigError("--provider chooses ONNX Runtime's provider for --bundle; with "
                              "--clip the model runs on --device")
        onnx_only = [f"--{name.replace('_', '-')}" for name in
                     ("precision", "intra_op_threads", "inter_op_threads") if name in given]
        if onnx_only and self.bundle_dir is None:
            raise ConfigError(f"{', '.join(onnx_only)}: for --bundle's ONNX Runtime sessions; "
                              f"--clip runs PyTorch")
        if self.use_ray and "decoders" in given:
            raise ConfigError("--decoders chooses this process's image decoders; with --ray the "
                              "Ray workers decode")
        if self.use_ray and self.bundle_dir is None:
            raise ConfigError("--ray runs the exported ONNX graphs: export a bundle "
                              "(`cliper-prod export --clip ...`) and pass --bundle")
        fixed = [f"--{name.replace('_', '-')}" for name in FIXED_IN_BUNDLE if name in given]
        if self.bundle_dir is not None and fixed:
            raise ConfigError(f"{', '.join(fixed)}: fixed in the bundle at export; drop the "
                              f"option(s) or embed with --clip")

    def encoder_and_options(self) -> tuple[Encoder, EmbedOptions]:
        """The encoder (ONNX Runtime bundle or PyTorch towers) and the pipeline's options."""
        from cliper_prod.features.embed import EmbedOptions
        from cliper_prod.features.items import ItemLimits

        if self.bundle_dir is not None:
            from cliper_prod.runtime.bundle_reader import Bundle
            from cliper_prod.runtime.encoder import OnnxEncoder

            encoder = OnnxEncoder(Bundle(self.bundle_dir, self.onnx_provider,
                                         threads=self.threads), self.precision)
            views, fusion, tau = encoder.views, encoder.fusion, encoder.tau
        else:
            from cliper_prod.device import resolve_device
            from cliper_prod.features.clip_towers import ClipTowers

            views, fusion, tau = self._view_spec(), self.fusion, self.tau
            encoder = ClipTowers(self.clip_source, device=resolve_device(self.device),
                                 random_init=self.random_init)
        return encoder, EmbedOptions(
            views=views, fusion=fusion, tau=tau, batch_size=self.batch_size,
            chunk_long_text=self.chunk_long_text, save_views=self.save_views,
            strict=self.strict, shard_items=self.shard_items,
            max_image_pixels=self.max_image_pixels, out_format=self.out_format,
            decode=self.decode, prefetch=self.prefetch, decoders=self.decoders,
            **({"workers": self.workers} if self.workers else {}),
            limits=ItemLimits(max_line_bytes=self.max_line_bytes,
                              max_text_chars=self.max_text_chars))

    def _view_spec(self) -> ViewSpec:
        from cliper_prod.features.views import DEFAULT_TEMPLATES, GLOBAL_TEMPLATE, ViewSpec

        names = tuple(f.strip() for f in self.fields.split(",") if f.strip())
        unknown = [n for n in names if n not in DEFAULT_TEMPLATES]
        if unknown:
            raise ConfigError(f"--fields: unknown field(s) {unknown}; known: "
                              f"{list(DEFAULT_TEMPLATES)}")
        return ViewSpec(fields=names,
                        global_template=None if self.no_global_view else GLOBAL_TEMPLATE,
                        missing_word=self.missing_word)

    @property
    def onnx_provider(self) -> str:
        """The provider of --bundle's sessions: --provider, or --device (its old spelling
        there)."""
        return self.provider or self.device

    @property
    def threads(self) -> OrtThreads:
        from cliper_prod.runtime.sessions import OrtThreads

        return OrtThreads(self.intra_op_threads, self.inter_op_threads)

    def runner(self) -> Runner | None:
        """The Ray Data runner with --ray; None runs in this process."""
        if not self.use_ray:
            return None
        from cliper_prod.runtime.embed_ray import RaySettings, ray_runner

        return ray_runner(self.bundle_dir, RaySettings(self.address, self.ray_actors,
                                                       self.onnx_provider, self.precision,
                                                       self.gpus_per_actor, self.threads))


_FUSION_HELP = "; ".join(f"{m.name}: {m.help}" for m in FUSION_MODES.values())


@click.command("embed")
@click.argument("items_argument", metavar="[ITEMS]", required=False,
                type=click.Path(path_type=Path))
@click.option("--items", type=click.Path(path_type=Path), metavar="PATH",
              help="The catalog: a JSON Lines or Parquet file, or a folder of them (or give it "
                   "as the first argument, ITEMS).")
@click.option("--clip", "clip_source", metavar="DIR|HUB_ID",
              help="PyTorch path: CLIP or Long-CLIP checkpoint, a local folder or a hub id.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="ONNX Runtime path: a bundle written by `cliper-prod export` (its views, "
                   "fusion and tau are fixed at export).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="Output folder (image_feat.npy, text_feat.npy, item_ids.txt, errors.jsonl).")
@click.option("--out-format", type=click.Choice(["npy", "parquet"]), default="npy",
              show_default=True,
              help="parquet: also features.parquet (item_id, image_feat, text_feat) beside the "
                   ".npy files.")
@click.option("--random-init", is_flag=True,
              help="Build the model from the folder's config with RANDOM weights (plumbing only).")
@click.option("--fusion", type=click.Choice(FUSION_NAMES), default="sa", show_default=True,
              help=f"How the view embeddings become one text feature ({_FUSION_HELP}).")
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
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Items encoded per model call.")
@device_option("Where --clip runs (a torch device); with --bundle, the old spelling of "
               "--provider. auto: the GPU when one is usable.")
@click.option("--provider", type=click.Choice(PROVIDERS),
              help="ONNX Runtime provider of --bundle's sessions [default: --device].")
@precision_option("Which exported CLIP graphs to run (--bundle only).")
@click.option("--intra-op-threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ONNX Runtime threads per operator of --bundle's sessions (per Ray actor "
                   "with --ray); 0: ORT's own, every core.")
@inter_op_threads_option("(--bundle only)")
@strict_option(False, "fail (exit 3) at the first item error; nothing is written.",
               "list each bad item in errors.jsonl and go on.")
@click.option("--resume", is_flag=True,
              help="Continue a run that was interrupted (same input and options).")
@click.option("--shard-items", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Items per crash-safe shard: the most work a kill can lose.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=64_000_000,
              show_default=True, help="Larger images are refused before decoding.")
@click.option("--max-text-chars", type=click.IntRange(min=1), default=20_000,
              show_default=True, help="Longer text fields are cut (and reported).")
@click.option("--max-line-bytes", type=click.IntRange(min=1), default=8 << 20,
              show_default=True,
              help="Longer JSONL lines are skipped (and reported); Parquet rows are not bounded "
                   "by it.")
@click.option("--decode", type=click.Choice(["exact", "draft"]), default="exact",
              show_default=True,
              help="exact: CLIPImageProcessor's resize from the full image. draft: JPEGs at least "
                   "twice the model's size are first downscaled while decoding (faster, not "
                   "bit-equal; the path and its cosine bound are named in embed_summary.json).")
@click.option("--workers", type=click.IntRange(min=1),
              help="Image decoders [default: the CPUs this process may use].")
@click.option("--decoders", type=click.Choice(["threads", "processes"]), default="threads",
              show_default=True,
              help="Where images are decoded: threads of this process, or worker processes that "
                   "write the pixels into shared memory (no interpreter lock shared with the "
                   "driver; a worker that dies is reported and its images decoded again). Same "
                   "outputs either way.")
@click.option("--prefetch", type=click.IntRange(min=0), default=2, show_default=True,
              help="Batches decoded ahead of the one being prepared for the graphs.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Distribute reading, image preprocessing and ONNX inference over Ray Data "
                   "(needs --bundle); same outputs byte for byte.")
@click.option("--address", help="Ray cluster to join with --ray (default: start a local one).")
@click.option("--ray-actors", type=click.IntRange(min=1),
              help="Encode actors with --ray [default: one per GPU, else one].")
@click.option("--gpus-per-actor", type=click.FloatRange(min=0),
              help="GPUs Ray gives each encode actor with --ray [default: 1 when the cluster "
                   "has GPUs, else 0].")
@quiet_option("No progress (bar or log lines).")
@click.pass_context
def command(ctx: click.Context, items_argument: Path | None, **params: Any) -> None:
    """Embed the items of a JSON Lines or Parquet file, or of a folder of *.jsonl or *.parquet
    shards read in path order as one catalog, into CLIPER features.

    Each item's text fields become view prompts, CLIP encodes the views and the image, and the
    view-image similarities weight the fusion. Runs CLIP in PyTorch (--clip) or an exported
    bundle on ONNX Runtime (--bundle; no torch needed). Bad items are listed in errors.jsonl
    with the reason; see README for the per-item policy.
    """
    from cliper_prod.features.embed import embed_catalog
    from cliper_prod.io import no_empty_folders_on_failure

    params["items"] = argument_or_option(items_argument, params["items"], "ITEMS", "--items")
    args = EmbedArgs(**params)
    args.check({f.name for f in fields(EmbedArgs)
                if ctx.get_parameter_source(f.name) is click.core.ParameterSource.COMMANDLINE})
    encoder, options = args.encoder_and_options()
    with no_empty_folders_on_failure(args.out_dir):
        summary = embed_catalog(args.items, encoder, args.out_dir, options,
                                progress=not args.quiet, resume=args.resume,
                                runner=args.runner())
    click.echo(f"embedded {summary['embedded']} item(s), skipped {summary['skipped']}, kept with "
               f"a fallback {summary['kept_with_fallback']}, text cut at {encoder.max_tokens} "
               f"tokens for {summary['truncated_items']} -> {args.out_dir}")
    if encoder.random_weights:  # after the work: a run that fails says only why
        click.echo("note: the CLIP has RANDOM weights: the features prove the plumbing, not "
                   "semantic quality.", err=True)
