"""Packed SGD training: K seeds of one architecture on one task, trained together.

A *pack* stacks the parameters of K models along a new leading axis and trains them with one
batched call per step (``torch.func.functional_call`` under ``torch.func.vmap``: a Linear
becomes a batched matmul, a Conv2d a grouped convolution). Packing is an optimization, not a
different experiment: seed s inside a pack is the same run as seed s trained alone.

- Init of seed s: ``torch.manual_seed(s); build(arch_config.with_task_shape(...))`` (the
  caller's global RNG state is restored afterwards), see :func:`init_model`.
- Mini-batch order of seed s: ``numpy.random.default_rng((s, 1))`` draws one permutation of
  the training set per epoch (the last batch may be smaller); it depends on s alone.
- Optimizer: SGD with momentum, the update of ``torch.optim.SGD`` (dampening 0, optional
  Nesterov and weight decay), or Adam with the update of ``torch.optim.Adam``; the learning
  rate is multiplied by gamma at each epoch in ``milestones`` (``MultiStepLR``).
- Divergence: a seed whose loss or updated weights turn non-finite is frozen at its last
  finite weights and reported ``diverged``; the other seeds of the pack go on.
- History: per seed and completed epoch, the training loss and accuracy of the epoch's
  mini-batches as they were trained (summed on the device, no extra forward pass) and the test
  loss and accuracy after the epoch (one batched pass over the test split per epoch), see
  :class:`SeedResult`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distsim.config.arch import ArchConfig
from distsim.config.training import DEVICES, TrainConfig
from distsim.zoo.models import build, forward_packed, running_statistics
from distsim.zoo.tasks import Task

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # TrainConfig.dtype
GATHER_BYTES = 64 * 2**20  # memory for the gathered mini-batches of a pack
BATCH_STREAM = 1  # second word of the batch-order seed: default_rng((seed, BATCH_STREAM))
HISTORY_COLUMNS = ("train_loss", "train_acc", "test_loss", "test_acc")  # SeedResult.history


@dataclass(frozen=True, eq=False)
class SeedResult:
    """One trained solution. state_dict: CPU tensors in the training dtype (float32 by default).

    seconds: the pack's wall time divided by its size (the seed's share of the compute).
    epochs: epochs completed with finite loss and weights (less than asked when diverged).
    history: (epochs, 4) float64, row e = after epoch e + 1, columns HISTORY_COLUMNS; None
        when trained with ``record_history=False``. train_loss / train_acc: over the epoch's n
        training samples, each scored by the step that trained on it, before its update (the
        mini-batch means weighted by batch size). test_loss / test_acc: the weights at the end
        of the epoch on the test split, with TrainConfig.test_history (else NaN but in the last
        row). A seed that trained every epoch has the final test_loss / test_acc in its last
        row (the same evaluation fills both); a diverged seed
        has one row per completed epoch, none for the epoch it diverged in (its test_loss /
        test_acc are those of its frozen weights, part-way through that epoch).
    checkpoints: one per epoch of TrainConfig.save_epochs before the last, in order: the
        weights at the end of that epoch (0: the initialization), evaluated on both splits
        after training as the final weights are. A seed that diverged by then keeps its
        frozen weights there, with status "diverged".
    """

    seed: int
    state_dict: dict[str, torch.Tensor]
    train_acc: float
    test_acc: float
    train_loss: float
    test_loss: float
    epochs: int
    seconds: float
    status: str
    history: np.ndarray | None = None
    checkpoints: tuple[Checkpoint, ...] = ()


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A seed's weights at the end of one saved epoch (TrainConfig.save_epochs), its metrics
    on both splits (HISTORY_COLUMNS order) and status ("ok" or "diverged")."""

    epoch: int
    state_dict: dict[str, torch.Tensor]
    metrics: tuple[float, float, float, float]
    status: str


