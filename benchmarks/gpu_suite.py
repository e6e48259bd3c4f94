"""Every GPU figure of the package, side by side in one process, one JSON and one table.

    python benchmarks/gpu_suite.py --out DIR            # on the GPU machine
    python benchmarks/gpu_suite.py --out DIR --smoke    # every part on the CPU at tiny sizes
    python benchmarks/gpu_suite.py --out DIR --parts topk   # one part (a few, comma-separated)

(a) FREEDOM on Baby with generated features: a training epoch and a full evaluation on each
    device (cuda and cpu), two epochs each;
(b) the CLIP image tower and the text + SA fusion graph (ViT-B/16 configuration, random
    weights): every ONNX variant the export wrote (plain, fused; fp32, fp16; the image graph's
    uint8-pixel twins; beside the text graph's fused one, whose attention is causal without a
    bias, the same graph with the causal + padding mask as its bias, ``fused.masked``, as
    export wrote it before) on ONNX Runtime, PyTorch eager fp16 and (at the largest batch)
    torch.compile fp16, items/s, each timed the same way twice: ``device`` rows with inputs
    already on the device and outputs left there (ORT through IO binding of device OrtValues),
    ``host`` rows from numpy arrays to numpy arrays (both copy in and out); every path is warm
    (one untimed call) before timing;
(c) end-to-end ``embed --bundle`` of generated items with JPEG files, sessions opened and warm
    before the clock starts: steady-state items/s and its ratio to the towers alone; start-up
    (encoder, sessions, first batch) reported apart; a per-stage breakdown: read (catalog
    parsing, one thread), decode (decode + preprocess per image, one thread), tokenise (summed
    over the decode threads that run it), graph
    (both graphs, inputs from the host) as timed inside the run, transfer (one batch's inputs
    copied to the device, alone);
(d) top-K over 1M and 10M x 64 items, K=50, batches of 1, 64 and 1,024 users, every path with
    its inputs already on the device: the bundle's CPU form (one Scan over chunks) and GPU form
    (fp16 candidates re-scored in fp32, in runs of rows as the runtime makes them; chosen in
    one level, and in two over 16 blocks as ``--candidate-blocks 16`` exports it) on ONNX
    Runtime with IO binding (OrtValues on the device, outputs left there), torch.topk over the
    full score matrix in fp32 and fp16, and faiss ``IndexFlatIP`` (faiss-gpu's on a GPU) where
    it imports; p50/p99 ms, the GPU form's recall@K against the CPU form, and each path skipped
    where its memory estimate passes the free memory (the 10M row on a small machine).
(e) where the time of each fused fp16 graph (the text graph in both forms) goes at the largest
    tower batch, inputs on the device: ONNX Runtime's profiler by operator type (its JSON left
    in the output folder), the CUDA kernels behind it (torch's profiler, which sees every
    library's kernels) and the attention kernel ONNX Runtime picks (its debug print, in a
    child process, outside every timed run), beside PyTorch eager fp16's kernels for the same
    module; run last.
Speed does not depend on the weights; no figure here says anything about accuracy. ``--smoke``
runs the same code at tiny sizes on the CPU (the test suite runs it, so the suite cannot rot);
its figures mean nothing. The parts run cheapest first (the profile last) and
``suite_partial.json`` is rewritten after each, so a run cut short by its time limit still
reports what it finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from _report import report
from bench_embed import (SKELETON, feature_bundle, masked_fused_text, tower_inputs,
                         vit_b16_folder, write_catalog)

from cliper_prod import __version__
from cliper_prod.bundle_format import IMAGE_GRAPH, MANIFEST, TEXT_GRAPH
from cliper_prod.config import load_config
from cliper_prod.data.mmrec import load_dataset
from cliper_prod.export.bundle_writer import TOPK_INPUTS, topk_spec
from cliper_prod.runtime.topk_forms import GPU_MATRIX_BYTES
from cliper_prod.export.graphs import export_onnx
from cliper_prod.features.clip_towers import ClipTowers
from cliper_prod.features import turbo_jpeg
from cliper_prod.features.embed import EmbedOptions, embed_catalog
from cliper_prod.features.fusion import ViewFusion
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.encoder import OnnxEncoder
from cliper_prod.runtime.providers import choose_providers
from cliper_prod.runtime.sessions import Graph, session_options
from cliper_prod.histories import history_pairs, training_csr
from cliper_prod.io import write_json
from cliper_prod.scoring import CandidateTopKScorer, TopKScorer
from cliper_prod.training import Trainer

BABY = SKELETON.parents[1] / "data" / "amazon" / "baby"


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the GPU run's sizes, or tiny ones for ``--smoke``."""

    tower_batches: tuple[int, ...] = (64, 256)
    compile_batches: tuple[int, ...] = (256,)  # torch.compile costs a compilation per shape
    embed_items: int = 16384  # start-up is timed apart; steady state needs a long run
    embed_batch: int = 256
    topk_items: tuple[int, ...] = (1_000_000, 10_000_000)
    topk_dim: int = 64
    topk_batches: tuple[int, ...] = (1, 64, 1024)
    topk_blocks: tuple[int, ...] = (1, 16)  # the GPU form's candidate blocks; 1 comes first
    topk_k: int = 50
    train_epochs: int = 2
    repeats: int = 10
    compile_backend: str = "inductor"


