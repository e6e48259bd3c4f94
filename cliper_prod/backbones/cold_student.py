"""The cold-start content student, trained after the backbone against its served scores.

A new item has no interactions, so its fold-in vector (a propagated mean, no ID part) scores
below every trained item and never reaches a top 20. The student, after ALDI (Huang et al.,
SIGIR 2023, "Aligning Distillation For Cold-start Item Recommendation"), is a
one-hidden-layer network from an item's content (its CLIP image and text features) to a
vector on the scale of the served item embeddings, trained on the trained items with the
backbone frozen as the teacher. For a training triple (user u, positive i, sampled negative
j), with p_u the served user vector, t the served item vectors (teacher) and s the student's
(s = fold-in vector of the item placed as if new + network output, or the output alone for a
backbone without an item rule):

- BPR on the student's scores: -log sigmoid(p_u.s_i - p_u.s_j);
- score alignment ("rating distribution"): |p_u.t_i - p_u.s_i| + |p_u.t_j - p_u.s_j|, which
  puts new items' scores on the trained items' scale, so they compete in one ranking;
- ranking alignment: BCE of the student's margin p_u.(s_i - s_j) against
  sigmoid(p_u.(t_i - t_j));
- identification: BCE of s_i.s_i - mean_j s_i.s_j against sigmoid of the teacher's same
  quantity (a student vector tells its item apart from others as the teacher's does);

plus an L2 penalty on the weights. Unlike ALDI, the users are not mapped by a second tower: new
items are ranked by the served user vectors together with the trained items, so the student
must speak their language.

Unlike ALDI too, the teacher vector t_i an item is taught is not its own served vector but the
mean of the served vectors of its ``smooth_k`` nearest trained items by content (the item
itself left out), rescaled to the served scores (:func:`smoothed_teacher`). Content predicts an
item's vector only as far as content carries its audience; fitted to each item's own vector,
the student also learns the part content cannot know, and that part sends a new item to the
wrong users. The neighbour mean is a kernel estimate of what the content does predict (on the
synthetic catalog's validation items, at the retrained model's share of the top 20, the new
items' hybrid recall went from 0.40 to 0.52 of the retrained model's; BENCHMARKS.md). Where
the content does carry each item's audience, the mean blurs it instead: ``smooth_k=None``
chooses between its own vector and the neighbour mean on trained items held out from the
student (:func:`choose_smoothing`; not the default, because on the synthetic catalog's CLIP
features, which carry only the topic, its choice is close to a coin toss and cost hybrid
recall). After
training, the output is scaled by one factor that gives trained items placed by the student
the top-K slots their served vectors hold (:mod:`cliper_prod.backbones.student_calibration`).
It serves through :mod:`cliper_prod.runtime.cold_student` (numpy); the exporter trains it
(:mod:`cliper_prod.export.student_fit`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cliper_prod.backbones.student_calibration import fit_calibration
from cliper_prod.evaluation import RankingTask, evaluate_ranking
from cliper_prod.student_format import StudentState, student_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentConfig:
    """The student's size, its training schedule and the weights of its losses: ALDI's
    (alpha 0.9, beta 0.05, reg 1e-4; lr 1e-3, batch 1024) except the score alignment, gamma
    1.0 instead of 0.1, which held new items' share of the top 20 nearer the retrained
    model's before the calibration existed (synthetic catalog, seeds 0-2: 1.14x vs 0.67x at
    0.1); then the smoothed teacher (``smooth_k`` chosen on the synthetic catalog's
    validation items: 100 of 0, 50, 100, 200, 300; None: chosen per model between each item's
    own vector and 100 neighbours, which content with item-level signal needs) and the
    calibration of its output (:mod:`cliper_prod.backbones.student_calibration`)."""

    hidden: int = 256
    epochs: int = 10
    max_steps_per_epoch: int = 200  # Baby: ~160k interactions, a sample of them per epoch
    batch_size: int = 1024
    lr: float = 1e-3
    reg: float = 1e-4
    bpr_weight: float = 1.0
    rank_weight: float = 0.9  # alpha
    ident_weight: float = 0.05  # beta
    gap_weight: float = 1.0  # gamma: the score alignment (ALDI: 0.1; see the docstring)
    #: each item taught its content neighbours' mean vector (0: its own vector); None: chosen
    #: among ``smooth_k_choices`` on held-out trained items (:func:`choose_smoothing`)
    smooth_k: int | None = 100
    smooth_k_choices: tuple[int, ...] = (100, 0)  # the first wins ties and a check of nothing
    check_share: float = 0.1  # trained items held out for that choice
    check_users: int = 2048  # users it ranks for (each with a held-out item among theirs)
    smooth_pool: int = 8192  # neighbours sought among at most this many trained items
    calibration_k: int = 20  # the output scaled to the served top-K share (0: not scaled)
    calibration_users: int = 2048  # users sampled for it
    calibration_items: int = 8192  # trained items sampled for it
    seed: int = 0


class StudentNet(nn.Module):
    """features -> standardised unit-row inputs -> tanh hidden layer -> [D] offset."""

    def __init__(self, mean: Tensor, scale: Tensor, hidden: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)
        self.hidden, self.out = nn.Linear(len(mean), hidden), nn.Linear(hidden, dim)
        nn.init.normal_(self.hidden.weight, std=0.01)  # ALDI's truncated-normal 0.01
        nn.init.zeros_(self.hidden.bias)
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, sum d_m] unit-row inputs (:func:`student_inputs`)."""
        return self.out(torch.tanh(self.hidden((x - self.mean) / self.scale)))

    @classmethod
    def from_state(cls, state: StudentState) -> StudentNet:
        """The network a stored state describes (the arrays as the runtime reads them)."""
        a = {name: torch.from_numpy(np.asarray(v, np.float32)) for name, v in state.arrays.items()}
        net = cls(a["mean"], a["scale"], a["w1"].shape[1], a["w2"].shape[1])
        with torch.no_grad():
            net.hidden.weight.copy_(a["w1"].T)
            net.hidden.bias.copy_(a["b1"])
            net.out.weight.copy_(a["w2"].T)
            net.out.bias.copy_(a["b2"])
        return net

    def state(self, params: dict) -> StudentState:
        """The arrays the runtime reads (W stored [in, out]: x @ W)."""
        t = {"mean": self.mean, "scale": self.scale, "w1": self.hidden.weight.T,
             "b1": self.hidden.bias, "w2": self.out.weight.T, "b2": self.out.bias}
        return StudentState(params, {name: v.detach().float().contiguous().numpy().copy()
                                     for name, v in t.items()})


