"""Fresh catalogs without retraining: `add-items` and `topk --histories` against naive dense
re-implementations of each backbone's propagation rule, written here from the papers' formulas
(dense matrices in float64), never through the package's fold-in code."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cliper_prod.bundle_format import GPU_FORM, read_manifest
from cliper_prod.checkpoint import load_model
from cliper_prod.commands import cli
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.fold_in import FoldIn
from cliper_prod.runtime.ranking import TopKRanker
from cliper_prod.runtime.recommender import Recommender
from cliper_prod.runtime.topk_forms import TopKGraph
from conftest import ranked_as_naive_numpy, serve_local, stop_process, widened

N_NEW = 4


def run(*args: str) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(exported: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    """FREEDOM and LATTICE (two item-graph layers each, so the rules' recursion is exercised)
    and LightGCN on the synthetic catalog's CLIPER features, each exported."""
    root = tmp_path_factory.mktemp("fold")
    out = {}
    for backbone, extra in (("freedom", ["--set", "model.n_mm_layers=2"]), ("lightgcn", []),
                            ("lattice", ["--set", "model.n_layers=2"])):
        ckpt, bundle = root / f"{backbone}-ckpt", root / f"{backbone}-bundle"
        res = run("train", "--backbone", backbone, "--data", exported["catalog"], "--features",
                  "cliper", "--set", "train.epochs=2", *extra, "--out", ckpt, "--quiet")
        assert res.exit_code == 0, res.output
        res = run("export", "--backbone", backbone, "--checkpoint", ckpt, "--out", bundle,
                  "--max-k", "30", "--chunk-items", "16", "--no-torchscript", "--no-fp16",
                  "--no-fused")
        assert res.exit_code == 0, res.output
        out[f"{backbone}-ckpt"], out[backbone] = ckpt, bundle
    return out


def new_features(folder: Path, catalog: Path, seed: int = 5) -> dict[str, np.ndarray]:
    """N_NEW items near existing ones (their features plus noise), as `embed` lays them out."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    feats = {}
    for m in ("image", "text"):
        base = np.load(catalog / "cliper" / f"{m}_feat.npy")[[3, 7, 11, 19]]
        feats[m] = (base + 0.05 * rng.standard_normal(base.shape)).astype(np.float32)
        np.save(folder / f"{m}_feat.npy", feats[m])
    (folder / "item_ids.txt").write_text("".join(f"NEW{i}\n" for i in range(N_NEW)))
    return feats


def naive_freedom_row(model, data, feats: dict[str, np.ndarray], q: int) -> torch.Tensor:
    """The new item's row of FREEDOM's item graph over the n trained items plus itself: its
    cosine top-k among all n + 1 items, each 1/k, mixed by mm_image_weight."""
    cfg = model.config
    row = torch.zeros(model.n_items + 1, dtype=torch.float64)
    for m, w in {"image": cfg.mm_image_weight, "text": 1 - cfg.mm_image_weight}.items():
        x = torch.cat([torch.from_numpy(data.features[m]).double(),
                       torch.from_numpy(feats[m][q:q + 1]).double()])
        x = x / x.norm(dim=1, keepdim=True)
        row[torch.topk(x[-1] @ x.T, cfg.knn_k).indices] += w / cfg.knn_k
    return row


def naive_freedom_items(ckpt: Path, feats: dict[str, np.ndarray]) -> np.ndarray:
    """FREEDOM's item rule with dense matrices: per new item, a graph of the n trained items
    (their rows as trained) plus the new one; h = S^L_m [E; 0], row n."""
    model, data, _ = load_model(ckpt)
    known = model.item_graph.to_dense().double()
    emb = torch.cat([model.item_embedding.weight.double(),
                     torch.zeros(1, model.config.embedding_size, dtype=torch.float64)])
    out = []
    for q in range(N_NEW):
        s = torch.zeros(model.n_items + 1, model.n_items + 1, dtype=torch.float64)
        s[:-1, :-1], s[-1] = known, naive_freedom_row(model, data, feats, q)
        h = emb
        for _ in range(model.config.n_mm_layers):
            h = s @ h
        out.append(h[-1])
    return torch.stack(out).detach().numpy()


def _dense_topk_row(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k (self included) of the last row of ``x`` among all rows: ids, cosines."""
    x = x / x.norm(dim=1, keepdim=True)
    top = torch.topk(x[-1] @ x.T, k)
    return top.indices, top.values


def _dense_row_sums(x: torch.Tensor, k: int) -> torch.Tensor:
    """Weighted row sums of the cosine top-k graph of the rows of ``x`` (self included)."""
    x = x / x.norm(dim=1, keepdim=True)
    return torch.topk(x @ x.T, k, dim=1).values.sum(1)


def naive_lattice_items(ckpt: Path, feats: dict[str, np.ndarray]) -> np.ndarray:
    """LATTICE's item rule with dense matrices: the trained graph's n rows as the model builds
    them, plus the new item's row: (1 - lambda) x learned (cosine top-k of projected features,
    mixed by softmax(modal_weight), / sqrt of both ends' weighted row sums) + lambda x frozen
    (the same on raw features per modality, then mixed); h = S^L [E; 0], normalised."""
    model, data, _ = load_model(ckpt)
    cfg, n, k = model.config, model.n_items, model.config.knn_k
    edge_index, weight = model.item_graph()
    known = torch.zeros(n, n, dtype=torch.float64).index_put_(
        tuple(edge_index), weight.double(), accumulate=True)
    mix = dict(zip(("image", "text"), torch.softmax(model.modal_weight, 0).double()))
    emb = torch.cat([model.item_embedding.weight.double(),
                     torch.zeros(1, cfg.embedding_size, dtype=torch.float64)])
    out = []
    for q in range(N_NEW):
        row = torch.zeros(n + 1, dtype=torch.float64)
        learned_row = torch.zeros(n + 1, dtype=torch.float64)
        learned_deg_known, learned_deg_q = 0, 0
        for m, w in mix.items():
            raw = torch.cat([torch.from_numpy(data.features[m]).double(),
                             torch.from_numpy(feats[m][q:q + 1]).double()])
            ids, cos = _dense_topk_row(raw, k)
            deg = torch.cat([_dense_row_sums(raw[:-1], k), cos.sum().reshape(1)])
            row[ids] += cfg.lambda_coeff * w * cos / torch.sqrt(deg[-1] * deg[ids])
            proj = model.projections[m]
            projected = torch.cat([proj(model.modality(m)).double(),
                                   proj(torch.from_numpy(feats[m][q:q + 1])).double()])
            ids, cos = _dense_topk_row(projected, k)
            learned_row[ids] += w * cos
            learned_deg_known = learned_deg_known + w * _dense_row_sums(projected[:-1], k)
            learned_deg_q = learned_deg_q + w * cos.sum()
        deg = torch.cat([learned_deg_known, learned_deg_q.reshape(1)])
        row += (1 - cfg.lambda_coeff) * learned_row / torch.sqrt(deg[-1] * deg)
        s = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        s[:-1, :-1], s[-1] = known, row
        h = emb
        for _ in range(cfg.n_layers):
            h = s @ h
        out.append(h[-1] / h[-1].norm())
    return torch.stack(out).detach().numpy()


@pytest.mark.parametrize("backbone,naive", [("freedom", naive_freedom_items),
                                            ("lattice", naive_lattice_items)])
def test_new_items_equal_the_naive_item_graph_rule(trained, exported, tmp_path: Path,
                                                   backbone: str, naive) -> None:
    feats = new_features(tmp_path / "new", exported["catalog"])
    res = run("add-items", "--bundle", trained[backbone], "--features", tmp_path / "new",
              "--out", tmp_path / "b2")
    assert res.exit_code == 0, res.output
    table = np.load(tmp_path / "b2" / "item_embeddings.npy")
    old = np.load(trained[backbone] / "item_embeddings.npy")
    np.testing.assert_array_equal(table[:len(old)], old)  # trained items untouched
    np.testing.assert_allclose(table[len(old):], naive(trained[f"{backbone}-ckpt"], feats),
                               rtol=1e-5, atol=1e-6)
    assert (tmp_path / "b2" / "item_ids.txt").read_text().splitlines()[-N_NEW:] == \
        [f"NEW{i}" for i in range(N_NEW)]


def test_a_trained_item_placed_as_new_leaves_itself_out(trained) -> None:
    """What the cold-start student learns from: trained item j placed by the item rule with
    ``leave_out`` equals the naive dense rule for a new item whose features are j's, with j
    itself removed from the candidates (its graph row and embedding stay among the known
    items). Without the leave-out j would be its own nearest neighbour (cosine 1)."""
    model, data, _ = load_model(trained["freedom-ckpt"])
    cfg, n, chosen = model.config, model.n_items, np.array([2, 9, 17])
    known = model.item_graph.to_dense().double()
    emb = torch.cat([model.item_embedding.weight.double(),
                     torch.zeros(1, cfg.embedding_size, dtype=torch.float64)])
    expected = []
    for j in chosen:
        row = torch.zeros(n + 1, dtype=torch.float64)
        others = torch.tensor([i for i in range(n) if i != j] + [n])
        for m, w in {"image": cfg.mm_image_weight, "text": 1 - cfg.mm_image_weight}.items():
            x = torch.from_numpy(data.features[m]).double()
            x = torch.cat([x, x[j:j + 1]])[others]
            x = x / x.norm(dim=1, keepdim=True)
            row[others[torch.topk(x[-1] @ x.T, cfg.knn_k).indices]] += w / cfg.knn_k
        s = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        s[:-1, :-1], s[-1] = known, row
        h = emb
        for _ in range(cfg.n_mm_layers):
            h = s @ h
        expected.append(h[-1])
    fold = FoldIn.of(Bundle(trained["freedom"], "cpu"))
    placed = fold.items({m: data.features[m][chosen] for m in fold.modalities},
                        leave_out=chosen).vectors
    np.testing.assert_allclose(placed, torch.stack(expected).detach().numpy(), rtol=1e-5,
                               atol=1e-6)
    as_new = fold.items({m: data.features[m][chosen] for m in fold.modalities}).vectors
    assert not np.allclose(as_new, placed, rtol=1e-3, atol=1e-4)  # itself its own neighbour


def test_the_new_bundle_verifies_and_serves_unchanged(trained, exported, tmp_path: Path) -> None:
    source = trained["freedom"]
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    new_features(tmp_path / "new", exported["catalog"])
    assert run("add-items", "--bundle", source, "--features", tmp_path / "new", "--out",
               tmp_path / "b2").exit_code == 0
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # B never touched
    manifest = read_manifest(tmp_path / "b2")  # every hash checked
    assert manifest["lineage"]["added_items"] == N_NEW
    assert manifest["graphs"]["topk"]["parity"]["onnx_fp32"]  # verified like an export
    # topk ranks over the extended catalog: naive numpy over its tables, training items out
    user_ids = (tmp_path / "b2" / "user_ids.txt").read_text().splitlines()
    (tmp_path / "u.txt").write_text("\n".join(user_ids) + "\n")
    res = run("topk", "--bundle", tmp_path / "b2", "--users", tmp_path / "u.txt", "-k", "10",
              "--out", tmp_path / "recs.jsonl")
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in (tmp_path / "recs.jsonl").read_text().splitlines()]
    assert ranked_as_naive_numpy(tmp_path / "b2", got) > 0  # the added items do reach rankings
    assert Recommender(tmp_path / "b2").topk([user_ids[0]], k=10)[0] == widened(got[0])
    ranker = TopKRanker(Bundle(tmp_path / "b2"))  # add-items re-exported the GPU form too
    ranker.graph = TopKGraph(ranker.bundle, GPU_FORM)
    gpu = ranker.answer(user_ids, ranker.rank(np.arange(len(user_ids))), 10, set())
    assert gpu == [widened({k: r[k] for k in ("user_id", "items", "scores")}) for r in got]


