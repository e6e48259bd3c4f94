"""``cliper-prod export``: a trained checkpoint -> a self-verifying ONNX/TorchScript bundle."""

from __future__ import annotations

from pathlib import Path

import click

from cliper_prod.commands.common import (DEFAULT_EXPORTS, backbone_option, given_options,
                                         quiet_option)
from cliper_prod.errors import ConfigError


def smoothing(value: str) -> int | None:
    """``--student-smoothing``: a neighbour count, or None for 'auto'."""
    if value == "auto":
        return None
    if value.isascii() and value.isdigit():
        return int(value)
    raise click.BadParameter(f"expected a count of neighbours (0, 100, ...) or 'auto', got "
                             f"{value!r}")


@click.command("export")
@backbone_option(default="freedom", show_default=True,
                 help="Backbone of the checkpoint (checked).")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="Folder written by `cliper-prod train`.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="The training data, if it moved since training.")
@click.option("--clip", "clip_source", metavar="DIR|HUB_ID",
              help="CLIP checkpoint for the feature graphs [default: the one the model's "
                   "CLIPER features were embedded with; none for vanilla features].")
@click.option("--random-init", is_flag=True,
              help="Build the CLIP from its config with RANDOM weights (plumbing only).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), metavar="DIR",
              help=f"Bundle folder [default: {DEFAULT_EXPORTS}/<backbone>].")
@click.option("--max-k", type=click.IntRange(min=1), default=100, show_default=True,
              help="Most items per user the top-K graph returns (topk -k may ask for fewer).")
@click.option("--chunk-items", type=click.IntRange(min=1), default=1 << 16, show_default=True,
              help="Items scored at a time by the top-K graph (exact; bounds its memory to "
                   "batch x chunk instead of batch x catalog).")
@click.option("--candidates", type=click.IntRange(min=1),
              help="Items the top-K graph's GPU form re-scores in fp32 after its fp16 pass "
                   "[default: max(4 x max-k, 2048)]; more is safer against fp16 near-ties.")
@click.option("--candidate-blocks", type=click.IntRange(min=1), default=1, show_default=True,
              help="Blocks the GPU form picks candidates in: 1 is one TopK per user, more is "
                   "a two-level TopK with more parallel work for a GPU (slower on a CPU).")
@click.option("--no-gpu-form", is_flag=True,
              help="Skip the top-K graph's GPU form (topk.gpu.onnx).")
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True,
              help="ONNX opset of every graph.")
@click.option("--no-fp16", is_flag=True, help="Skip the fp16 variants of the CLIP graphs.")
@click.option("--no-torchscript", is_flag=True, help="Skip the TorchScript twins.")
@click.option("--cold-student", is_flag=True,
              help="Also train the cold-start content student against the model's served "
                   "scores (seconds to minutes on a CPU) and store it: add-items then places "
                   "new items so that they compete with trained ones, for every backbone.")
@click.option("--student-epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="The student's epochs (each at most 200 batches of 1024 interactions).")
@click.option("--student-smoothing", default="100", show_default=True, metavar="N|auto",
              callback=lambda ctx, param, value: smoothing(value),
              help="Teach each trained item the mean vector of its N nearest items by content "
                   "(0: its own vector, for content that knows each item's audience), or "
                   "'auto': 0 or 100, whichever places trained items held out from the student "
                   "better (about three times the student's training time).")
@click.option("--no-fused", is_flag=True,
              help="Skip the ONNX Runtime-optimized (fused attention) CLIP graphs.")
@click.option("--no-int8", is_flag=True,
              help="Skip the dynamically quantised int8 CLIP graphs (kept where they are within "
                   "cosine 0.99 of PyTorch; run on the CPU by default where they measured "
                   "faster).")
@quiet_option("No progress (bar or log lines).")
@click.pass_context
def command(ctx: click.Context, backbone: str, checkpoint: Path, data_dir: Path | None,
            clip_source: str | None,
            random_init: bool, out_dir: Path | None, max_k: int, chunk_items: int,
            candidates: int | None, candidate_blocks: int, no_gpu_form: bool, opset: int,
            no_fp16: bool,
            no_torchscript: bool, cold_student: bool, student_epochs: int,
            student_smoothing: int | None, no_fused: bool,
            no_int8: bool, quiet: bool) -> None:
    """Export a trained model to a self-verifying ONNX/TorchScript bundle.

    The bundle holds the top-K graph over the final embedding tables (training items
    excluded), the CLIP image tower and the text+fusion graph (fp32, fp16, int8), the tokenizer,
    the id maps, and manifest.json with versions, hashes and the parity measured against
    PyTorch. Export fails if any graph misses the parity bounds.
    """
    from cliper_prod.backbones.cold_student import StudentConfig
    from cliper_prod.export.bundle_writer import GraphOptions, export_bundle
    from cliper_prod.io import check_output

    ignored = given_options(ctx, ("student_epochs", "student_smoothing"))
    if ignored and not cold_student:
        raise ConfigError(f"{', '.join(ignored)}: only with --cold-student (no student is "
                          f"trained without it)")
    out_dir = out_dir or DEFAULT_EXPORTS / backbone
    check_output(out_dir, "bundle")
    options = GraphOptions(max_k=max_k, chunk_items=chunk_items, opset=opset, fp16=not no_fp16,
                           torchscript=not no_torchscript, fused=not no_fused,
                           gpu_form=not no_gpu_form, candidates=candidates,
                           candidate_blocks=candidate_blocks, int8=not no_int8)
    manifest = export_bundle(checkpoint, backbone=backbone, out=out_dir, clip_source=clip_source,
                             random_init=random_init, data_dir=data_dir, options=options,
                             progress=not quiet,
                             student=StudentConfig(epochs=student_epochs,
                                                   smooth_k=student_smoothing)
                             if cold_student else None)
    for name, graph in manifest["graphs"].items():
        figures = ", ".join(f"{variant} cos {p['min_cosine']:.6f} max|d| {p['max_abs']:.1e}"
                            for variant, p in graph["parity"].items())
        click.echo(f"{name}: {figures}")
    if cold_student:
        record = manifest["cold_student"]["params"]
        choice = record.get("smoothing_choice") or {}
        chosen = (f" (held-out recall {choice['recall']})" if choice.get("recall") else "")
        click.echo(f"cold-start student: {record['train_cpu_s']} s CPU, loss "
                   f"{record['epoch_losses'][0]} -> {record['epoch_losses'][-1]}, smoothing "
                   f"{record['config']['smooth_k']}{chosen}")
    click.echo(f"bundle -> {out_dir} ({len(manifest['files'])} files)")