def _bce(logits: Tensor, target_logits: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.sigmoid(target_logits))


def student_loss(net: StudentNet, x: Tensor, base: Tensor, teacher: Tensor, users: Tensor,
                 pos: Tensor, neg: Tensor, config: StudentConfig) -> Tensor:
    """The loss of one batch of triples (module docstring); ``x``, ``base``, ``teacher``: every
    trained item's inputs, fold-in vectors and served vectors; ``users``: the triples' served
    user vectors."""
    s_pos, s_neg = base[pos] + net(x[pos]), base[neg] + net(x[neg])
    t_pos, t_neg = teacher[pos], teacher[neg]
    sp, sn = (users * s_pos).sum(1), (users * s_neg).sum(1)
    tp, tn = (users * t_pos).sum(1), (users * t_neg).sum(1)
    loss = -config.bpr_weight * F.logsigmoid(sp - sn).mean()
    loss = loss + config.rank_weight * _bce(sp - sn, tp - tn)
    s_ident = (s_pos * s_pos).sum(1) - (s_pos @ s_neg.T).mean(1)
    t_ident = (t_pos * t_pos).sum(1) - (t_pos @ t_neg.T).mean(1)
    loss = loss + config.ident_weight * _bce(s_ident, t_ident)
    if config.gap_weight:
        loss = loss + config.gap_weight * ((tp - sp).abs() + (tn - sn).abs()).mean()
    reg = net.hidden.weight.square().sum() + net.out.weight.square().sum()
    return loss + config.reg * reg


def neighbour_means(units: Tensor, items: Tensor, k: int, pool: Tensor) -> Tensor:
    """[n, D] for each row of ``units`` (unit-length inputs), the mean of ``items`` over its
    ``k`` most cosine-similar rows among ``pool`` (indices), the row itself left out."""
    where = torch.full((len(units),), -1, dtype=torch.long)
    where[pool] = torch.arange(len(pool))
    means = torch.empty_like(items)
    for start in range(0, len(units), 2048):
        rows = torch.arange(start, min(start + 2048, len(units)))
        sims = units[rows] @ units[pool].T
        own = where[rows]
        sims[(own >= 0).nonzero().squeeze(1), own[own >= 0]] = -torch.inf
        means[rows] = items[pool[sims.topk(k, dim=1).indices]].mean(1)
    return means