def test_add_items_from_jsonl_equals_embed_then_add_features(trained, exported,
                                                              tmp_path: Path) -> None:
    items = tmp_path / "new.jsonl"
    catalog = exported["catalog"]
    records = [json.loads(line) for line in (catalog / "items.jsonl").read_text().splitlines()[:3]]
    items.write_text("".join(json.dumps({**r, "item_id": f"J{n}",
                                         "image": str(catalog / r["image"])}) + "\n"
                             for n, r in enumerate(records)) + "{broken\n")
    res = run("add-items", "--bundle", trained["freedom"], "--items", items, "--out",
              tmp_path / "via-items", "--quiet")
    assert res.exit_code == 0, res.output
    assert "skipped" in res.output  # the bad line is reported as embed reports it
    res = run("embed", items, "--bundle", trained["freedom"], "--out", tmp_path / "feats",
              "--quiet", "--precision", "fp32")  # add-items embeds in fp32
    assert res.exit_code == 0, res.output
    res = run("add-items", "--bundle", trained["freedom"], "--features", tmp_path / "feats",
              "--out", tmp_path / "via-features")
    assert res.exit_code == 0, res.output
    for name in ("item_embeddings.npy", "item_ids.txt"):
        assert (tmp_path / "via-items" / name).read_bytes() == \
            (tmp_path / "via-features" / name).read_bytes()


