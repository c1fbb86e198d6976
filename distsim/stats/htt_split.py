"""HTT's roles: the seeded split of a zoo into train/test (open-set: train/query/gallery), by
model or by stratum, and the null's relabellings within the roles.

Strata (``strata=``, e.g. the init seed of each model when model i of every task starts from the
same initial weights): models of one stratum share a signature that is no task effect, so the
split and the null respect it. The null is then H0: within each stratum, the models are
exchangeable across tasks.

- closed-set: the split is by stratum, not by model: a seeded train_fraction of the strata (at
  least 2, and 2 left) are training strata, all their models train, every other model test. No
  test model has a same-stratum sibling in train (there, a sibling of another task pulls it to
  the wrong centroid: accuracy below chance).
- open-set: training tasks as without strata; within the held-out tasks, a seeded set of strata
  (n_query of them; default 20%, at least 2, and 2 left) gives the queries and the other strata
  the gallery, one set for all held-out tasks, so a query's same-stratum siblings (other tasks')
  are queries too, never in the gallery it ranks, while its own task's models of the other strata
  are. The training tasks keep every stratum: the projection is learned on all of them.
- null: task labels are permuted within each (role, stratum) cell, so every stratum keeps its
  tasks per role (a restricted permutation test; the exchangeable units are the models of a
  stratum). The roles depend on the strata and the training tasks only, so the permutations keep
  the split, and the test is exact under that H0. Strata are numbered by first appearance, so the
  test depends on the labels only through the partition of the models they make.

Chance: closed-set 1/tasks; open-set the exact expected mAP of a uniformly random ranking of
that query/gallery structure, averaged over queries (likewise the CMC chance).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from distsim.stats.permutation import SeedLike
from distsim.stats.scoring import CMC_RANKS, expected_ap, expected_cmc

MIN_TASKS = {"closed-set": 2, "open-set": 4}  # 2 train + 2 held-out tasks for open-set


@dataclass(frozen=True)
class Split:
    """Roles of the N positions of a zoo for one HTT.

    codes (N,): task codes 0..n_tasks-1. blocks: role -> position indices; closed-set roles
    train/test, open-set train/query/gallery (sorted; the gallery in a seeded random order).
    train_classes: the task codes present in the train block (the learner's classes).
    strata (N,): stratum codes 0..S-1 (numbered by first appearance), or None (no strata).
    """

    protocol: str
    codes: np.ndarray
    n_tasks: int
    blocks: dict[str, np.ndarray]
    train_classes: np.ndarray
    strata: np.ndarray | None = None

    def eval_rows(self) -> np.ndarray:
        """Positions of every role but train, in role order (test; or query then gallery)."""
        return np.concatenate([idx for role, idx in self.blocks.items() if role != "train"])


STRATA_SPLITS = ("stratum", "cell")  # how strata enter the split (make_split's strata_split)


def make_split(
    codes: np.ndarray,
    names: np.ndarray,
    protocol: str,
    seed: SeedLike,
    train_fraction: float = 0.6,
    train_task_fraction: float = 0.6,
    n_query: int | None = None,
    strata: Sequence[Hashable] | np.ndarray | None = None,
    strata_split: str = "stratum",
) -> Split:
    """Seeded split of positions into roles: per task for closed-set, by task for open-set.

    codes (N,): task codes 0..T-1, every task with at least 2 positions; names (T,): the task
    names (for error messages). closed-set: train_fraction of each task's positions train, the
    rest test. open-set: train_task_fraction of the tasks train (at least 2, and 2 held out);
    each held-out task gives n_query queries (None: 20% of its positions) and the rest gallery.
    strata (N,): stratum labels; then closed-set splits the strata (train_fraction of them
    train) and open-set splits the held-out tasks' strata (n_query of them query; None: 20%),
    see the module docstring. strata_split="cell" (strata that are cells of other factors,
    e.g. a sweep's learning rates, each holding models of every task): the split is drawn in
    each (task, stratum) cell as it is in each task without strata (closed-set: train_fraction
    of the cell trains; open-set: the held-out tasks' cells give 20% or n_query queries each),
    so every stratum is in every role and the null permutes within (role, stratum) cells. The
    split is drawn from default_rng([*seed, 0]); `permuted_labels` uses stream 1.
    """
    if strata_split not in STRATA_SPLITS:
        raise ValueError(f"strata_split must be one of {STRATA_SPLITS}, got {strata_split!r}")
    n_tasks = len(names)
    rng = np.random.default_rng([*_seed_words(seed), 0])
    members = [np.flatnonzero(codes == t) for t in range(n_tasks)]
    s = None if strata is None else _strata_codes(strata, len(codes))
    if s is not None and strata_split == "cell":
        return _split_by_cell(codes, names, protocol, rng, s, train_fraction,
                              train_task_fraction, n_query)
    if protocol == "closed-set":
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        if s is not None:
            return _check_strata_split(_closed_split_by_stratum(codes, n_tasks, s, rng,
                                                                train_fraction), names)
        train, test = [], []
        for idx in members:
            idx = rng.permutation(idx)
            n_tr = int(np.clip(round(train_fraction * len(idx)), 1, len(idx) - 1))
            train.append(idx[:n_tr])
            test.append(idx[n_tr:])
        blocks = {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}
        return Split(protocol, codes, n_tasks, blocks, np.arange(n_tasks))
    if not 0.0 < train_task_fraction < 1.0:
        raise ValueError(f"train_task_fraction must be in (0, 1), got {train_task_fraction}")
    if n_query is not None and (
        isinstance(n_query, bool) or not isinstance(n_query, (int, np.integer)) or n_query < 1
    ):
        raise ValueError(f"n_query must be a positive int or None, got {n_query!r}")
    order = rng.permutation(n_tasks)
    n_train_tasks = int(np.clip(round(train_task_fraction * n_tasks), 2, n_tasks - 2))
    train_tasks = np.sort(order[:n_train_tasks])
    train_block = np.sort(np.concatenate([members[t] for t in train_tasks]))
    if s is not None:
        query, gallery = _open_split_by_stratum(codes, train_tasks, s, rng, n_query)
        blocks = {"train": train_block, "query": query, "gallery": rng.permutation(gallery)}
        split = Split(protocol, codes, n_tasks, blocks, train_tasks, s)
        return _check_strata_split(split, names)
    query_parts, gallery_parts = [], []
    for t in np.sort(order[n_train_tasks:]):
        idx = rng.permutation(members[t])
        if n_query is None:
            n_q = int(np.clip(round(0.2 * len(idx)), 1, len(idx) - 1))
        else:
            n_q = int(n_query)
        if n_q >= len(idx):
            raise ValueError(
                f"n_query={n_q} leaves no gallery for task {names[t].item()!r} "
                f"with {len(idx)} solutions"
            )
        query_parts.append(idx[:n_q])
        gallery_parts.append(idx[n_q:])
    blocks = {
        "train": train_block,
        "query": np.sort(np.concatenate(query_parts)),
        # gallery in a seeded random order: the stable sort of tied scores then breaks ties in an
        # order independent of the labels (zoos are usually stored task by task)
        "gallery": rng.permutation(np.concatenate(gallery_parts)),
    }
    return Split(protocol, codes, n_tasks, blocks, train_tasks)


def _strata_codes(strata: Sequence[Hashable] | np.ndarray, n: int) -> np.ndarray:
    """Stratum labels (N,) -> int64 codes 0..S-1 numbered by first appearance; labels are
    compared by value (Python equality: 1, 1.0 and np.int64(1) are one stratum, "1" another)."""
    if isinstance(strata, (str, bytes)) or not hasattr(strata, "__len__"):
        raise TypeError(f"strata must be an array-like of {n} stratum labels or None, "
                        f"got {type(strata).__name__}")
    if isinstance(strata, np.ndarray) and strata.ndim != 1:
        raise ValueError(f"strata must be 1-D with one label per row of features ({n}), "
                         f"got shape {strata.shape}")
    values = strata.tolist() if isinstance(strata, np.ndarray) else list(strata)
    if len(values) != n:
        raise ValueError(f"strata must have one label per row of features ({n}), "
                         f"got {len(values)} labels")
    number: dict[Hashable, int] = {}
    out = np.empty(n, dtype=np.int64)
    for i, v in enumerate(values):
        try:
            code = number.setdefault(v, len(number))
        except TypeError:  # unhashable
            msg = f"strata must hold hashable labels, got {v!r} at position {i}"
            raise TypeError(msg) from None
        if v is None or v != v:  # None or NaN: a model without a stratum
            raise ValueError(f"strata[{i}] is {v!r}: every model needs a stratum label")
        out[i] = code
    return out


def _closed_split_by_stratum(codes: np.ndarray, n_tasks: int, s: np.ndarray,
                             rng: np.random.Generator, train_fraction: float) -> Split:
    """closed-set by stratum: train_fraction of the S strata (>= 2, and 2 left) train."""
    n_strata = int(s.max()) + 1
    if n_strata < 4:
        raise ValueError(f"closed-set HTT with strata needs at least 4 strata (2 train, 2 test), "
                         f"got {n_strata}")
    n_tr = int(np.clip(round(train_fraction * n_strata), 2, n_strata - 2))
    is_train = np.isin(s, rng.permutation(n_strata)[:n_tr])
    blocks = {"train": np.flatnonzero(is_train), "test": np.flatnonzero(~is_train)}
    return Split("closed-set", codes, n_tasks, blocks, np.arange(n_tasks), s)


def _open_split_by_stratum(codes: np.ndarray, train_tasks: np.ndarray, s: np.ndarray,
                           rng: np.random.Generator,
                           n_query: int | None) -> tuple[np.ndarray, np.ndarray]:
    """open-set by stratum: held-out positions -> (query, gallery) positions, the queries those
    of n_query of the held-out tasks' strata (None: 20%; >= 2, and 2 left for the gallery)."""
    held = np.flatnonzero(~np.isin(codes, train_tasks))
    held_strata = np.unique(s[held])
    n_held = len(held_strata)
    if n_held < 4:
        raise ValueError(f"open-set HTT with strata needs at least 4 strata among the held-out "
                         f"tasks (2 query, 2 gallery), got {n_held}")
    n_q = int(np.clip(round(0.2 * n_held), 2, n_held - 2)) if n_query is None else int(n_query)
    if not 2 <= n_q <= n_held - 2:
        raise ValueError(f"n_query={n_q} query strata: with strata it must be in [2, {n_held - 2}] "
                         f"(at least 2 of the {n_held} held-out strata in query and in gallery)")
    is_query = np.isin(s[held], rng.permutation(held_strata)[:n_q])
    return held[is_query], held[~is_query]


def _split_by_cell(codes: np.ndarray, names: np.ndarray, protocol: str,
                   rng: np.random.Generator, s: np.ndarray, train_fraction: float,
                   train_task_fraction: float, n_query: int | None) -> Split:
    """make_split without strata, applied to each (task, stratum) cell as if it were a task
    (its code stays the task's), with the strata kept for the null."""
    cell = codes * (int(s.max()) + 1) + s  # one code per (task, stratum)
    used, cells = np.unique(cell, return_inverse=True)
    cell_task = used // (int(s.max()) + 1)  # the task of each cell
    small = np.flatnonzero(np.bincount(cells) < 2)
    if small.size:
        c = used[small[0]]
        raise ValueError(f"task {names[c // (int(s.max()) + 1)].item()!r} has 1 model in a "
                         "stratum; with strata_split='cell' every (task, stratum) cell needs 2")
    n_tasks = len(names)
    if protocol == "closed-set":
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        train, test = [], []
        for c in range(len(used)):
            idx = rng.permutation(np.flatnonzero(cells == c))
            n_tr = int(np.clip(round(train_fraction * len(idx)), 1, len(idx) - 1))
            train.append(idx[:n_tr])
            test.append(idx[n_tr:])
        blocks = {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}
        return Split(protocol, codes, n_tasks, blocks, np.arange(n_tasks), s)
    if not 0.0 < train_task_fraction < 1.0:
        raise ValueError(f"train_task_fraction must be in (0, 1), got {train_task_fraction}")
    order = rng.permutation(n_tasks)
    n_train_tasks = int(np.clip(round(train_task_fraction * n_tasks), 2, n_tasks - 2))
    train_tasks = np.sort(order[:n_train_tasks])
    query, gallery = [], []
    for c in np.flatnonzero(~np.isin(cell_task, train_tasks)):
        idx = rng.permutation(np.flatnonzero(cells == c))
        n_q = int(np.clip(round(0.2 * len(idx)), 1, len(idx) - 1)) if n_query is None \
            else int(n_query)
        if n_q >= len(idx):
            raise ValueError(f"n_query={n_q} leaves no gallery in a (task, stratum) cell of "
                             f"{len(idx)} models")
        query.append(idx[:n_q])
        gallery.append(idx[n_q:])
    blocks = {"train": np.flatnonzero(np.isin(codes, train_tasks)),
              "query": np.sort(np.concatenate(query)),
              "gallery": rng.permutation(np.concatenate(gallery))}
    return Split(protocol, codes, n_tasks, blocks, train_tasks, s)


def _check_strata_split(split: Split, names: np.ndarray) -> Split:
    """Every task in every role it needs (closed-set: train and test; open-set: each held-out
    task in query and gallery), >= 2 strata per role, and a null that can move a label."""
    assert split.strata is not None
    s, codes = split.strata, split.codes
    needs = {"train": np.arange(split.n_tasks), "test": np.arange(split.n_tasks)}
    if split.protocol == "open-set":
        held = np.setdiff1d(np.arange(split.n_tasks), split.train_classes)
        needs = {"query": held, "gallery": held}
    for role, tasks in needs.items():
        missing = np.setdiff1d(tasks, codes[split.blocks[role]])
        if missing.size:
            raise ValueError(f"strata leave task {names[missing[0]].item()!r} without a {role} "
                             f"model; with strata every task needs one in each role")
    mixed = False
    for role, idx in split.blocks.items():
        n_strata = len(np.unique(s[idx]))
        if n_strata < 2:
            raise ValueError(f"strata put {n_strata} stratum in the {role} role; the split needs "
                             f"at least 2 strata in each role")
        cells = np.unique(np.stack([s[idx], codes[idx]]), axis=1)  # distinct (stratum, task)
        mixed |= bool(np.bincount(cells[0]).max() >= 2)
    if not mixed:
        raise ValueError("strata: no stratum holds models of 2 tasks in one role, so the "
                         "restricted permutations cannot move a label (one stratum per model? "
                         "then pass strata=None)")
    return split


def _seed_words(seed: SeedLike) -> list[int]:
    words = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    if not words or any(
        isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0 for w in words
    ):
        raise ValueError(f"seed must be a non-negative int or a sequence of them, got {seed!r}")
    return [int(w) for w in words]


def permuted_labels(split: Split, permutations: int, seed: SeedLike) -> dict[str, np.ndarray]:
    """The null's relabellings: role -> (permutations, n_role) task codes.

    Each row is a uniform permutation of the block's codes within the block, so every role
    keeps its per-task counts; with strata (split.strata), within each (role, stratum) cell, so
    every stratum also keeps its per-task counts in each role. Drawn from
    default_rng([*seed, 1]), block by block.
    """
    rng = np.random.default_rng([*_seed_words(seed), 1])
    out = {}
    for role, idx in split.blocks.items():
        if split.strata is None:
            tiled = np.tile(split.codes[idx], (permutations, 1))
            out[role] = rng.permuted(tiled, axis=1)
            continue
        s = split.strata[idx]  # (n,)
        order = np.argsort(s, kind="stable")  # the block grouped by stratum
        starts = np.flatnonzero(np.diff(s[order], prepend=-1))  # where each cell starts
        grouped = np.tile(split.codes[idx][order], (permutations, 1))  # (B, n)
        for lo, hi in zip(starts, [*starts[1:], len(idx)], strict=True):
            if hi - lo > 1:  # a uniform permutation of each row's cell, in place
                cell = grouped[:, lo:hi]
                rng.permuted(cell, axis=1, out=cell)
        labels = np.empty_like(grouped)
        labels[:, order] = grouped
        out[role] = labels
    return out


def observed_labels(split: Split) -> dict[str, np.ndarray]:
    return {role: split.codes[idx][None, :] for role, idx in split.blocks.items()}


def chance_levels(split: Split) -> tuple[float, dict[str, float]]:
    """Chance level of the statistic (closed-set 1/tasks, open-set E[mAP]) and of CMC@r."""
    if split.protocol == "closed-set":
        return 1.0 / split.n_tasks, {}
    yq = split.codes[split.blocks["query"]]
    g_counts = np.bincount(split.codes[split.blocks["gallery"]], minlength=split.n_tasks)
    G = len(split.blocks["gallery"])
    chance_map = float(np.mean([expected_ap(int(g_counts[t]), G) for t in yq]))
    cmc = {
        f"chance_cmc@{r}": float(np.mean([expected_cmc(int(g_counts[t]), G, r) for t in yq]))
        for r in CMC_RANKS
    }
    return chance_map, cmc