def score_scale(users: Tensor, served: Tensor, smooth: Tensor, pairs: Tensor) -> float:
    """The least-squares c in p_u.served_i ~ c * p_u.smooth_i over ``pairs`` (user, item)."""
    who = users[pairs[:, 0]]
    target, fitted = (who * served[pairs[:, 1]]).sum(1), (who * smooth[pairs[:, 1]]).sum(1)
    return float(target @ fitted / (fitted @ fitted).clamp_min(1e-12))


def smoothed_teacher(x: Tensor, items: Tensor, users: Tensor, pairs: Tensor,
                     config: StudentConfig, generator: torch.Generator) -> tuple[Tensor, float]:
    """[n, D] each trained item's target: the mean served vector of its ``smooth_k`` nearest
    trained items by the cosine of the standardised inputs ``x`` (itself left out; sought in a
    seeded sample of ``smooth_pool`` items when there are more), times the least-squares scale
    of the served scores on the smoothed ones over training pairs and as many random negatives
    (a mean of k vectors is shorter than each of them; the scale puts it back on the scores'
    scale). Returns the targets and that scale."""
    n = len(items)
    pool = torch.randperm(n, generator=generator)[:config.smooth_pool].sort().values \
        if n > config.smooth_pool else torch.arange(n)
    means = neighbour_means(F.normalize(x, dim=1), items, min(config.smooth_k, len(pool) - 1),
                            pool)
    sample = pairs[torch.randperm(len(pairs), generator=generator)[:65536]]
    negatives = torch.randint(n, (len(sample),), generator=generator)
    scale = score_scale(users, items, means, torch.cat([
        sample, torch.stack([sample[:, 0], negatives], 1)]))
    return scale * means, scale


def train_student(users: np.ndarray, items: np.ndarray, train: np.ndarray,
                  features: dict[str, np.ndarray], base: np.ndarray | None,
                  config: StudentConfig = StudentConfig()) -> StudentState:
    """Train a student on the trained items: ``users``/``items`` the served tables (the
    teacher, frozen; each item taught its :func:`smoothed_teacher` target unless
    ``config.smooth_k`` is 0; None: :func:`choose_smoothing` picks it first), ``train`` the
    (user, item) training interactions, ``features`` the items' modality rows, ``base`` each
    trained item's fold-in vector placed as if new (None: the backbone has no item rule, the
    student stands alone)."""
    start = time.process_time()
    choice = None
    if config.smooth_k is None:
        choice = choose_smoothing(users, items, train, features, base, config)
        config = replace(config, smooth_k=choice["smooth_k"])
    net, params = _fit(users, items, train, features, base, config)
    params |= {"smoothing_choice": choice, "train_cpu_s": round(time.process_time() - start, 2)}
    log.info("cold-start student: %d epochs, loss %s, output x %s, smooth_k %d%s, %.1f s CPU",
             config.epochs, params["epoch_losses"],
             params["calibration"] and round(params["calibration"]["scale"], 4),
             config.smooth_k, f" (held-out recall {choice['recall']})" if choice else "",
             params["train_cpu_s"])
    return net.eval().state(params)