def naive_user(ckpt: Path, history: list[int], rule: str) -> np.ndarray:
    """The fold-in user vector from dense powers of the trained user-item propagation: the
    items' layer representations, combined by the backbone's rule for a node whose own
    embedding is zero."""
    model, data, _ = load_model(ckpt)
    adj = (model.ui_adj if rule == "mean_self_loop" else
           getattr(model, "full_adj", None) or model.adj).to_dense().double()
    n_layers = model.config.n_ui_layers if hasattr(model.config, "n_ui_layers") \
        else model.config.n_layers
    x = torch.cat([model.user_embedding.weight, model.item_embedding.weight]).double()
    layers = [x]
    for _ in range(n_layers):
        layers.append(adj @ layers[-1])
    items = [layer[model.n_users:][history] for layer in layers]
    degree = np.bincount(data.train[:, 1], minlength=model.n_items)[history]
    u, total = torch.zeros(x.shape[1], dtype=torch.float64), 0
    for layer in range(1, n_layers + 1):
        if rule == "symmetric":
            coeff = torch.from_numpy(1 / np.sqrt(len(history) * (degree + 1.0)))
            u = (coeff[:, None] * items[layer - 1]).sum(0)
        else:
            u = (u + items[layer - 1].sum(0)) / (len(history) + 1)
        total = total + u
    return (total / (n_layers + 1)).detach().numpy()


