"""The exported bundle's layout and its manifest, shared by the exporter and the runtime.

A bundle is a folder holding ONNX graphs, their TorchScript twins, the tokenizer, the id maps
and ``manifest.json``. The manifest lists every file with its sha256; the runtime refuses a
bundle whose files are missing or changed, or whose format it does not read. This module is
torch-free: the runtime install (``cliper-prod[runtime]``) imports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from cliper_prod.errors import BundleError

log = logging.getLogger(__name__)

#: 2: the top-K graph scores queries (the user table is a file), takes the excluded
#: (row, item) pairs as inputs and keeps its item table in external data.
#: 3: the manifest holds the sha256 of its own canonical content (:data:`MANIFEST_HASH`).
FORMAT_VERSION = 3
#: Format 2 bundles still open, with every check but the manifest's own hash (they have none):
#: a deployed bundle keeps serving after an upgrade, and re-exporting it adds the hash.
UNHASHED_VERSION = 2
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest_sha256"
IMAGE_GRAPH = "image_encoder"
TEXT_GRAPH = "text_fusion"
TOPK_GRAPH = "topk"
TOKENIZER = "tokenizer.json"
USER_IDS = "user_ids.txt"
ITEM_IDS = "item_ids.txt"
USER_TABLE = "user_embeddings.npy"
ITEM_TABLE = "item_embeddings.npy"
HISTORY_INDPTR = "history_indptr.npy"  # each user's training items, CSR (see histories.py)
HISTORY_ITEMS = "history_items.npy"
FOLD_IN = "fold_in"  # manifest record of the fold-in rules; their arrays are fold_in.<name>.npy
#: Graph variants: as exported, or rewritten by ONNX Runtime's transformer optimizer (fused
#: attention, SkipLayerNormalization, Gelu kinds; contrib ops of the ``com.microsoft`` domain).
PLAIN, FUSED = "plain", "fused"
VARIANTS = (PLAIN, FUSED)
#: The top-K graph's GPU form (``topk.gpu.onnx``, files key ``gpu.fp32``, record ``gpu``): no
#: loop, fp16 candidates re-scored in fp32; its plain graph is the CPU form. Optional: bundles
#: written before it (or with ``--no-gpu-form``) have the CPU form only.
GPU_FORM = "gpu"
#: The image graph's twins that take uint8 pixels [B, 3, H, W] and normalise inside the graph
#: (a quarter of the bytes to move to a GPU); one per plain/fused graph and precision.
UINT8 = "uint8"
UINT8_INPUT = "pixels"
#: Dynamically quantised int8 twins of the CLIP graphs (files key ``int8``, ``fused.int8``;
#: record ``int8`` with the quantiser settings, the parity bound and the CPU latency against
#: fp32 that makes ``auto`` pick them). Optional: bundles before them, or ``--no-int8``.
INT8 = "int8"
#: The precisions a CLIP graph may be written in (``auto`` at run time picks one).
PRECISIONS = ("fp32", "fp16", INT8)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_key(precision: str = "fp32", variant: str = PLAIN) -> str:
    """Key of a graph file in its manifest record's ``files``: ``fp16``, ``fused.fp32``, ..."""
    return precision if variant == PLAIN else f"{variant}.{precision}"


def uint8_key(precision: str = "fp32", variant: str = PLAIN) -> str:
    """Key of a uint8-input twin in ``files``: ``uint8.fp32``, ``uint8.fused.fp16``, ..."""
    return f"{UINT8}.{file_key(precision, variant)}"


def graph_file(name: str, precision: str = "fp32", kind: str = "onnx",
               variant: str = PLAIN) -> str:
    """``image_encoder.onnx``, ``image_encoder.fp16.onnx``, ``image_encoder.fused.fp16.onnx``."""
    parts = [name] + ([variant] if variant != PLAIN else []) + (
        [precision] if precision != "fp32" else [])
    return ".".join(parts + [kind])


def fold_in_file(name: str) -> str:
    """File of one fold-in array: ``fold_in.item_layers.npy``, ..."""
    return f"{FOLD_IN}.{name}.npy"


def manifest_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces, UTF-8) without
    :data:`MANIFEST_HASH`: what the manifest stores in that field, so that editing any value
    (not only a file) is seen as a flipped byte in a table is."""
    content = {key: value for key, value in manifest.items() if key != MANIFEST_HASH}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_manifest(folder: Path, verify_hashes: bool = True) -> dict[str, Any]:
    """The manifest of ``folder``, after checking its format and every listed file."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: bundle folder not found (write one with "
                          f"`cliper-prod export`)")
    if not path.is_file():
        raise BundleError(f"{path}: missing; {folder} is not a complete bundle")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        version, files = manifest["format_version"], manifest["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"{path}: not a bundle manifest ({exc.__class__.__name__})") from None
    if version not in (UNHASHED_VERSION, FORMAT_VERSION):
        raise BundleError(f"{path}: bundle format {version!r} (written by cliper-prod "
                          f"{manifest.get('cliper_prod', '?')}); this cliper-prod reads format "
                          f"{FORMAT_VERSION} (and {UNHASHED_VERSION}): re-export the model with "
                          f"this version")
    if version == UNHASHED_VERSION:
        log.warning("%s: a format %d bundle: its manifest carries no hash of its own values, so "
                    "an edit to them is not detected; re-export it to add one", path,
                    UNHASHED_VERSION)
    elif manifest.get(MANIFEST_HASH) != manifest_hash(manifest):
        raise BundleError(f"{path}: its content differs from its {MANIFEST_HASH}; the manifest "
                          f"was edited after export: re-export the bundle")
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            raise BundleError(f"{file}: listed in the manifest but missing; the bundle is "
                              f"incomplete: re-export it")
        if verify_hashes and sha256_file(file) != expected:
            raise BundleError(f"{file}: sha256 differs from the manifest; the file was changed "
                              f"after export: re-export the bundle")
    return manifest