def _fit(users: np.ndarray, items: np.ndarray, train: np.ndarray,
         features: dict[str, np.ndarray], base: np.ndarray | None, config: StudentConfig
         ) -> tuple[StudentNet, dict]:
    """:func:`train_student` with ``config.smooth_k`` given: the calibrated network and its
    training record."""
    generator = torch.Generator().manual_seed(config.seed)
    modalities = list(features)
    x = torch.from_numpy(student_inputs(features, modalities))
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    torch.manual_seed(config.seed)  # nn.Linear draws from the global generator
    net = StudentNet(mean, scale, config.hidden, items.shape[1])
    teacher = served = torch.from_numpy(np.asarray(items, np.float32))
    user_table = torch.from_numpy(np.asarray(users, np.float32))
    base_t = torch.zeros_like(teacher) if base is None else \
        torch.from_numpy(np.asarray(base, np.float32))
    pairs = torch.from_numpy(np.asarray(train, np.int64))
    teacher_scale = None
    if config.smooth_k and len(items) > 1:
        teacher, teacher_scale = smoothed_teacher((x - mean) / scale, teacher, user_table,
                                                  pairs, config, generator)
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr)
    n_items, losses = len(items), []
    for _ in range(config.epochs):
        order = torch.randperm(len(pairs), generator=generator)
        steps = min(config.max_steps_per_epoch, -(-len(pairs) // config.batch_size))
        total = 0.0
        for step in range(steps):
            batch = pairs[order[step * config.batch_size:(step + 1) * config.batch_size]]
            neg = torch.randint(n_items, (len(batch),), generator=generator)
            loss = student_loss(net, x, base_t, teacher, user_table[batch[:, 0]], batch[:, 1],
                                neg, config)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item()
        losses.append(round(total / steps, 5))
    calibration = None
    if config.calibration_k:
        sample = torch.randperm(n_items, generator=generator)[:config.calibration_items]
        picked = torch.randperm(len(user_table), generator=generator)[:config.calibration_users]
        with torch.no_grad():
            calibration = fit_calibration(user_table, served, pairs, base_t, net(x[sample]),
                                          sample, picked, config.calibration_k)
            net.out.weight.mul_(calibration.scale)
            net.out.bias.mul_(calibration.scale)
    return net, {"modalities": modalities, "base": base is not None, "config": asdict(config),
                 "teacher_scale": teacher_scale, "epoch_losses": losses,
                 "calibration": calibration and asdict(calibration)}


def choose_smoothing(users: np.ndarray, items: np.ndarray, train: np.ndarray,
                     features: dict[str, np.ndarray], base: np.ndarray | None,
                     config: StudentConfig) -> dict:
    """Which of ``config.smooth_k_choices`` places items the student has not seen best,
    measured on trained items: a seeded ``check_share`` of them is held out from the student
    (not from the model: its user vectors learned those items' interactions, so this is a
    proxy for new items, not their measure), a student is trained (and calibrated) on the rest
    for each choice, the held-out items are placed as ``add-items`` would place them, and the
    users who interacted with them rank every item (their other training items excluded): the
    choice with the highest Recall@K of those interactions wins (ties, and a check no user
    interacted with: the first). Why per model: content that carries each item's own audience
    is best taught each item's own vector, content that carries only its kind its neighbours'
    mean (BENCHMARKS.md, the synthetic catalog with and without item-level content)."""
    choices = list(dict.fromkeys(config.smooth_k_choices))
    if not choices:
        raise ValueError("smooth_k_choices is empty: nothing to choose the smoothing from")
    generator = torch.Generator().manual_seed(config.seed + 1)
    n = len(items)
    check = torch.randperm(n, generator=generator)[:max(1, int(config.check_share * n))]
    check = check.sort().values.numpy()
    held = np.zeros(n, bool)
    held[check] = True
    train = np.asarray(train, np.int64)
    candidates = np.unique(train[held[train[:, 1]], 0])
    if len(choices) == 1 or len(candidates) == 0 or held.all():
        return {"smooth_k": choices[0], "recall": None, "check_items": len(check),
                "check_users": len(candidates)}
    picked = candidates[torch.randperm(len(candidates), generator=generator)[
        :config.check_users].sort().values.numpy()]
    keep = np.flatnonzero(~held)
    row = np.full(n, -1)
    row[keep] = np.arange(len(keep))
    fit_pairs = train[~held[train[:, 1]]]
    fit_pairs = np.stack([fit_pairs[:, 0], row[fit_pairs[:, 1]]], 1)
    x_check = torch.from_numpy(student_inputs({m: f[check] for m, f in features.items()},
                                              list(features)))
    recall = {}
    for k in choices:
        net, _ = _fit(users, items[keep], fit_pairs, {m: f[keep] for m, f in features.items()},
                      None if base is None else base[keep], replace(config, smooth_k=k))
        with torch.no_grad():
            placed = net(x_check).numpy() + (0.0 if base is None else base[check])
        recall[k] = held_out_recall(users, items, train, check, placed, picked,
                                    config.calibration_k or 20)
    best = max(choices, key=lambda k: recall[k])
    return {"smooth_k": best, "recall": {str(k): round(r, 4) for k, r in recall.items()},
            "check_items": len(check), "check_users": len(picked)}


def held_out_recall(users: np.ndarray, items: np.ndarray, train: np.ndarray,
                    check: np.ndarray, placed: np.ndarray, picked: np.ndarray, k: int) -> float:
    """Mean Recall@``k`` over the ``picked`` users of their ``train`` interactions with the
    ``check`` items, those items at ``placed`` and every other at its served vector, each
    user's training items outside ``check`` excluded from the ranking (the training
    evaluation's full ranking, :func:`~cliper_prod.evaluation.evaluate_ranking`)."""
    table = np.array(items, np.float32)
    table[check] = placed
    held = np.zeros(len(items), bool)
    held[check] = True
    on_check = held[train[:, 1]]
    task = RankingTask.build(train[on_check], [train[~on_check]], len(users), len(items))
    k = min(k, len(items))  # a catalog smaller than K: every item is in the top
    return evaluate_ranking(torch.from_numpy(np.asarray(users)), torch.from_numpy(table),
                            replace(task, users=np.sort(picked)), topk=(k,))[f"recall@{k}"]
