"""The image decode paths and the uint8 image graph, each against an independent reference:
the exact path against CLIPImageProcessor's steps written out with PIL and numpy, and through
the CLI against the previous pipeline (float graph, host normalisation, one decoder, no
read-ahead); the draft path within its stated cosine bound; the uint8 twins against the float
graphs and PyTorch; bundles exported before the twins; the driver's options."""

from __future__ import annotations

import io
import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from cliper_prod.bundle_format import UINT8_INPUT, read_manifest, sha256_file
from cliper_prod.commands import cli
from cliper_prod.data.synthetic import photo_like_jpeg
from cliper_prod.errors import ConfigError
from cliper_prod.features.clip_towers import ClipTowers
from cliper_prod.features import bicubic, turbo_jpeg
from cliper_prod.features.embed import EmbedOptions, available_cpus, embed_catalog
from cliper_prod.features.image_preprocess import (DRAFT_MIN_COSINE, ClipImagePreprocessor,
                                                   ImageDecodeError)
from cliper_prod.features.tiny_clip import build_tiny_clip
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.encoder import OnnxEncoder
from cliper_prod.runtime.sessions import session_options
from tests.test_export import FP16, FP32, INT8, assert_parity, unit

OUTPUTS = ("image_feat.npy", "text_feat.npy", "view_feat.npy", "similarity.npy", "item_ids.txt",
           "errors.jsonl")


def naive_clip_pixels(path: Path, pre: ClipImagePreprocessor) -> np.ndarray:
    """CLIPImageProcessor's steps written out again, after EXIF orientation: bicubic resize of
    the shortest edge, centre crop, scale, normalise, channels first (float32 throughout)."""
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = img.size
    new = (pre.size, int(pre.size * h / w)) if w <= h else (int(pre.size * w / h), pre.size)
    arr = np.asarray(img.resize(new, Image.Resampling.BICUBIC), np.float32)
    top, left = (new[1] - pre.crop) // 2, (new[0] - pre.crop) // 2
    arr = arr[top:top + pre.crop, left:left + pre.crop]
    arr = (arr * np.float32(1 / 255) - np.asarray(pre.mean, np.float32)) \
        / np.asarray(pre.std, np.float32)
    return arr.transpose(2, 0, 1)