def init_model(arch_config: ArchConfig, seed: int) -> nn.Module:
    """The untrained model of ``seed``: torch.manual_seed(seed) then build(); global RNG untouched.

    Only the CPU generator is seeded (models are built on the CPU), which gives the same weights
    as ``torch.manual_seed(seed)`` without its per-call cost of queueing lazy CUDA seeding.
    """
    state = torch.get_rng_state()
    try:
        torch.default_generator.manual_seed(int(seed))
        return build(arch_config)
    finally:
        torch.set_rng_state(state)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is an error."""
    if device not in DEVICES:
        raise ValueError(f"train.device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but torch sees no CUDA device (use 'cpu' or 'auto')")
    return torch.device(device)


def batch_orders(seeds: Sequence[int], n: int, epochs: int) -> Iterator[np.ndarray]:
    """Per epoch, a (K, n) int64 array: row k is seed k's permutation of the n training samples."""
    rngs = [np.random.default_rng((s, BATCH_STREAM)) for s in seeds]
    for _ in range(epochs):
        yield np.stack([rng.permutation(n) for rng in rngs])


def train_pack(
    task: Task,
    arch_config: ArchConfig,
    seeds: Sequence[int],
    train_config: TrainConfig | None = None,
    init_seeds: Sequence[int] | None = None,
    record_history: bool = True,
) -> list[SeedResult]:
    """Train one model per seed on ``task`` as one pack; results in the order of ``seeds``.
    ``init_seeds`` (one per seed): initialize model k from init_seeds[k] instead of seeds[k]
    (a zoo whose models share initial weights across tasks); the batch order stays seeds[k]'s.
    ``record_history=False`` skips the per-epoch history (SeedResult.history is None); it
    exists to measure the history's cost (benchmarks/bench_history.py)."""
    cfg = train_config if train_config is not None else TrainConfig()
    seeds = _check_args(task, arch_config, cfg, seeds)
    device, dtype = resolve_device(cfg.device), TORCH_DTYPES[cfg.dtype]
    arch = arch_config.with_task_shape(task.input_shape, task.num_classes)
    start = time.perf_counter()

    if init_seeds is not None and len(init_seeds) != len(seeds):
        raise ValueError(f"init_seeds must have one seed per model ({len(seeds)}), "
                         f"got {len(init_seeds)}")
    models = [init_model(arch, s) for s in (seeds if init_seeds is None else init_seeds)]
    template, k = models[0], len(seeds)
    params = _stack(models, device, dtype)  # (K, *shape) per parameter, row i = seed i
    for name, p in params.items():  # TrainConfig.init_scale: matrices and kernels, not biases
        if p.dim() > 2 and not name.rpartition(".")[2].startswith("b_"):  # (K, out, in, ...)
            p.mul_(cfg.init_scale)
    saved: dict[int, tuple[dict[str, torch.Tensor], set[int]]] = {}  # epoch -> (K,...), diverged
    if 0 in cfg.save_epochs:
        saved[0] = ({m: p.detach().clone() for m, p in params.items()}, set())
    x_train = torch.as_tensor(task.x_train, device=device, dtype=dtype)  # (n, C, H, W)
    y_train = torch.as_tensor(task.y_train, device=device)  # (n,)
    x_test = torch.as_tensor(task.x_test, device=device, dtype=dtype)
    y_test = torch.as_tensor(task.y_test, device=device)
    n = x_train.shape[0]
    batches = _Batches(x_train, y_train, cfg.batch_size, k)
    opt = _Optimizer(cfg, params)
    active = torch.arange(k, device=device)  # rows of the pack still training
    frozen: dict[int, tuple[dict[str, torch.Tensor], int]] = {}  # diverged row -> (weights, epochs)
    lr = cfg.lr
    # history[e, row]: HISTORY_COLUMNS after epoch e + 1, kept on the device until the end
    history = torch.full((cfg.epochs, k, 4), math.nan, dtype=torch.float64, device=device)
    for epoch, order in enumerate(batch_orders(seeds, n, cfg.epochs)):
        scores = _TrainScores(k, batches.steps, device)  # this epoch's training loss and hits
        for xb, yb in batches.epoch(torch.as_tensor(order, device=device), active):
            # xb (K', b, C, H, W), yb (K', b): the next mini-batch of every active seed
            for p in params.values():
                p.requires_grad_(True)
            logits = forward_packed(template, params, xb)  # (K', b, classes)
            losses = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none")
            losses = losses.view(len(active), -1)  # (K', b)
            loss = losses.mean(dim=1)  # (K',): each seed's own mean loss
            if record_history:
                scores.add(active, losses.detach(), logits.detach(), yb)
            # Seeds are independent, so d(sum of losses)/d(params of k) = d(loss_k)/d(params of k).
            grads = torch.autograd.grad(loss.sum(), list(params.values()))
            with torch.no_grad():
                new = opt.step(params, grads, lr)  # (K', *shape) per parameter
                keep = _freeze_diverged(loss, params, new, active, epoch, frozen)
            if keep is not None:  # the diverged rows leave the weights, batches and optimizer
                active, new = active[keep], {m: p[keep] for m, p in new.items()}
                batches.keep(keep, active)
                opt.keep(keep)
            params = new
            if len(active) == 0:
                break
        if len(active) == 0:
            break
        if record_history:
            history[epoch, active, :2] = (scores.total() / n)[active]
            if cfg.test_history and epoch + 1 < cfg.epochs:  # the last epoch's: the final ones
                with torch.no_grad():
                    weights = _with_statistics(template, params, x_train, cfg.batch_size)
                    history[epoch, active, 2:] = torch.stack(
                        _evaluate(template, weights, x_test, y_test, cfg.eval_batch), dim=1)
        if epoch + 1 in cfg.milestones:
            lr *= cfg.gamma
        if epoch + 1 in cfg.save_epochs and epoch + 1 < cfg.epochs:
            with torch.no_grad():
                saved[epoch + 1] = (_reassemble(params, active, frozen, k), set(frozen))

    with torch.no_grad():  # the whole pack again (K, *shape), evaluated at once
        params = _reassemble(params, active, frozen, k)
        params = _with_statistics(template, params, x_train, cfg.batch_size)
        metrics = _metrics(template, params, x_train, y_train, x_test, y_test, cfg.eval_batch)
        history[-1, :, 2:] = torch.as_tensor(np.stack(metrics[2:], axis=1), device=device)
        checkpoints = []  # (epoch, (K, *shape) weights, rows diverged by then, metrics)
        for e in (e for e in cfg.save_epochs if e < cfg.epochs):
            weights, gone = saved.get(e, (params, set(frozen)))  # not reached: all diverged
            weights = _with_statistics(template, weights, x_train, cfg.batch_size)
            checkpoints.append((e, weights, gone, _metrics(template, weights, x_train, y_train,
                                                           x_test, y_test, cfg.eval_batch)))
    hist = history.cpu().numpy() if record_history else None
    epochs = [frozen[i][1] if i in frozen else cfg.epochs for i in range(k)]
    seconds = (time.perf_counter() - start) / k
    names = list(template.state_dict())
    results = _seed_results(seeds, names, params, metrics, hist, epochs, set(frozen), seconds)
    return [dataclasses.replace(r, checkpoints=tuple(
        Checkpoint(e, {n: w[n][i].cpu().clone() for n in names},
                   tuple(float(m[i]) for m in ms),  # type: ignore[arg-type]
                   "diverged" if i in gone else "ok")
        for e, w, gone, ms in checkpoints)) for i, r in enumerate(results)]


