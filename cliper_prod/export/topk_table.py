"""A bundle's top-K graph (CPU form) over a longer item table, written without torch.

The graph keeps its item table as two initializers, ``chunks`` and ``firsts``
(:func:`~cliper_prod.topk_layout.chunked_table`); its ``Scan`` runs over however many chunks
they hold, and nothing else in it depends on the catalog's size while the chunk size and K stay
(``add-items`` keeps both, as the re-export with torch does). So new items are a new table
swapped into the same graph, checked against a top-K computed in numpy (float64) before the
bundle lists it. The GPU form (its candidate count and fp16 scale depend on the table) and the
TorchScript twin are only written with torch; without it they are left out and the runtime runs
the CPU form everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cliper_prod.bundle_format import GPU_FORM, TOPK_GRAPH, graph_file
from cliper_prod.errors import ConfigError, ExportError
from cliper_prod.export.parity import FP32_BOUND, parity, same_topk, within
from cliper_prod.histories import history_pairs
from cliper_prod.topk_layout import chunked_table

CHECK_USERS = 64  # users the new graph is checked on, with their training items excluded
#: What a bundle written without torch leaves out of the source's top-K record.
LEFT_OUT = (GPU_FORM, "torchscript")


def onnx_package():
    try:
        import onnx
    except ImportError:
        raise ConfigError("add-items without torch rewrites the top-K graph's table with the "
                          "onnx package: pip install 'cliper-prod[export]'") from None
    return onnx


def with_table(src: Path, dst: Path, table: dict[str, np.ndarray]) -> None:
    """``src`` (a top-K graph) with its ``chunks`` and ``firsts`` replaced by ``table``,
    written to ``dst`` with the table in ``<dst>.data``."""
    onnx = onnx_package()
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    found = {init.name: init for init in graph.initializer if init.name in table}
    if set(found) != set(table):
        raise ExportError(f"{src}: its top-K graph holds no {sorted(set(table) - set(found))} "
                          f"table; re-export the bundle (or add the items with torch "
                          f"installed)")
    for name, array in table.items():
        found[name].CopyFrom(numpy_helper.from_array(array, name))
    del graph.value_info[:]  # shapes inferred for the old table's chunk count
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{dst.name}.data", size_threshold=1024)
    onnx.checker.check_model(str(dst), full_check=True)


def naive_topk(queries: np.ndarray, items: np.ndarray, rows: np.ndarray, seen: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` items and scores of each query in float64, the pairs ``(rows, seen)``
    excluded; -1 and -inf where fewer than ``k`` items are left (as the graph answers)."""
    scores = queries.astype(np.float64) @ items.astype(np.float64).T
    scores[rows, seen] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, 1)
    return np.where(np.isfinite(top), order, -1), top


def retabled_topk(source: Path, record: dict[str, Any], folder: Path, users: np.ndarray,
                  items: np.ndarray, indptr: np.ndarray, history: np.ndarray
                  ) -> dict[str, Any]:
    """The source's top-K graph (``record``: its manifest record) over ``items``, written
    into ``folder`` and checked on :data:`CHECK_USERS` users against :func:`naive_topk`;
    its manifest record (raises when the check misses)."""
    import onnxruntime as ort

    path = folder / graph_file(TOPK_GRAPH)
    with_table(source / record["files"]["fp32"], path,
               chunked_table(items, int(record["chunk_items"])))
    rng = np.random.default_rng(0)
    check = rng.choice(len(users), size=min(CHECK_USERS, len(users)), replace=False)
    rows, seen = history_pairs(indptr, history, check)
    reference = naive_topk(users[check], items, rows, seen, int(record["k"]))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"queries": users[check], "exclude_rows": rows,
                             "exclude_items": seen})
    stats = parity([reference[1]], [got[1]])
    problem = same_topk(*reference)(got)
    if problem or not within(stats, FP32_BOUND):
        raise ExportError(f"{path.name}: the new item table misses the numpy top-K: "
                          f"{problem or stats} (bound {FP32_BOUND})")
    kept = {key: value for key, value in record.items() if key not in LEFT_OUT}
    return {**kept, "n_items": len(items), "files": {"fp32": path.name},
            "external_data": f"{path.name}.data", "parity": {"onnx_fp32": stats},
            "table_swapped": {"reference": "numpy float64 top-K", "check_users": len(check),
                              "left_out": [key for key in LEFT_OUT
                                           if key in record or key in record["files"]]}}