def write_jpegs(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        paths.append(folder / f"j{i}.jpg")
        paths[-1].write_bytes(photo_like_jpeg(rng, w, h))
    return paths


def test_exact_path_equals_the_processor_steps_bit_for_bit(tmp_path: Path) -> None:
    pre = ClipImagePreprocessor()
    draft = ClipImagePreprocessor(draft=True)
    paths = write_jpegs(tmp_path, [(640, 480), (480, 640), (300, 200), (447, 300)])
    Image.open(paths[0]).save(tmp_path / "p.png")
    rotated = Image.open(paths[0])
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: stored on its side, shown upright (portrait)
    rotated.save(tmp_path / "exif.jpg", exif=exif.tobytes(), quality=90)
    assert ImageOps.exif_transpose(Image.open(tmp_path / "exif.jpg")).size == (480, 640)
    for path in paths + [tmp_path / "p.png", tmp_path / "exif.jpg"]:
        reference = naive_clip_pixels(path, pre)
        assert np.array_equal(pre.load(path), reference), path
        pixels = pre.load(path, uint8=True)
        assert pixels.dtype == np.uint8 and pixels.shape == (3, 224, 224)
        assert np.array_equal(pre.normalise(pixels), reference), path
        # draft only changes JPEGs at least twice the size: not the PNG, not a 300x200 JPEG
        same = path.suffix == ".png" or min(Image.open(path).size) < 2 * pre.size
        assert np.array_equal(draft.load(path), reference) == same, path


@pytest.fixture(scope="module")
def clip224(tmp_path_factory) -> ClipTowers:
    """A tiny random CLIP at CLIP's own 224-pixel input (patch 8: 784 patches)."""
    return ClipTowers(build_tiny_clip(tmp_path_factory.mktemp("clip224") / "c", ["a b"],
                                      image_size=224))


@pytest.fixture(params=["simplejpeg", "pillow"])
def jpeg_decoder(request, monkeypatch) -> str:
    """The draft path's JPEG decoder: libjpeg-turbo through simplejpeg (the fast-decode
    extra), or through Pillow where it is not installed."""
    if request.param == "simplejpeg":
        pytest.importorskip("simplejpeg")
    else:
        monkeypatch.setattr(turbo_jpeg, "simplejpeg", None)
    return request.param


def test_draft_path_stays_within_its_bound(clip224: ClipTowers, tmp_path: Path,
                                           jpeg_decoder: str) -> None:
    paths = write_jpegs(tmp_path, [(640, 480)] * 10 + [(480, 640)] * 2, seed=1)
    exact = np.stack([clip224.preprocess.load(p) for p in paths])
    draft = ClipImagePreprocessor(**{**clip224.preprocess.as_dict(), "draft": True})
    fast = np.stack([draft.load(p, uint8=True) for p in paths])
    a, b = clip224.encode_images(exact), clip224.encode_images(fast)
    assert (unit(a) * unit(b)).sum(1).min() >= DRAFT_MIN_COSINE
    # raw cosines of random-weight embeddings sit close to 1 for any two images; centred on
    # the mean embedding the difference is still small against the spread between images
    centred = (unit(a - a.mean(0)) * unit(b - a.mean(0))).sum(1)
    assert centred.min() >= 0.99
    assert not np.array_equal(a, b)


def jpeg_variants(folder: Path) -> list[Path]:
    """JPEGs as they come: 4:2:0, 4:4:4 and 4:2:2 chroma, progressive, optimised, greyscale,
    CMYK, turned by EXIF or XMP, EXIF upright, too small to reduce, truncated, headers only
    libjpeg-turbo takes; reduced by 2, 4 and 8, odd sizes."""
    rng = np.random.default_rng(7)
    folder.mkdir()
    paths = []
    for w, h in [(640, 480), (481, 643), (1999, 901), (3600, 1800)]:
        img = Image.open(io.BytesIO(photo_like_jpeg(rng, w, h)))
        for i, options in enumerate([{"quality": 90}, {"subsampling": 0}, {"subsampling": 1},
                                     {"progressive": True}, {"optimize": True}]):
            paths.append(folder / f"{w}x{h}-{i}.jpg")
            img.save(paths[-1], **options)
        for mode in ("L", "CMYK"):
            paths.append(folder / f"{w}x{h}-{mode}.jpg")
            img.convert(mode).save(paths[-1])
        for orientation in (6, 1):  # turned; upright as stored
            exif = img.getexif()
            exif[0x0112] = orientation
            paths.append(folder / f"{w}x{h}-exif{orientation}.jpg")
            img.save(paths[-1], exif=exif.tobytes())
        paths.append(folder / f"{w}x{h}-xmp.jpg")  # turned by XMP alone (Pillow reads it too)
        img.save(paths[-1], xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>')
    paths.append(folder / "small.jpg")  # under twice the size: nothing to reduce
    Image.open(io.BytesIO(photo_like_jpeg(rng, 300, 260))).save(paths[-1])
    paths.append(folder / "truncated.jpg")
    paths[-1].write_bytes(paths[0].read_bytes()[:20000])
    # headers libjpeg-turbo reads and Pillow's parser refuses: each must fail as with Pillow
    dpi = io.BytesIO()
    Image.open(paths[0]).save(dpi, "JPEG", dpi=(72, 72))  # JFIF with a density: Pillow skips EXIF
    plain = dpi.getvalue()
    assert plain[2:4] == b"\xff\xe0" and plain[4:6] == b"\x00\x10" and plain[6:10] == b"JFIF"
    not_tiff = b"Exif\x00\x00II\x00\x00\x08\x00\x00\x00\x00\x00"  # no TIFF magic
    cut_short = b"Exif\x00\x00Exif\x00\x00MM\x00*\x00\x00\x00"  # Pillow's reader: struct.error

    def exif(block: bytes) -> bytes:
        return plain[:20] + b"\xff\xe1" + (len(block) + 2).to_bytes(2, "big") + block + plain[20:]

    for name, data in [("hostile-tem", plain[:2] + b"\xff\x01" + plain[2:]),
                       ("hostile-jfif", plain[:2] + b"\xff\xe0\x00\x07JFIF\x00" + plain[20:]),
                       ("hostile-exif", exif(not_tiff)), ("hostile-struct", exif(cut_short))]:
        paths.append(folder / f"{name}.jpg")
        paths[-1].write_bytes(data)
    return paths


def outcome(pre: ClipImagePreprocessor, path: Path) -> np.ndarray | str:
    try:
        return pre.load(path, "img", uint8=True)
    except ImageDecodeError as exc:
        return str(exc)


def test_simplejpeg_gives_pillows_draft_pixels(tmp_path: Path, monkeypatch) -> None:
    """With or without the fast-decode extra, the draft path gives the same bytes and the same
    errors (simplejpeg takes the RGB ones it can; Pillow the rest)."""
    pytest.importorskip("simplejpeg")
    paths = jpeg_variants(tmp_path / "jpegs")
    pre = ClipImagePreprocessor(draft=True)
    taken = [turbo_jpeg.decode_reduced(p.read_bytes(), pre.size, pre.max_pixels) is not None
             for p in paths]
    fast = [outcome(pre, p) for p in paths]
    monkeypatch.setattr(turbo_jpeg, "simplejpeg", None)
    slow = [outcome(pre, p) for p in paths]
    for path, a, b in zip(paths, fast, slow):
        assert type(a) is type(b) and np.array_equal(a, b), path.name
    # the RGB, upright ones (6 per size); not L, CMYK, turned, small, truncated or hostile
    assert [p.name for p, t in zip(paths, taken) if t] == [
        p.name for p in paths if p.stem.split("-")[-1] in ("0", "1", "2", "3", "4", "exif1")]
    got = {p.name: a for p, a in zip(paths, fast)}
    with Image.open(paths[0].parent / "3600x1800-xmp.jpg") as img:  # XMP turns it: so does
        assert img.getexif()[0x0112] == 8  # the draft path, as before
    assert not np.array_equal(got["3600x1800-xmp.jpg"], got["3600x1800-exif1.jpg"])
    assert "truncated" in got["truncated.jpg"]
    assert all(isinstance(got[f"hostile-{k}.jpg"], str) for k in ("tem", "jfif", "exif"))
    assert "corrupt EXIF block" in got["hostile-struct.jpg"]  # an item error, not a crash
    with pytest.raises(ImageDecodeError, match="corrupt EXIF block"):  # on the exact path too
        ClipImagePreprocessor().load(paths[0].parent / "hostile-struct.jpg")


def test_the_draft_path_reads_whole_only_jpegs_of_a_bounded_size(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """A file is read whole for libjpeg-turbo only when it starts as a JPEG and is at most
    MAX_BYTES; others go to Pillow, which reads what it needs (a multi-GB file is not loaded)."""
    png = tmp_path / "a.png"
    Image.new("RGB", (500, 500)).save(png)
    jpg = write_jpegs(tmp_path / "j", [(640, 480)])[0]
    assert turbo_jpeg.read_jpeg(png) is None
    assert turbo_jpeg.read_jpeg(jpg) == jpg.read_bytes()
    stream = io.BytesIO(b"xx" + jpg.read_bytes())
    stream.seek(2)
    assert turbo_jpeg.read_jpeg(stream) == jpg.read_bytes() and stream.tell() == 2
    monkeypatch.setattr(turbo_jpeg, "MAX_BYTES", jpg.stat().st_size - 1)
    assert turbo_jpeg.read_jpeg(jpg) is None
    assert turbo_jpeg.read_jpeg(stream) is None and stream.tell() == 2
    pre = ClipImagePreprocessor(draft=True)  # still decoded, by Pillow
    assert pre.load(jpg, uint8=True).shape == (3, 224, 224)


def naive_bicubic(rgb: np.ndarray, box: tuple[float, float, float, float], size: int
                  ) -> np.ndarray:
    """Antialiased bicubic (Pillow's kernel, a = -0.5, support widened by the scale), one
    output at a time in float64, rows then columns, rounded at the end."""
    def taps(n_in: int, start: float, end: float) -> list[dict[int, float]]:
        scale = (end - start) / size
        widen = max(scale, 1.0)
        out = []
        for j in range(size):
            centre = start + (j + 0.5) * scale
            lo = max(int(centre - 2 * widen + 0.5), 0)
            hi = min(int(centre + 2 * widen + 0.5), n_in)
            w = {i: cubic_kernel((i - centre + 0.5) / widen) for i in range(lo, hi)}
            total = sum(w.values())
            out.append({i: v / total for i, v in w.items()})
        return out

    across, down = taps(rgb.shape[1], box[0], box[2]), taps(rgb.shape[0], box[1], box[3])
    src = rgb.astype(np.float64)
    rows = np.stack([sum(v * src[:, i] for i, v in t.items()) for t in across], axis=1)
    out = np.stack([sum(v * rows[i] for i, v in t.items()) for t in down], axis=0)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def cubic_kernel(x: float) -> float:
    x = abs(x)
    if x < 1:
        return (1.5 * x - 2.5) * x * x + 1
    return ((-0.5 * x + 2.5) * x - 4) * x + 2 if x < 2 else 0.0


@pytest.mark.parametrize("shape", [(240, 320), (320, 240), (300, 450), (225, 1000), (450, 230)])
def test_box_resize_equals_a_naive_bicubic(shape: tuple[int, int]) -> None:
    h, w = shape
    rng = np.random.default_rng(h * w)
    rgb = rng.integers(0, 256, (h, w, 3), np.uint8)
    pre = ClipImagePreprocessor()
    got = pre.crop_pixels(rgb)
    new_w, new_h, left, top = pre._resized(w, h)
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + pre.crop) * sx, (top + pre.crop) * sy)
    want = naive_bicubic(rgb, box, pre.crop)
    diff = np.abs(got.astype(int) - want)
    assert got.shape == (3, 224, 224) and diff.max() <= 1  # float32 vs float64 at a .5
    assert (diff > 0).mean() < 1e-3
    # each product stays on the calling thread (OpenBLAS splits larger ones over its pool)
    plan = bicubic.plan(h, w, box, pre.crop)
    rows = plan.rows[1] - plan.rows[0]
    assert all(rows * (b.out1 - b.out0) * (b.in1 - b.in0) <= bicubic.ONE_THREAD_MACS
               for b in plan.across)
    assert all(pre.crop * (b.out1 - b.out0) * (b.in1 - b.in0) <= bicubic.ONE_THREAD_MACS
               for b in plan.down)
    # a model whose processor resizes with another filter: Pillow's, on the same box
    bilinear = ClipImagePreprocessor(resample=Image.Resampling.BILINEAR)
    pillow = Image.fromarray(rgb).resize((224, 224), Image.Resampling.BILINEAR, box=box)
    assert np.array_equal(bilinear.crop_pixels(rgb), np.asarray(pillow).transpose(2, 0, 1))


def uint8_twins(record: dict) -> dict[str, str]:
    return {k.removeprefix("uint8."): f for k, f in record["files"].items()
            if k.startswith("uint8.")}


def test_uint8_twins_equal_the_float_graphs_and_pytorch(exported: dict[str, Path]) -> None:
    bundle = exported["bundle"]
    record = read_manifest(bundle)["graphs"]["image_encoder"]
    twins = uint8_twins(record)
    assert set(twins) == {"fp32", "fp16", "fused.fp32", "fused.fp16", "int8", "fused.int8"}
    assert record["uint8"]["input"] == UINT8_INPUT
    towers = ClipTowers(exported["clip"])
    pre = towers.preprocess
    pixels = np.random.default_rng(2).integers(0, 256, (6, 3, pre.crop, pre.crop), np.uint8)
    reference = towers.encode_images(pre.normalise(pixels))
    bounds = {"fp32": FP32, "fp16": FP16, "int8": INT8}
    for key, twin in twins.items():
        bound = bounds[key.rpartition(".")[2]]
        assert record["parity"][f"onnx_uint8_{key.replace('.', '_')}"]["min_cosine"] >= \
            bound["min_cosine"]
        got = ort.InferenceSession(str(bundle / twin)).run(None, {UINT8_INPUT: pixels})[0]
        floats = ort.InferenceSession(str(bundle / record["files"][key])).run(
            None, {"pixel_values": pre.normalise(pixels)})[0]
        assert np.array_equal(got, floats), key  # same float32 ops, then the same graph
        assert_parity(reference, got, bound)


def without_uint8(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` as exported before the uint8 twins existed."""
    shutil.copytree(bundle, out)
    data = json.loads((out / "manifest.json").read_text())
    record = data["graphs"]["image_encoder"]
    record.pop("uint8")
    for key in [k for k in record["files"] if k.startswith("uint8.")]:
        name = record["files"].pop(key)
        del record["parity"][f"onnx_{key.replace('.', '_')}"]
        (out / name).unlink()
        del data["files"][name]
    del data["manifest_sha256"]  # format 2, as bundles before the twins were written
    data["format_version"] = 2
    (out / "manifest.json").write_text(json.dumps(data))
    assert all(sha256_file(out / n) == d for n, d in data["files"].items())
    return out


@pytest.fixture(scope="module")
def jpeg_catalog(exported: dict[str, Path], tmp_path_factory) -> Path:
    """The synthetic policy items (PNG images, a missing one, bad lines, a long text) and six
    items with photo-like 640x480 JPEGs."""
    folder = tmp_path_factory.mktemp("jpeg_catalog")
    shutil.copytree(exported["catalog"] / "images", folder / "images")
    write_jpegs(folder / "images", [(640, 480)] * 5 + [(480, 640)], seed=3)
    lines = exported["policy_items"].read_text().splitlines()
    lines += [json.dumps({"item_id": f"J{i}", "title": f"photo {i}", "image": f"images/j{i}.jpg"})
              for i in range(6)]
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "items.jsonl"


def embed(items: Path, bundle: Path, out: Path, *args: str) -> dict:
    res = CliRunner().invoke(cli, ["embed", str(items), "--bundle", str(bundle), "--out",
                                   str(out), "--quiet", "--save-views", "--batch-size", "3",
                                   "--precision", "fp32", *args])
    assert res.exit_code == 0, res.output
    return json.loads((out / "embed_summary.json").read_text())


def test_exact_path_outputs_equal_the_previous_pipeline(exported: dict[str, Path],
                                                        jpeg_catalog: Path,
                                                        tmp_path: Path) -> None:
    """Previous pipeline: float graph with host normalisation (a bundle without twins), one
    decoder, nothing read ahead. Every output byte must match under the new driver."""
    old_bundle = without_uint8(exported["bundle"], tmp_path / "old_bundle")
    assert not OnnxEncoder(Bundle(old_bundle, "cpu")).uint8_pixels
    assert OnnxEncoder(Bundle(exported["bundle"], "cpu")).uint8_pixels
    reference = tmp_path / "reference"
    embed(jpeg_catalog, old_bundle, reference, "--workers", "1", "--prefetch", "0")
    for name, args in [("default", ()), ("threads", ("--workers", "2", "--prefetch", "0")),
                       ("deep", ("--workers", "3", "--prefetch", "4")),
                       ("processes", ("--workers", "2", "--decoders", "processes"))]:
        summary = embed(jpeg_catalog, exported["bundle"], tmp_path / name, *args)
        assert summary["image_decode"]["path"] == "exact"
        for file in OUTPUTS:
            assert (tmp_path / name / file).read_bytes() == (reference / file).read_bytes(), \
                (name, file)


def test_draft_path_through_the_cli(exported: dict[str, Path], jpeg_catalog: Path,
                                    tmp_path: Path) -> None:
    exact, draft = tmp_path / "exact", tmp_path / "draft"
    embed(jpeg_catalog, exported["bundle"], exact)
    summary = embed(jpeg_catalog, exported["bundle"], draft, "--decode", "draft")
    embed(jpeg_catalog, exported["bundle"], tmp_path / "processes", "--decode", "draft",
          "--decoders", "processes", "--workers", "2")
    for file in OUTPUTS:  # the draft path is the same in a worker process
        assert (draft / file).read_bytes() == (tmp_path / "processes" / file).read_bytes()
    assert summary["image_decode"] == {**summary["image_decode"], "path": "draft",
                                       "min_image_cosine_vs_exact": DRAFT_MIN_COSINE}
    for file in ("item_ids.txt", "errors.jsonl"):
        assert (exact / file).read_text() == (draft / file).read_text()
    ids = (exact / "item_ids.txt").read_text().split()
    a, b = np.load(exact / "image_feat.npy"), np.load(draft / "image_feat.npy")
    jpeg = np.array([i.startswith("J") for i in ids])
    assert (unit(a) * unit(b)).sum(1).min() >= DRAFT_MIN_COSINE
    assert np.array_equal(a[~jpeg], b[~jpeg]) and not np.array_equal(a[jpeg], b[jpeg])


def test_the_driver_thread_leaves_tokenising_to_the_decoders(exported: dict[str, Path],
                                                             jpeg_catalog: Path,
                                                             tmp_path: Path) -> None:
    """The driver is the one thread of the pipeline that does not scale with cores: token ids
    are made on the decode threads (with worker processes, on the thread beside them)."""
    encoder = OnnxEncoder(Bundle(exported["bundle"], "cpu"))
    token_ids, threads = encoder.token_ids, set()

    def recorded(texts: list[str]) -> list[list[int]]:
        threads.add(threading.current_thread().name)
        return token_ids(texts)

    encoder.token_ids = recorded
    options = EmbedOptions(views=encoder.views, fusion=encoder.fusion, tau=encoder.tau,
                           batch_size=3, workers=2)
    for kind, prefix in (("threads", "embed-decode"), ("processes", "embed-text")):
        threads.clear()
        embed_catalog(jpeg_catalog, encoder, tmp_path / kind, replace(options, decoders=kind),
                      progress=False)
        assert threads and all(name.startswith(prefix) for name in threads), (kind, threads)


def test_device_inputs_give_the_host_path_outputs(exported: dict[str, Path]) -> None:
    """The CUDA input path (each input copied into an OrtValue of its own, bound as such), run
    on a CPU session: the same outputs as host arrays, batch after batch."""
    bundle = Bundle(exported["bundle"], "cpu")
    host = bundle.graph("image_encoder", uint8=True)
    device = bundle.graph("image_encoder", uint8=True)
    device.device_inputs = True
    crop = OnnxEncoder(bundle).preprocess.crop
    rng = np.random.default_rng(4)
    for n in (3, 3, 2):
        pixels = rng.integers(0, 256, (n, 3, crop, crop), np.uint8)
        assert np.array_equal(device(pixels=pixels)[0], host(pixels=pixels)[0])


def test_driver_settings() -> None:
    import os

    assert EmbedOptions().workers == available_cpus() == len(os.sched_getaffinity(0))
    cuda = session_options(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert cuda.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert cuda.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    cpu = session_options(["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="does not have"):  # unset: ORT default, spinning
        cpu.get_session_config_entry("session.intra_op.allow_spinning")
    with pytest.raises(ConfigError, match="decode must be one of"):
        EmbedOptions(decode="fast")
    # a run started exact is not resumed as draft
    assert EmbedOptions(decode="draft").fingerprint() != EmbedOptions().fingerprint()