@pytest.mark.parametrize("backbone,rule", [("freedom", "symmetric"), ("lightgcn", "symmetric"),
                                           ("lattice", "mean_self_loop")])
def test_a_history_user_ranks_as_naive_numpy_over_the_folded_vector(trained, tmp_path: Path,
                                                                    backbone: str,
                                                                    rule: str) -> None:
    bundle = trained[backbone]
    item_ids = (bundle / "item_ids.txt").read_text().splitlines()
    rng = np.random.default_rng(0)
    histories = [sorted(rng.choice(len(item_ids), size=n, replace=False).tolist())
                 for n in (1, 5, 12)]
    lines = [{"user": f"h{n}", "history": [item_ids[i] for i in h] + ["ghost"] * (n == 1)}
             for n, h in enumerate(histories)]
    (tmp_path / "h.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    res = run("topk", "--bundle", bundle, "--histories", tmp_path / "h.jsonl", "-k", "10",
              "--out", tmp_path / "out.jsonl")
    assert res.exit_code == 0, res.output
    items = np.load(bundle / "item_embeddings.npy").astype(np.float64)
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for n, (history, record) in enumerate(zip(histories, got)):
        scores = items @ naive_user(trained[f"{backbone}-ckpt"], history, rule)
        scores[history] = -np.inf  # the history is excluded
        order = np.argsort(-scores, kind="stable")[:10]
        assert record["user_id"] == f"h{n}"
        assert record["items"] == [item_ids[i] for i in order]
        np.testing.assert_allclose(record["scores"], scores[order], rtol=1e-4, atol=1e-6)
        assert record.get("unknown_items", []) == (["ghost"] if n == 1 else [])
    api = Recommender(bundle).topk_histories([lines[0]["history"]], k=10)
    assert api[0]["items"] == got[0]["items"]
    ranker = TopKRanker(Bundle(bundle))  # the GPU form excludes the histories alike
    ranker.graph = TopKGraph(ranker.bundle, GPU_FORM)
    prepared, _ = ranker.prepare_histories([line["history"] for line in lines], 10)
    gpu = ranker.answer_histories([line["user"] for line in lines], prepared, 10, set())
    assert [r["items"] for r in gpu] == [r["items"] for r in got]


