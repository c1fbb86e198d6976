"""HTT test statistics of task embeddings, and their exact chance levels under random ranking.

closed-set: accuracy of assigning each held-out embedding to the task whose training centroid is
nearest in cosine. open-set: embeddings are L2-normalised and scored by dot product; queries rank
the gallery; mAP and CMC (P(a relevant item in the top r), r in CMC_RANKS). All are batched over
B label assignments. Cosines are rounded to 10 decimals before ranking, so that ties in exact
arithmetic (e.g. the +-1 cosines of a 1-D embedding) stay ties whatever the float rounding of
the solver; ties then break by position (lowest task code; the gallery's stored order).
"""

from __future__ import annotations

import numpy as np

CMC_RANKS = (1, 5, 10)
_DECIMALS = 10
QUERY_BLOCK_BYTES = 64 * 2**20  # working memory of one block of queries in retrieval_scores


def _unit(Z: np.ndarray) -> np.ndarray:
    return Z / np.maximum(np.linalg.norm(Z, axis=-1, keepdims=True), 1e-300)


def centroid_accuracy(
    Ztr: np.ndarray, Zte: np.ndarray, ytr: np.ndarray, yte: np.ndarray, n_tasks: int
) -> np.ndarray:
    """Nearest training centroid in cosine -> (B,) accuracy on the test rows.

    Ztr (B, n, k), Zte (B, m, k) embeddings; ytr (B, n), yte (B, m) task codes in 0..n_tasks-1.

    >>> Ztr = np.array([[[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.2, 1.0]]])  # B = 1
    >>> ytr = np.array([[0, 0, 1, 1]])
    >>> Zte = np.array([[[1.0, 0.1], [0.1, 1.0]]])
    >>> centroid_accuracy(Ztr, Zte, ytr, np.array([[0, 1]]), n_tasks=2).tolist()
    [1.0]
    >>> centroid_accuracy(Ztr, Zte, ytr, np.array([[1, 1]]), n_tasks=2).tolist()
    [0.5]
    """
    onehot = (ytr[..., None] == np.arange(n_tasks)).astype(np.float64)  # (B, n, T)
    centroids = _unit(np.matmul(np.swapaxes(onehot, 1, 2), Ztr))  # (B, T, k); sum ∝ mean
    cosine = np.round(np.matmul(_unit(Zte), np.swapaxes(centroids, 1, 2)), _DECIMALS)
    pred = np.argmax(cosine, axis=-1)  # ties (equal to 1e-10) go to the lowest task code
    return (pred == yte).mean(axis=1)


def retrieval_scores(
    Zq: np.ndarray, Zg: np.ndarray, yq: np.ndarray, yg: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Queries vs gallery -> (mAP (B,), CMC (B, len(CMC_RANKS))).

    Zq (B, q, k), Zg (B, g, k) embeddings; yq (B, q), yg (B, g) task codes. Tied scores keep
    the gallery's order. Queries run in blocks of about QUERY_BLOCK_BYTES of
    (B, block, g) scores, so memory does not grow with q x g.

    One query of task 0; its gallery ranks [1, 0] (relevant), [1, 0.2], [0, 1] (relevant):

    >>> Zq = np.array([[[1.0, 0.0]]])
    >>> Zg = np.array([[[1.0, 0.2], [0.0, 1.0], [1.0, 0.0]]])
    >>> mean_ap, cmc = retrieval_scores(Zq, Zg, np.array([[0]]), np.array([[1, 0, 0]]))
    >>> mean_ap.round(4).tolist(), cmc.tolist()  # AP = (1/1 + 2/3) / 2; CMC@1, @5, @10
    ([0.8333], [[1.0, 1.0, 1.0]])
    """
    B, q, g = Zq.shape[0], Zq.shape[1], Zg.shape[1]
    Uq, Ug = _unit(Zq), np.swapaxes(_unit(Zg), 1, 2)
    ap, cmc = np.empty((B, q)), np.empty((B, q, len(CMC_RANKS)))
    step = max(1, QUERY_BLOCK_BYTES // (56 * B * g))  # bytes per score held below
    for a in range(0, q, step):
        sl = slice(a, min(q, a + step))
        # One int64 sort key per (query, item): the cosine rounded to _DECIMALS (as np.round
        # rounds it) descending, then the gallery position, and in the lowest bit whether the
        # item is relevant; |key| < 2 (10^10 + 1) g, far inside int64 for any g that fits memory.
        cosine = np.rint(np.matmul(Uq[:, sl], Ug) * 10.0**_DECIMALS).astype(np.int64)
        key = (np.arange(g) - g * cosine) * 2 + (yq[:, sl, None] == yg[:, None, :])
        rel = np.sort(key, axis=-1) & 1  # (B, block, g) relevance in ranked order
        hits = np.cumsum(rel, axis=-1)
        precision = hits / np.arange(1, g + 1)
        ap[:, sl] = (precision * rel).sum(axis=-1) / rel.sum(axis=-1)
        cmc[:, sl] = np.stack([hits[..., min(r, g) - 1] > 0 for r in CMC_RANKS], axis=-1)
    return ap.mean(axis=1), cmc.mean(axis=1)


def expected_ap(n_rel: int, n_gallery: int) -> float:
    """Exact E[AP] of one query under a uniformly random ranking of n_gallery items, n_rel relevant.

    E[AP] = (H_G + (R - 1)/(G - 1) * (G - H_G)) / G with H_G the G-th harmonic number: the
    chance level of the open-set mAP, averaged over the queries.

    >>> round(expected_ap(1, 4), 4)  # one relevant item: the mean of 1/rank over ranks 1..4
    0.5208
    >>> expected_ap(4, 4)  # every item relevant
    1.0
    """
    G, R = n_gallery, n_rel
    H = float(np.sum(1.0 / np.arange(1, G + 1)))
    return (H + (R - 1) / (G - 1) * (G - H)) / G if G > 1 else 1.0


def expected_cmc(n_rel: int, n_gallery: int, rank: int) -> float:
    """P(at least one of n_rel relevant items in the top `rank` of a random ranking of n_gallery).

    The chance level of CMC@rank for one query.

    >>> expected_cmc(1, 10, 5)  # the one relevant item among the top 5 of 10
    0.5
    >>> round(expected_cmc(2, 4, 1), 4)
    0.5
    """
    r = min(rank, n_gallery)
    miss = np.prod((n_gallery - n_rel - np.arange(r)) / (n_gallery - np.arange(r)))
    return float(1.0 - max(float(miss), 0.0))