def _with_statistics(template: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                     batch_size: int) -> dict[str, torch.Tensor]:
    """The pack's parameters (K, *shape) and, for a model with BatchNorm, every BatchNorm's
    running statistics of those weights on the training inputs x (zoo.models.running_statistics:
    one pass in training-size batches; BatchNorm trains on batch statistics, and the running
    ones, which evaluation and the saved state dict use, are computed from the weights)."""
    weights = {name: params[name] for name, _ in template.named_parameters()}
    return {**weights, **running_statistics(template, weights, x, batch_size)}


def _metrics(template: nn.Module, params: dict[str, torch.Tensor], x_train: torch.Tensor,
             y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
             eval_batch: int) -> list[np.ndarray]:
    """The pack's (K, *shape) weights on both splits: four (K,) arrays, as HISTORY_COLUMNS."""
    train = _evaluate(template, params, x_train, y_train, eval_batch)
    test = _evaluate(template, params, x_test, y_test, eval_batch)
    return [t.cpu().numpy() for t in (*train, *test)]


class _Batches:
    """The mini-batches of every training seed, gathered ``steps`` steps at a time (the whole
    epoch when it fits GATHER_BYTES): one indexing of the training set per chunk of steps."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, k: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        sample_bytes = x[0].numel() * x.element_size()
        self.steps = max(1, GATHER_BYTES // (k * batch_size * sample_bytes))
        self.chunk = batch_size * self.steps  # samples per seed gathered at once
        self.active = torch.arange(k, device=x.device)
        self.x_chunk, self.y_chunk = x[:0], y[:0]

    def epoch(self, order: torch.Tensor, active: torch.Tensor
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's mini-batches (K', b, C, H, W), (K', b) of the `active` rows, row k in
        seed k's `order` (K, n); the last one may be smaller."""
        self.active = active
        b, chunk = self.batch_size, self.chunk
        for lo in range(0, order.shape[1], b):
            if lo % chunk == 0:  # gather the next chunk of steps' batches of every seed at once
                idx = order[self.active, lo : lo + chunk]  # (K', chunk)
                self.x_chunk, self.y_chunk = self.x[idx], self.y[idx]
            step = slice(lo % chunk, lo % chunk + b)
            yield self.x_chunk[:, step], self.y_chunk[:, step]

    def keep(self, rows: torch.Tensor, active: torch.Tensor) -> None:
        """Only `rows` of the gathered batches go on training (now the pack's `active` rows)."""
        self.active = active
        self.x_chunk, self.y_chunk = self.x_chunk[rows], self.y_chunk[rows]