SMOKE = Sizes(tower_batches=(2,), compile_batches=(2,), embed_items=8, embed_batch=4,
              topk_items=(2000, 5000), topk_dim=16, topk_batches=(1, 4, 32),
              topk_blocks=(1, 2), topk_k=10,
              train_epochs=1, repeats=2,
              compile_backend="eager")


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None
          ) -> list[float]:
    """Seconds of each of ``repeats`` calls after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def devices() -> list[str]:
    return ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def part_training(data_dir: Path, sizes: Sizes) -> dict:
    """(a) FREEDOM: seconds per training epoch and per full evaluation, per device."""
    data = load_dataset(data_dir)
    config = load_config("freedom")
    out = {}
    for device in devices():
        trainer = Trainer("freedom", data, config, progress=False, device=device)
        epochs, evals = [], []
        for epoch in range(sizes.train_epochs):
            start = time.perf_counter()
            trainer.train_epoch(epoch)
            cuda_sync()
            epochs.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer.valid_epoch()
            cuda_sync()
            evals.append(time.perf_counter() - start)
        out[device] = {"train_epoch_s": epochs, "evaluation_s": evals}
    return {"dataset": data.summary(), "per_device": out}


INPUTS = ("device", "host")  # where each timed call finds its inputs and leaves its outputs


def _on_device(session: onnxruntime.InferenceSession, device: str,
               feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """One ORT call with its inputs already in device OrtValues and outputs left on the
    device: the same work as PyTorch on device tensors."""
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, onnxruntime.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(array), device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, device)
    return lambda: session.run_with_iobinding(binding)


def _onnx_paths(bundle_dir: Path, graph: str, providers: list[str], inputs: dict, where: str,
                extra: dict[str, str]) -> dict[str, Callable[[], object]]:
    """One timed call per ONNX variant the export wrote for ``graph``, and per ``extra`` file
    (variant -> file name in ``bundle_dir``)."""
    files = json.loads((bundle_dir / MANIFEST).read_text())["graphs"][graph]["files"]
    paths = {}
    for variant, name in {**files, **extra}.items():
        if not name.endswith(".onnx"):
            continue
        session = Graph(bundle_dir / name, providers)
        feeds = {k: inputs[k] for k in session.input_names}
        paths[f"ort_{variant}"] = _on_device(session.session, session.device, feeds) \
            if where == "device" \
            else lambda s=session, f=feeds: s(**f)
    return paths


def _torch_paths(module: torch.nn.Module, args: tuple, device: str, backend: str | None,
                 where: str) -> dict[str, Callable[[], object]]:
    """PyTorch eager and (given a ``backend``) torch.compile at half precision on ``device``;
    ``host``: from numpy arrays (copied in) to numpy arrays (copied out)."""
    half = torch.float16
    module = copy.deepcopy(module).to(device=device, dtype=half).eval()

    def to_device(a: torch.Tensor) -> torch.Tensor:
        return a.to(device=device, dtype=half) if a.is_floating_point() else a.to(device)

    resident = tuple(to_device(a) for a in args)
    host = tuple(a.numpy() for a in args)

    def run(m: torch.nn.Module) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode():
                if where == "device":
                    return m(*resident)
                out = m(*(to_device(torch.from_numpy(a)) for a in host))
                return [t.float().cpu().numpy() for t in (out if isinstance(out, tuple)
                                                          else (out,))]
        return call
    paths = {"torch_eager_fp16": run(module)}
    if backend is not None:
        paths["torch_compile_fp16"] = run(torch.compile(module, backend=backend))
    return paths


def part_towers(clip_dir: Path, bundle_dir: Path, sizes: Sizes, providers: list[str]) -> list:
    """(b) items/s of the image tower and the text + SA graph, every path side by side."""
    device = devices()[0]
    towers = ClipTowers(clip_dir, device="cpu", random_init=True)
    extra = {TEXT_GRAPH: masked_fused_text(clip_dir, bundle_dir)}
    rows = []
    for batch in sizes.tower_batches:
        inputs = tower_inputs(towers, batch)
        t = {k: torch.from_numpy(v) for k, v in inputs.items()}
        for graph, module, args in (
                (IMAGE_GRAPH, towers.image_tower, (t["pixel_values"],)),
                (TEXT_GRAPH, towers.view_encoder(ViewFusion("sa", 0.1)),
                 (t["input_ids"], t["attention_mask"], t["image_embedding"], t["has_image"],
                  t["has_text"]))):
            backend = sizes.compile_backend if batch in sizes.compile_batches else None
            for where in INPUTS:
                paths = {**_onnx_paths(bundle_dir, graph, providers, inputs, where,
                                       extra.get(graph, {})),
                         **_torch_paths(module, args, device, backend, where)}
                row = {"graph": graph, "batch": batch, "inputs": where}
                for name, fn in paths.items():
                    row[name] = batch / statistics.median(timed(fn, sizes.repeats, cuda_sync))
                rows.append(row)
                print(row, flush=True)
    return rows


PROFILED_RUNS = 5
KERNEL_INFO = "ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO"  # ONNX Runtime names its attention kernels


def _ort_ops(path: Path, providers: list[str], feeds: dict[str, np.ndarray], out: Path
             ) -> tuple[dict[str, float], Callable[[], object]]:
    """ONNX Runtime's profiler over :data:`PROFILED_RUNS` warm runs with inputs on the device:
    ms per run by operator type (on CUDA the host side of each launch; the device's time is in
    :func:`_cuda_kernels`), and the bound call, for more runs. The profile's JSON is left in
    ``out``."""
    options = session_options(providers)
    options.enable_profiling = True
    options.profile_file_prefix = str(out / f"ort_profile_{path.stem}")
    session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    run = _on_device(session, device, {i.name: feeds[i.name] for i in session.get_inputs()})
    run()  # warm: cuDNN's algorithm search, first allocations
    for _ in range(PROFILED_RUNS):
        run()
    events = json.loads(Path(session.end_profiling()).read_text())
    timed_from = sorted(e["ts"] for e in events if e.get("name") == "model_run")[1]
    ops: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") \
                and e["ts"] >= timed_from:  # the warm run left out
            ops[e["args"]["op_name"]] = ops.get(e["args"]["op_name"], 0.0) + e["dur"] / 1000
    return ({op: ms / PROFILED_RUNS for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])},
            run)


def _cuda_kernels(run: Callable[[], object], top: int = 12) -> dict[str, float]:
    """ms per run of the ``top`` costliest CUDA kernels ``run`` launches (after one warm call),
    by torch's profiler (CUPTI sees every library's kernels in the process: ONNX Runtime's
    too); {} without a GPU, an error where the profiler saw none on one."""
    if not torch.cuda.is_available():
        return {}
    from torch.profiler import ProfilerActivity, profile

    run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_RUNS):
            run()
        torch.cuda.synchronize()
    totals = {e.key: e.device_time_total / 1000 / PROFILED_RUNS for e in prof.key_averages()}
    kernels = sorted(((k, v) for k, v in totals.items() if v > 0), key=lambda kv: -kv[1])
    if not kernels:
        raise RuntimeError("torch's profiler recorded no CUDA kernel (CUPTI unavailable?)")
    return dict(kernels[:top])


def _attention_kernels(paths: dict[str, Path], feeds: Path) -> dict[str, list[str]]:
    """The attention kernel ONNX Runtime picks for each graph's Attention nodes, from its debug
    print, in a child process (the print runs on every call: kept out of every timed run)."""
    child = subprocess.run([sys.executable, __file__, "--attention-kernels", str(feeds),
                            *(str(p) for p in paths.values())], capture_output=True, text=True,
                           env={**os.environ, KERNEL_INFO: "1"}, timeout=300)
    if child.returncode:
        raise RuntimeError(child.stderr[-500:])
    found: dict[str, list[str]] = {label: [] for label in paths}
    labels = iter(paths)
    label = None
    for line in child.stdout.splitlines():
        if line.startswith("== "):
            label = next(labels)
        elif label is not None and "Attention" in line and line not in found[label]:
            found[label].append(line.strip()[:300])
    return found


def run_each_once(feeds: Path, graphs: list[str]) -> None:
    """The child of :func:`_attention_kernels`: each graph once, on the best provider."""
    arrays = dict(np.load(feeds))
    providers = choose_providers("auto")
    for path in graphs:
        print(f"== {path}", flush=True)
        session = onnxruntime.InferenceSession(path, session_options(providers),
                                               providers=providers)
        session.run(None, {i.name: arrays[i.name] for i in session.get_inputs()})
        sys.stdout.flush()


def _guarded(record: dict, key: str, work: Callable[[], object]) -> None:
    """``record[key]`` = what ``work`` returns, or ``record[key + "_error"]``: one figure's
    failure must not cost the others (nor the suite's report)."""
    try:
        record[key] = work()
    except Exception as exc:
        record[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:500]


def part_profile(clip_dir: Path, bundle_dir: Path, sizes: Sizes, providers: list[str],
                 out: Path) -> dict:
    """Where each fused fp16 graph's time goes at the largest tower batch, inputs on the device
    (ONNX Runtime's operators, the CUDA kernels behind them, the attention kernel it picks),
    beside PyTorch eager fp16's kernels for the same module: what to act on for the towers."""
    batch = max(sizes.tower_batches)
    towers = ClipTowers(clip_dir, random_init=True)
    inputs = tower_inputs(towers, batch, encode=False)  # speed does not depend on the values
    files = json.loads((bundle_dir / MANIFEST).read_text())["graphs"]
    masked = masked_fused_text(clip_dir, bundle_dir)["fused.masked.fp16"]
    onnx_paths = {f"{IMAGE_GRAPH} ort fused.fp16": files[IMAGE_GRAPH]["files"]["fused.fp16"],
                  f"{TEXT_GRAPH} ort fused.fp16": files[TEXT_GRAPH]["files"]["fused.fp16"],
                  f"{TEXT_GRAPH} ort fused.masked.fp16": masked}
    result: dict = {"batch": batch, "runs": PROFILED_RUNS, "paths": {}}
    for label, name in onnx_paths.items():
        record = result["paths"][label] = {}
        _guarded(record, "ort", lambda: _ort_ops(bundle_dir / name, providers, inputs, out))
        if "ort" in record:
            record["ort_ops_ms"], run = record.pop("ort")
            _guarded(record, "cuda_kernels_ms", lambda: _cuda_kernels(run))
    small = bundle_dir.parent / "attention_feeds.npz"
    np.savez(small, **tower_inputs(towers, 2, encode=False))
    _guarded(result, "attention_kernels", lambda: _attention_kernels(
        {label: bundle_dir / name for label, name in onnx_paths.items()}, small))
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    for label, module, args in (
            (f"{IMAGE_GRAPH} torch eager fp16", towers.image_tower, (t["pixel_values"],)),
            (f"{TEXT_GRAPH} torch eager fp16", towers.view_encoder(ViewFusion("sa", 0.1)),
             (t["input_ids"], t["attention_mask"], t["image_embedding"], t["has_image"],
              t["has_text"]))):
        record = result["paths"][label] = {}
        _guarded(record, "cuda_kernels_ms", lambda: _cuda_kernels(_torch_paths(
            module, args, devices()[0], None, "device")["torch_eager_fp16"]))
    return result


class StageClock:
    """The encoder of a run with its tokeniser and graphs timed (seconds, summed)."""

    def __init__(self, encoder: OnnxEncoder) -> None:
        self.encoder, self.seconds = encoder, {"tokenise": 0.0, "graph": 0.0}
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> object:
        return getattr(self.encoder, name)

    def _timed(self, stage: str, fn: Callable, *args, **kwargs) -> object:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        with self.lock:  # token ids come from several decode threads
            self.seconds[stage] += time.perf_counter() - start
        return out

    def token_ids(self, *args, **kwargs) -> object:  # on the decode threads: summed over them
        return self._timed("tokenise", self.encoder.token_ids, *args, **kwargs)

    def pack(self, *args, **kwargs) -> object:
        return self._timed("tokenise", self.encoder.pack, *args, **kwargs)

    def encode_images(self, *args, **kwargs) -> object:
        return self._timed("graph", self.encoder.encode_images, *args, **kwargs)

    def encode_views(self, *args, **kwargs) -> object:
        return self._timed("graph", self.encoder.encode_views, *args, **kwargs)


def part_embed(bundle_dir: Path, workdir: Path, sizes: Sizes, towers_items_per_s: float
               ) -> dict:
    """(c) the whole ``embed --bundle`` job: JSONL -> JPEG decode -> graphs -> files, timed
    with warm sessions; start-up and the stages apart."""
    items = write_catalog(workdir / "catalog", sizes.embed_items)
    warm = write_catalog(workdir / "warm", sizes.embed_batch)
    start = time.perf_counter()
    encoder = OnnxEncoder(Bundle(bundle_dir, "auto"), "fp16")
    options = EmbedOptions(views=encoder.views, fusion=encoder.fusion, tau=encoder.tau,
                           batch_size=sizes.embed_batch)
    embed_catalog(warm, encoder, workdir / "warm_features", options, progress=False)
    startup_s = time.perf_counter() - start
    clock = StageClock(encoder)
    start = time.perf_counter()
    embed_catalog(items, clock, workdir / "features", options, progress=False)
    wall_s = time.perf_counter() - start
    rate = sizes.embed_items / wall_s
    draft = replace(options, decode="draft")  # DCT-domain downscale first (libjpeg-turbo when
    start = time.perf_counter()               # the fast-decode extra is installed)
    embed_catalog(items, encoder, workdir / "features_draft", draft, progress=False)
    draft_rate = sizes.embed_items / (time.perf_counter() - start)
    stages = {"wall_s": wall_s, "read_s_one_thread": _read_s(items, options),
              "decode_s_one_thread": _decode_s(items, encoder, sizes.embed_items),
              **{f"{k}_s": v for k, v in clock.seconds.items()},
              "transfer_s_alone": _transfer_s(encoder, sizes)}
    return {"items": sizes.embed_items, "items_per_s": rate, "startup_s": startup_s,
            "decode_workers": options.workers, "stages": stages,
            "ratio_to_towers_alone": rate / towers_items_per_s,
            "draft_items_per_s": draft_rate, "draft_libjpeg_turbo": turbo_jpeg.available(),
            "draft_ratio_to_towers_alone": draft_rate / towers_items_per_s}


def _read_s(items: Path, options: EmbedOptions) -> float:
    """Seconds to parse the whole catalog, one thread."""
    from cliper_prod.features.catalog import Catalog, read_catalog

    start = time.perf_counter()
    for _ in read_catalog(Catalog.at(items), options.limits, 0, set()):
        pass
    return time.perf_counter() - start


def _decode_s(items: Path, encoder: OnnxEncoder, n_items: int) -> float:
    """Seconds to decode and preprocess the catalog's images, one thread (from 32 timed)."""
    files = sorted((items.parent / "img").glob("*.jpg"))
    start = time.perf_counter()
    for f in files:
        encoder.preprocess.load(f, uint8=True)
    return (time.perf_counter() - start) / len(files) * n_items


def _transfer_s(encoder: OnnxEncoder, sizes: Sizes) -> float:
    """Seconds to copy every batch's pixels (uint8 where the bundle has the twin) and token
    arrays to the image graph's device, alone."""
    size = encoder.preprocess.crop
    dtype = np.uint8 if encoder.uint8_pixels else np.float32
    arrays = [np.zeros((sizes.embed_batch, 3, size, size), dtype),
              np.zeros((2, sizes.embed_batch, 5, encoder.max_tokens), np.int64)]
    device = encoder.image_graph.device
    start = time.perf_counter()
    for a in arrays:
        onnxruntime.OrtValue.ortvalue_from_numpy(a, device, 0).shape()
    return (time.perf_counter() - start) * -(-sizes.embed_items // sizes.embed_batch)


PARTS = ("training", "topk", "towers", "embed", "profile")  # the order they run in
TOPK_PATHS = ("ort_cpu_form", "ort_gpu_form", "torch_topk_fp32", "torch_topk_fp16",
              "faiss_flat_ip")


def gpu_form(blocks: int) -> str:
    """The path name of the GPU form choosing its candidates in ``blocks`` blocks."""
    return "ort_gpu_form" if blocks == 1 else f"ort_gpu_form_{blocks}_blocks"


def free_bytes(device: str) -> int:
    """Memory a path may take: free GPU memory, or the host's MemAvailable."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    meminfo = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024


def _ort_bound(graph: Graph, feeds: list[dict[str, np.ndarray]]) -> Callable[[], list]:
    """One call running ``graph`` on each of ``feeds`` in turn with IO binding: inputs copied to
    the session's device once, here, as OrtValues; outputs left on the device (synchronised,
    so a timing covers the work)."""
    bindings = []
    for feed in feeds:
        binding = graph.session.io_binding()
        for name, array in feed.items():
            value = onnxruntime.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array),
                                                            graph.device, 0)
            binding.bind_ortvalue_input(name, value)
        for name in graph.output_names:
            binding.bind_output(name, graph.device)
        bindings.append(binding)

    def run() -> list:
        for binding in bindings:
            graph.session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        return bindings
    return run


def _faiss_flat(items: np.ndarray, queries: torch.Tensor, k: int, device: str
                ) -> Callable[[int], Callable[[], object]] | str:
    """faiss exact inner-product search of the first ``batch`` queries, held on ``device``
    (one call per batch size), or why there is none."""
    try:
        import faiss
    except ImportError:
        return "faiss does not import"
    if device == "cuda":
        if not hasattr(faiss, "StandardGpuResources"):
            return "faiss without GPU support"
        import faiss.contrib.torch_utils  # noqa: F401  (searches with torch CUDA tensors)

        index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), items.shape[1])
    else:
        index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    queries = queries if device == "cuda" else queries.cpu().numpy()
    return lambda batch: lambda: index.search(queries[:batch], k)


def _topk_catalog(workdir: Path, n_items: int, sizes: Sizes, providers: list[str]
                  ) -> list[dict]:
    """The rows of (d) for one catalog size: every batch size, every path that fits."""
    device = devices()[0]
    d, k = sizes.topk_dim, sizes.topk_k
    if 40 * n_items * d > free_bytes("cpu"):  # tables, export copies, sessions (host)
        return [{"items": n_items, "skipped": "host memory"}]
    gen = torch.Generator().manual_seed(0)
    n_users = max(sizes.topk_batches)
    users = torch.randn(n_users, d, generator=gen)
    items = torch.randn(n_items, d, generator=gen)
    pairs = np.stack([np.arange(n_users), np.arange(n_users) % n_items], 1)
    csr = training_csr(pairs, n_users)
    forms = {"ort_cpu_form": TopKScorer(items, k, 1 << 16)} | {
        gpu_form(blocks): CandidateTopKScorer(items, k, blocks=blocks)
        for blocks in sizes.topk_blocks}
    graphs = {}
    for name, scorer in forms.items():
        export_onnx(topk_spec(scorer.eval()), workdir / f"{name}_{n_items}.onnx")
        graphs[name] = Graph(workdir / f"{name}_{n_items}.onnx", providers)
    del forms  # the modules' tables
    rows_per_run = max(1, GPU_MATRIX_BYTES // (4 * n_items))
    on_device = users.to(device)
    table = {dtype: items.to(device=device, dtype=dtype) for dtype in (torch.float32,
                                                                       torch.float16)}
    faiss_flat = (_faiss_flat(items.numpy(), on_device, k, device)
                  if 4 * n_items * d < free_bytes(device) else "memory")
    out = []
    for batch in sizes.topk_batches:
        query = np.arange(batch)
        feeds = dict(zip(TOPK_INPUTS, (users.numpy()[query], *history_pairs(*csr, query))))
        pieces = [dict(zip(TOPK_INPUTS, (users.numpy()[query[s:s + rows_per_run]],
                                         *history_pairs(*csr, query[s:s + rows_per_run]))))
                  for s in range(0, batch, rows_per_run)]
        need = {"ort_cpu_form": 4 * n_items * d + 12 * batch * (1 << 16)} | {
            gpu_form(blocks): 6 * n_items * d + (4 if device == "cuda" else 12) *
            min(batch, rows_per_run) * n_items for blocks in sizes.topk_blocks} | {
                "torch_topk_fp32": 8 * batch * n_items, "torch_topk_fp16": 4 * batch * n_items,
                "faiss_flat_ip": 4 * n_items * d}
        row: dict = {"items": n_items, "batch": batch, "rows_per_gpu_form_run": rows_per_run,
                     "skipped": {name: "memory" for name, bytes_ in need.items()
                                 if bytes_ > free_bytes(device)}}
        paths: dict[str, Callable[[], object]] = {}
        for name in graphs:
            runs = [feeds] if name == "ort_cpu_form" else pieces
            if name not in row["skipped"]:
                paths[name] = _ort_bound(graphs[name], runs)
        for name, dtype in (("torch_topk_fp32", torch.float32),
                            ("torch_topk_fp16", torch.float16)):
            if name not in row["skipped"]:
                q, t = on_device[:batch].to(dtype), table[dtype]
                paths[name] = lambda q=q, t=t: torch.topk(q @ t.T, k, dim=1)
        if isinstance(faiss_flat, str):
            row["skipped"]["faiss_flat_ip"] = faiss_flat
        elif "faiss_flat_ip" not in row["skipped"]:
            paths["faiss_flat_ip"] = faiss_flat(batch)
        for name, fn in paths.items():
            ms = np.asarray(timed(fn, sizes.repeats * 5, cuda_sync)) * 1e3
            row[name] = {"p50_ms": float(np.percentile(ms, 50)),
                         "p99_ms": float(np.percentile(ms, 99))}
        if {"ort_cpu_form", "ort_gpu_form"} <= set(paths):
            cpu_items, gpu_items = (np.concatenate([b.copy_outputs_to_cpu()[0]
                                                    for b in paths[name]()])
                                    for name in ("ort_cpu_form", "ort_gpu_form"))
            row["gpu_form_recall_vs_cpu_form"] = float(np.mean(
                [np.isin(a, b).mean() for a, b in zip(cpu_items, gpu_items)]))
        out.append(row)
        print(row, flush=True)
    return out


def part_topk(workdir: Path, sizes: Sizes, providers: list[str]) -> dict:
    """(d) p50/p99 ms of one top-K batch per path, batch size and catalog size (see the module
    docstring); torch.topk and faiss leave training items in (the graphs take them out)."""
    rows = [row for n_items in sizes.topk_items
            for row in _topk_catalog(workdir, n_items, sizes, providers)]
    return {"dim": sizes.topk_dim, "k": sizes.topk_k, "rows": rows}


def machine() -> dict:
    """GPU, driver and versions, recorded with every figure."""
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "providers": onnxruntime.get_available_providers(), "cliper_prod": __version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver"] = smi.stdout.strip() or smi.stderr.strip()
    return info


def training_data(workdir: Path, smoke: bool) -> Path:
    """Baby with generated features (the smoke run: the tiny synthetic catalog)."""
    if smoke:
        from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog

        generate_catalog(workdir / "synthetic", SyntheticSpec(n_users=60, n_items=80))
        return workdir / "synthetic"
    from cliper_prod.data.random_features import with_random_features

    with_random_features(BABY, workdir / "baby")
    return workdir / "baby"


def table(result: dict) -> str:
    lines = ["| part | path | figure |", "| --- | --- | --- |"]
    for device, t in result.get("training", {"per_device": {}})["per_device"].items():
        lines.append(f"| (a) FREEDOM | {device} | epoch {statistics.median(t['train_epoch_s']):.2f} s, "
                     f"evaluation {statistics.median(t['evaluation_s']):.2f} s |")
    for row in result.get("towers", []):
        for name, value in row.items():
            if name not in ("graph", "batch", "inputs"):
                lines.append(f"| (b) {row['graph']} batch {row['batch']}, {row['inputs']} "
                             f"inputs | {name} | {value:,.0f} items/s |")
    if "embed" in result:  # not with --parts without it
        e = result["embed"]
        lines.append(f"| (c) embed --bundle | {e['items']} items, warm | "
                     f"{e['items_per_s']:,.0f} items/s, {e['ratio_to_towers_alone']:.0%} of the "
                     f"towers alone |")
        lines.append(f"| (c) embed --bundle --decode draft | {e['items']} items, warm, "
                     f"libjpeg-turbo {'yes' if e['draft_libjpeg_turbo'] else 'no (Pillow)'} | "
                     f"{e['draft_items_per_s']:,.0f} items/s, "
                     f"{e['draft_ratio_to_towers_alone']:.0%} of the towers alone |")
        lines.append(f"| (c) start-up | encoder, sessions, first batch | {e['startup_s']:.1f} s |")
        lines.append(f"| (c) stages | {e['decode_workers']} decode workers | " + ", ".join(
            f"{k} {v:.2f}" for k, v in e["stages"].items()) + " |")
    for row in result.get("topk", {"rows": []})["rows"]:
        where = f"(d) top-K, {row['items']:,} items, batch {row.get('batch', '-')}"
        for name in (*TOPK_PATHS, *(gpu_form(b) for b in result["sizes"]["topk_blocks"][1:])):
            if name in row:
                lines.append(f"| {where} | {name} | p50 {row[name]['p50_ms']:.2f} ms, p99 "
                             f"{row[name]['p99_ms']:.2f} ms |")
        for name, why in ({"all": row["skipped"]} if isinstance(row["skipped"], str)
                          else row["skipped"]).items():
            lines.append(f"| {where} | {name} | skipped ({why}) |")
        if "gpu_form_recall_vs_cpu_form" in row:
            lines.append(f"| {where} | GPU form recall@K vs CPU form | "
                         f"{row['gpu_form_recall_vs_cpu_form']:.4f} |")
    for label, p in result.get("profile", {"paths": {}})["paths"].items():
        where = f"(e) profile, batch {result['profile']['batch']}"
        for key, what in (("ort_ops_ms", "ORT operators"), ("cuda_kernels_ms", "CUDA kernels")):
            if p.get(key):
                total = sum(p[key].values())
                lines.append(f"| {where} | {label}: {what} (ms per run, top 6 of {total:.2f}) | "
                             + ", ".join(f"{k[:60]} {v:.2f}" for k, v in
                                         list(p[key].items())[:6]) + " |")
        for key in (k for k in p if k.endswith("_error")):
            lines.append(f"| {where} | {label}: {key[:-6]} | failed: {p[key][:200]} |")
    for label, kernels in result.get("profile", {}).get("attention_kernels", {}).items():
        lines.append(f"| (e) attention kernel | {label} | {'; '.join(kernels[:2]) or '-'} |")
    if "export_s" in result:
        lines.append(f"| export | ViT-B/16 CLIP graphs, every variant | {result['export_s']:.0f} "
                     f"s |")
    info = result["machine"]
    lines.append(f"\n{info.get('gpu', 'no GPU')} (driver {info.get('driver', '-')}), torch "
                 f"{info['torch']}, onnxruntime {info['onnxruntime']}"
                 f"{', SMOKE run: tiny sizes, figures mean nothing' if result['smoke'] else ''}.")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--attention-kernels":  # _attention_kernels' child
        run_each_once(Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for suite.json/.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on the CPU")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {','.join(PARTS)} (embed and profile "
                             f"need towers)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS) or (parts & {"embed", "profile"} and "towers" not in parts):
        parser.error(f"--parts: a comma-separated subset of {','.join(PARTS)}; embed and "
                     f"profile need towers")
    sizes = SMOKE if args.smoke else Sizes()
    providers = choose_providers("auto")
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"smoke": args.smoke, "machine": machine(), "sizes": sizes.__dict__,
                    "part_wall_s": {}}

    def part(name: str, run: Callable[[], object]) -> None:
        """Run one part; keep what is done so far, so a run cut short still reports it."""
        start = time.perf_counter()
        result[name] = run()
        result["part_wall_s"][name] = round(time.perf_counter() - start, 1)
        write_json(args.out / "suite_partial.json", result)
        print(f"part {name} done in {result['part_wall_s'][name]} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "training" in parts:
            part("training", lambda: part_training(training_data(work, args.smoke), sizes))
        if "topk" in parts:
            part("topk", lambda: part_topk(work, sizes, providers))
        if "towers" in parts:
            clip = SKELETON if args.smoke else vit_b16_folder(work / "clip")
            part("export_s", lambda: feature_bundle(clip, work / "bundle"))
            part("towers", lambda: part_towers(clip, work / "bundle", sizes, providers))
        if "embed" in parts:
            image_rate = max(v for r in result["towers"] if r["graph"] == IMAGE_GRAPH
                             for k, v in r.items() if k.startswith("ort_"))
            text_rate = max(v for r in result["towers"] if r["graph"] == TEXT_GRAPH
                            for k, v in r.items() if k.startswith("ort_")
                            and "masked" not in k)  # the bundle's own graphs
            towers_alone = 1 / (1 / image_rate + 1 / text_rate)
            part("embed", lambda: part_embed(work / "bundle", work, sizes, towers_alone))
        if "profile" in parts:
            part("profile", lambda: part_profile(clip, work / "bundle", sizes, providers,
                                                 args.out))
    report(args.out / "suite", result, table(result))


if __name__ == "__main__":
    main()