def test_refusals_name_the_problem(trained, exported, tmp_path: Path) -> None:
    new_features(tmp_path / "new", exported["catalog"])
    res = run("add-items", "--bundle", trained["lightgcn"], "--features", tmp_path / "new",
              "--out", tmp_path / "x")
    assert res.exit_code == 7 and "no item graph" in res.output
    res = run("add-items", "--bundle", trained["freedom"], "--features", tmp_path / "new",
              "--out", trained["freedom"].parent)  # would replace the folder holding B
    assert res.exit_code == 2 and "outside --bundle" in res.output
    zero = np.load(tmp_path / "new" / "image_feat.npy")
    np.save(tmp_path / "new" / "image_feat.npy", np.vstack([zero[:3], np.zeros_like(zero[:1])]))
    res = run("add-items", "--bundle", trained["freedom"], "--features", tmp_path / "new",
              "--out", tmp_path / "x", "--strict")
    assert res.exit_code == 3 and "'NEW3'" in res.output and "all-zero" in res.output
    np.save(tmp_path / "new" / "image_feat.npy", zero)
    (tmp_path / "new" / "item_ids.txt").write_text("SYN00001\nNEW1\nNEW2\nNEW3\n")
    res = run("add-items", "--bundle", trained["freedom"], "--features", tmp_path / "new",
              "--out", tmp_path / "x", "--strict")
    assert res.exit_code == 3 and "already in the bundle" in res.output
    assert not (tmp_path / "x").exists()
    # a history of added items only (no interactions) folds in nothing: refused, not ranked
    (tmp_path / "new" / "item_ids.txt").write_text("NEW0\nNEW1\nNEW2\nNEW3\n")
    assert run("add-items", "--bundle", trained["freedom"], "--features", tmp_path / "new",
               "--out", tmp_path / "b2").exit_code == 0
    (tmp_path / "added.jsonl").write_text('{"user": "a", "history": ["NEW0", "NEW1"]}\n')
    res = run("topk", "--bundle", tmp_path / "b2", "--histories", tmp_path / "added.jsonl")
    assert res.exit_code == 3 and "without interactions" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "a", "history": ["SYN00001"]}\n{"user": "b", "history": ["zz"]}\n'
                   '[1]\n')
    res = run("topk", "--bundle", trained["freedom"], "--histories", bad)
    assert res.exit_code == 3 and "bad.jsonl:2" in res.output and "no known item" in res.output
    res = run("topk", "--bundle", trained["freedom"], "--histories", bad, "--skip-unknown",
              "--out", tmp_path / "ok.jsonl")
    assert res.exit_code == 0 and "bad.jsonl:3: skipped: expected a JSON object" in res.output
    assert len((tmp_path / "ok.jsonl").read_text().splitlines()) == 1


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_service_serves_an_add_items_bundle_and_history_users(trained, exported, image_root,
                                                                   tmp_path: Path) -> None:
    new_features(tmp_path / "new", exported["catalog"])
    assert run("add-items", "--bundle", trained["freedom"], "--features", tmp_path / "new",
               "--out", tmp_path / "b2").exit_code == 0
    url, proc = serve_local({"bundle": tmp_path / "b2"}, image_root, tmp_path)
    try:
        api = Recommender(tmp_path / "b2")
        user = api.bundle.user_ids[3]
        bundle_id = api.bundle.manifest["manifest_sha256"][:12]  # each answer names its bundle
        assert post(url + "/topk", {"users": [user], "k": 10}) == \
            (200, {"bundle": bundle_id, "results": api.topk([user], k=10)})
        history = [api.bundle.item_ids[i] for i in (1, 4, 9)] + ["NEW2", "ghost"]
        status, body = post(url + "/topk", {"history": history, "k": 10, "exclude": ["NEW0"]})
        expected = api.topk_histories([history], k=10, exclude=["NEW0"])
        assert status == 200 and body == {"bundle": bundle_id, "results": expected}
        assert body["results"][0]["unknown_items"] == ["ghost"]
        assert not set(history + ["NEW0"]) & set(body["results"][0]["items"])
        status, body = post(url + "/topk", {"history": ["ghost"], "k": 10})
        assert status == 400 and "no known item id" in body["detail"]
        status, body = post(url + "/topk", {"users": [user], "history": history})
        assert status == 422 and "exactly one" in json.dumps(body)
    finally:
        stop_process(proc, signal.SIGTERM)


def test_a_bundle_without_fold_in_state_says_so(tmp_path: Path) -> None:
    from cliper_prod.export.bundle_writer import EmbeddingTables, export_tables
    from cliper_prod.runtime.ranking import UnsupportedQuery

    export_tables(EmbeddingTables(torch.randn(6, 4), torch.randn(9, 4),
                                  np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6]])),
                  tmp_path / "tables")
    with pytest.raises(UnsupportedQuery, match="no fold-in state") as caught:
        Recommender(tmp_path / "tables").topk_histories([["1", "2"]], k=3)
    assert str(tmp_path) not in str(caught.value)
    (tmp_path / "h.jsonl").write_text('{"user": "a", "history": ["1"]}\n')
    res = run("topk", "--bundle", tmp_path / "tables", "--histories", tmp_path / "h.jsonl",
              "-k", "3")
    assert res.exit_code == 7 and "no fold-in state" in res.output