class _TrainScores:
    """One epoch's training loss and hits per seed, each sample scored by the step that
    trained on it: the steps' outputs are kept as they are and reduced ``steps`` at a time
    (bounded memory, one batched reduction per chunk of steps, :func:`_trained_sums`)."""

    def __init__(self, k: int, steps: int, device: torch.device) -> None:
        self.k, self.steps, self.device = k, steps, device
        self.sums = torch.zeros(k, 2, dtype=torch.float64, device=device)  # loss, hits
        self.trained: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, active: torch.Tensor, losses: torch.Tensor, logits: torch.Tensor,
            yb: torch.Tensor) -> None:
        """One step: its active rows, losses (K', b), logits (K', b, classes), labels (K', b)."""
        if len(self.trained) == self.steps:  # a chunk of steps is complete: reduce it
            self.sums += _trained_sums(self.trained, self.k, self.device)
            self.trained.clear()
        self.trained.append((active, losses, logits, yb))

    def total(self) -> torch.Tensor:
        """(K, 2) float64: each row's summed loss and hits over the epoch's steps so far."""
        return self.sums + _trained_sums(self.trained, self.k, self.device)


def _freeze_diverged(loss: torch.Tensor, params: dict[str, torch.Tensor],
                     new: dict[str, torch.Tensor], active: torch.Tensor, epoch: int,
                     frozen: dict[int, tuple[dict[str, torch.Tensor], int]]
                     ) -> torch.Tensor | None:
    """Freeze every active row whose loss (K',) or updated weights `new` are not finite at its
    last finite weights `params`: ``frozen[pack row] = (weights, epochs completed)``. Returns
    the positions (among the active rows) that go on training, None when all are finite."""
    finite = torch.isfinite(loss + sum(p.flatten(1).sum(dim=1) for p in new.values()))
    if bool(finite.all()):
        return None
    for row in torch.nonzero(~finite).flatten().tolist():
        frozen[int(active[row])] = ({m: p[row].detach() for m, p in params.items()}, epoch)
    return torch.nonzero(finite).flatten()


