"""The built-in synthetic catalog: the default input of the main job, with no downloads.

Items belong to hidden topics; each topic has its own vocabulary (product nouns, colours,
brands, category path) and its own image style (background hue and shape), so text and images
both carry the signal. Users prefer one or two topics and pick items by a softmax over hidden
factors, so a recommender can learn the interactions. Everything comes from one
``numpy.random.default_rng(seed)``: the same spec writes byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

NAME = "synthetic"
TOPICS = [  # (category path, nouns, brands)
    (["Baby", "Feeding", "Bottles"], ["bottle", "nipple", "sippy cup"], ["Milko", "Tendra"]),
    (["Baby", "Diapering", "Wipes"], ["wipe pack", "diaper bag", "changing pad"], ["Softy", "Dryl"]),
    (["Baby", "Nursery", "Bedding"], ["crib sheet", "blanket", "mobile"], ["Dreamo", "Lullo"]),
    (["Baby", "Gear", "Strollers"], ["stroller", "car seat", "carrier"], ["Roamo", "Strida"]),
    (["Baby", "Toys", "Plush"], ["teddy bear", "rattle", "soft block"], ["Cuddle", "Plushy"]),
    (["Baby", "Bathing", "Tubs"], ["bath tub", "hooded towel", "bath toy"], ["Splash", "Aqua"]),
    (["Baby", "Health", "Thermometers"], ["thermometer", "nasal aspirator", "grooming kit"],
     ["Medo", "Carely"]),
    (["Baby", "Safety", "Gates"], ["safety gate", "outlet cover", "corner guard"],
     ["Guardo", "Safey"]),
]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "grey"]
ADJECTIVES = ["soft", "compact", "durable", "washable", "lightweight", "organic", "classic", "deluxe"]
SHAPES = ["ellipse", "rectangle", "triangle", "diamond"]


@dataclass(frozen=True)
class SyntheticSpec:
    n_users: int = 600
    n_items: int = 400
    n_topics: int = 8
    min_interactions: int = 8
    max_interactions: int = 30
    image_size: int = 64
    feature_dims: tuple[int, int] = (128, 64)  # (image, text) dims of the stand-in feature files
    latent_dim: int = 16
    seed: int = 0

    def validate(self) -> None:
        if min(self.n_users, self.n_items, self.latent_dim, *self.feature_dims) < 1:
            raise ValueError("sizes must be positive")
        if not 1 <= self.n_topics <= len(TOPICS):
            raise ValueError(f"n_topics must be in 1..{len(TOPICS)}")
        if not 3 <= self.min_interactions <= self.max_interactions < self.n_items:
            raise ValueError("need 3 <= min_interactions <= max_interactions < n_items")
        if self.image_size < 16:
            raise ValueError("image_size must be at least 16 pixels")


def _item_record(i: int, topic: int, rng: np.random.Generator) -> dict:
    path, nouns, brands = TOPICS[topic]
    noun, colour = nouns[rng.integers(len(nouns))], COLOURS[(topic + rng.integers(2)) % 8]
    adj = ADJECTIVES[rng.integers(len(ADJECTIVES))]
    item_id = f"SYN{i:05d}"
    record = {
        "item_id": item_id,
        "title": f"{brands[rng.integers(2)]} {adj} {colour} {noun}",
        "brand": brands[rng.integers(2)],
        "categories": [list(path)],
        "description": f"A {adj} {noun} in {colour}. Made for everyday {path[1].lower()} "
                       f"with a {ADJECTIVES[rng.integers(len(ADJECTIVES))]} finish.",
        "image": f"images/{item_id}.png",
    }
    gap = rng.random()
    if gap < 0.015:
        del record["brand"]  # exercises the feature extractor's missing-field policy
    elif gap < 0.03:
        record["description"] = ""
    return record


def _render(topic: int, size: int, rng: np.random.Generator) -> Image.Image:
    hue = np.array([(topic * 97) % 256, (topic * 53 + 80) % 256, (topic * 29 + 160) % 256])
    background = tuple(int(v) for v in np.clip(hue + rng.integers(-20, 21, 3), 0, 255))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    colour = tuple(int(v) for v in 255 - np.array(background))
    lo, hi = (int(v) for v in np.sort(rng.integers(size // 8, size - size // 8, 2)))
    hi = max(hi, lo + size // 4)
    shape = SHAPES[topic % len(SHAPES)]
    if shape == "ellipse":
        draw.ellipse([lo, lo, hi, hi], fill=colour)
    elif shape == "rectangle":
        draw.rectangle([lo, lo, hi, hi], fill=colour)
    elif shape == "triangle":
        draw.polygon([(lo, hi), (hi, hi), ((lo + hi) // 2, lo)], fill=colour)
    else:
        mid = (lo + hi) // 2
        draw.polygon([(mid, lo), (hi, mid), (mid, hi), (lo, mid)], fill=colour)
    return image


def _interactions(spec: SyntheticSpec, topics: np.ndarray, item_lat: np.ndarray,
                  rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(user, item, x_label) rows: each user's picks split about 80/10/10, every item in train."""
    centroids = rng.standard_normal((spec.n_topics, spec.latent_dim))
    rows: list[tuple[int, int, int]] = []
    trained = np.zeros(spec.n_items, dtype=bool)
    for u in range(spec.n_users):
        pref = rng.dirichlet(np.full(spec.n_topics, 0.3))
        lat = pref @ centroids + 0.5 * rng.standard_normal(spec.latent_dim)
        logits = item_lat @ lat / 2.0 + 3.0 * pref[topics]
        p = np.exp(logits - logits.max())
        n = int(rng.integers(spec.min_interactions, spec.max_interactions + 1))
        picks = rng.choice(spec.n_items, size=n, replace=False, p=p / p.sum())
        n_eval = max(1, int(round(0.1 * n)))
        labels = [1] * n_eval + [2] * n_eval + [0] * (n - 2 * n_eval)
        for item, label in zip(picks, labels):
            rows.append((u, int(item), label))
            trained[item] |= label == 0
    for item in np.flatnonzero(~trained):  # a cold item gets one training interaction
        user = int(rng.integers(spec.n_users))
        rows = [r for r in rows if (r[0], r[1]) != (user, item)] + [(user, int(item), 0)]
    return sorted(rows, key=lambda r: (r[0], r[2], r[1]))