def _reassemble(params: dict[str, torch.Tensor], active: torch.Tensor,
                frozen: dict[int, tuple[dict[str, torch.Tensor], int]],
                k: int) -> dict[str, torch.Tensor]:
    """The whole pack's parameters (K, *shape): the active rows' trained weights `params`
    (K', *shape) and the frozen rows' last finite ones, each in its row."""
    out = {}
    for name, p in params.items():
        full = torch.empty(k, *p.shape[1:], dtype=p.dtype, device=p.device)
        full[active] = p.detach()
        for row, (weights, _) in frozen.items():
            full[row] = weights[name]
        out[name] = full
    return out


def _seed_results(seeds: Sequence[int], names: Sequence[str], params: dict[str, torch.Tensor],
                  metrics: Sequence[np.ndarray], history: np.ndarray | None,
                  epochs: Sequence[int], diverged: set[int],
                  seconds: float) -> list[SeedResult]:
    """One SeedResult per row of the pack: its weights (`names` of the state dict, from the
    (K, *shape) `params`), final metrics (four (K,) arrays, as HISTORY_COLUMNS), its `epochs`
    rows of `history` (epochs, K, 4) and status."""
    train_loss, train_acc, test_loss, test_acc = metrics
    cpu = {name: p.cpu() for name, p in params.items()}
    return [
        SeedResult(
            seed=seed,
            state_dict={name: cpu[name][i].clone() for name in names},
            train_acc=float(train_acc[i]),
            test_acc=float(test_acc[i]),
            train_loss=float(train_loss[i]),
            test_loss=float(test_loss[i]),
            epochs=epochs[i],
            seconds=seconds,
            status="diverged" if i in diverged else "ok",
            history=None if history is None else history[: epochs[i], i].copy(),
        )
        for i, seed in enumerate(seeds)
    ]


def _check_args(task: Task, arch_config: ArchConfig, cfg: TrainConfig,
                seeds: Sequence[int]) -> list[int]:
    """The types train_pack() takes, and its seeds as checked ints."""
    if not isinstance(task, Task):
        raise TypeError(f"train_pack() takes a Task, got {type(task).__name__}")
    if not isinstance(arch_config, ArchConfig):
        raise TypeError(f"train_pack() takes an ArchConfig, got {type(arch_config).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train_config must be a TrainConfig, got {type(cfg).__name__}")
    return _check_seeds(seeds)


def _stack(models: Sequence[nn.Module], device: torch.device,
           dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The models' parameters stacked as one pack: (K, *shape) per parameter, row i = model i."""
    return {
        name: torch.stack([m.get_parameter(name).detach() for m in models]).to(device, dtype)
        for name, _ in models[0].named_parameters()
    }


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    if (isinstance(seeds, (str, bytes)) or not isinstance(seeds, (Sequence, np.ndarray))
            or len(seeds) == 0):
        raise ValueError(f"seeds must be a non-empty sequence of ints, got {seeds!r}")
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"seeds must be non-negative ints, got {s!r}")
        out.append(int(s))
    if len(set(out)) != len(out):
        raise ValueError("seeds must be distinct (a repeated seed is the same experiment), "
                         f"got {out}")
    return out