def generate_catalog(out_dir: str | os.PathLike[str], spec: SyntheticSpec = SyntheticSpec(),
                     overwrite: bool = False) -> Path:
    """Write the catalog folder (MMRec layout + items.jsonl + images/); return its path.

    Built in a temporary sibling and renamed at the end, so a crash never leaves half a catalog.
    """
    spec.validate()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(tmp, spec)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _write(root: Path, spec: SyntheticSpec) -> None:
    rng = np.random.default_rng(spec.seed)
    topics = rng.integers(spec.n_topics, size=spec.n_items)
    item_lat = rng.standard_normal((spec.n_topics, spec.latent_dim))[topics] \
        + 0.6 * rng.standard_normal((spec.n_items, spec.latent_dim))
    (root / "images").mkdir()
    items = []
    for i, topic in enumerate(topics):
        record = _item_record(i, int(topic), rng)
        _render(int(topic), spec.image_size, rng).save(root / record["image"], format="PNG")
        items.append(record)
    rows = _interactions(spec, topics, item_lat, rng)

    def lines(header: str, body: list[str]) -> str:
        return "\n".join([header, *body]) + "\n"

    (root / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (root / f"{NAME}.inter").write_text(
        lines("userID\titemID\tx_label", [f"{u}\t{i}\t{x}" for u, i, x in rows]))
    (root / "i_id_mapping.csv").write_text(
        lines("asin\titemID", [f"{r['item_id']}\t{i}" for i, r in enumerate(items)]))
    (root / "u_id_mapping.csv").write_text(
        lines("user_id\tuserID", [f"U{u:06d}\t{u}" for u in range(spec.n_users)]))
    for name, dim in zip(("image_feat.npy", "text_feat.npy"), spec.feature_dims):
        proj = rng.standard_normal((spec.latent_dim, dim)) / np.sqrt(spec.latent_dim)
        feat = item_lat @ proj + 0.5 * rng.standard_normal((spec.n_items, dim))
        np.save(root / name, feat.astype(np.float32))
    (root / "README.txt").write_text(
        "Synthetic catalog generated by cliper-prod (cliper_prod.data.synthetic).\n"
        f"Spec: {json.dumps(asdict(spec))}\n"
        "Items have hidden topics and factors; titles, categories, descriptions and the PNG\n"
        "images follow the topic. image_feat.npy and text_feat.npy are random projections of\n"
        "the hidden item factors plus noise: stand-ins with no semantic meaning.\n")


def photo_like_jpeg(rng: np.random.Generator, width: int = 640, height: int = 480,
                    quality: int = 90) -> bytes:
    """A stand-in for a catalog photo as JPEG bytes: smooth lighting gradients, a soft
    low-frequency pattern, sensor noise, a few hard-edged shapes and a patch of fine texture;
    what the decode paths are measured on (tests/test_decode_paths.py, the embed benchmarks)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    colours = rng.uniform(30, 225, (3, 3)).astype(np.float32)
    waves = np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y))
    arr = (colours[0] + x[..., None] * (colours[1] - colours[0])
           + y[..., None] * (colours[2] - colours[0]) + 15 * waves[..., None])
    arr += rng.normal(0, 4, arr.shape).astype(np.float32)
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        x0, x1 = np.sort(rng.integers(0, width, 2))
        y0, y1 = np.sort(rng.integers(0, height, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    side = min(width, height) // 4
    left, top = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    stripes = (np.indices((side, side)).sum(0) % 4 < 2)[..., None] * np.uint8(200)
    image.paste(Image.fromarray(np.repeat(stripes, 3, axis=2)), (left, top))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