class _Optimizer:
    """SGD-momentum / Adam on stacked (K, ...) tensors, the foreach maths of torch.optim.

    The optimizer state is updated in place; the parameters are returned as new tensors, so
    that the caller still holds the previous (finite) ones when a seed diverges.
    """

    def __init__(self, cfg: TrainConfig, params: dict[str, torch.Tensor]) -> None:
        self.cfg, self.t = cfg, 0
        n_state = 2 if cfg.optimizer == "adam" else (1 if cfg.momentum else 0)
        self.state = [[torch.zeros_like(p) for p in params.values()] for _ in range(n_state)]

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the optimizer state of every row not in ``rows`` (diverged seeds)."""
        self.state = [[s[rows] for s in group] for group in self.state]

    def step(
        self, params: dict[str, torch.Tensor], grads: Sequence[torch.Tensor], lr: float
    ) -> dict:
        cfg, names, p = self.cfg, list(params), [t.detach() for t in params.values()]
        self.t += 1
        g: list[torch.Tensor] = list(grads)
        if cfg.weight_decay:
            g = list(torch._foreach_add(g, p, alpha=cfg.weight_decay))
        if cfg.optimizer == "sgd":
            if cfg.momentum:
                if self.t == 1:  # torch.optim.SGD starts the buffer at the first gradient
                    self.state[0] = [gi.clone() for gi in g]
                else:
                    torch._foreach_mul_(self.state[0], cfg.momentum)
                    torch._foreach_add_(self.state[0], g)
                bufs = self.state[0]
                g = list(torch._foreach_add(g, bufs, alpha=cfg.momentum)) if cfg.nesterov else bufs
            new = torch._foreach_add(p, g, alpha=-lr)
        else:
            (b1, b2), (m, v) = cfg.betas, self.state
            torch._foreach_lerp_(m, g, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, g, g, 1 - b2)
            bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(bc2))
            torch._foreach_add_(denom, cfg.eps)
            new = torch._foreach_addcdiv(p, m, denom, -lr / bc1)
        return dict(zip(names, new, strict=True))


def _trained_sums(trained: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                  k: int, device: torch.device) -> torch.Tensor:
    """(K, 2) float64: each row's summed loss and hits over some steps' training samples, each
    scored by the step that trained on it, from the steps' (active rows, losses (K', b), logits
    (K', b, classes), labels (K', b)). One batched reduction for many steps, not one per step."""
    out = torch.zeros(k, 2, dtype=torch.float64, device=device)
    if not trained:
        return out
    rows = trained[0][0]
    if all(a is rows for a, *_ in trained):  # no seed diverged this epoch: one batched pass
        losses = torch.cat([t[1] for t in trained], dim=1)  # (K', n)
        hits = torch.cat([t[2].argmax(dim=-1) == t[3] for t in trained], dim=1)
        out[rows, 0] = losses.double().sum(dim=1)
        out[rows, 1] = hits.sum(dim=1).double()
    else:
        for active, losses, logits, yb in trained:
            out[active, 0] += losses.double().sum(dim=1)
            out[active, 1] += (logits.argmax(dim=-1) == yb).sum(dim=1).double()
    return out


def _evaluate(
    template: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy of every pack row on x (N, C, H, W), y (N,): two (K,)
    float64 tensors on the parameters' device (no host sync)."""
    first = next(iter(params.values()))
    k, device, dtype = first.shape[0], first.device, first.dtype
    batch = max(1, min(batch, GATHER_BYTES // (k * x[0].numel() * first.element_size())))
    loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
    correct = torch.zeros(k, dtype=torch.int64, device=device)
    for lo in range(0, len(x), batch):
        xb = torch.as_tensor(x[lo : lo + batch], device=device, dtype=dtype)
        yb = torch.as_tensor(y[lo : lo + batch], device=device)
        logits = forward_packed(template, params, xb.expand(k, *xb.shape))  # (K, b, classes)
        loss = F.cross_entropy(logits.flatten(0, 1), yb.repeat(k), reduction="none").view(k, -1)
        loss_sum += loss.double().sum(dim=1)
        correct += (logits.argmax(dim=-1) == yb).sum(dim=1)
    return loss_sum / len(x), correct.double() / len(x)
