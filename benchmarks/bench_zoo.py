"""Models per second: packed training (train_pack, K seeds at once) vs one model at a time.

The one-at-a-time baseline is the plain torch loop a researcher would write: a standard
nn.Module from distsim.zoo.models.build, torch.optim.SGD, the same mini-batch order, one seed after
another (torch.optim.Adam where DEFAULT_TRAIN says adam), evaluated on train and test at the
end in eval mode (a ResNet's BatchNorm with its running statistics). Both sides train the
quickstart-size MLP, CNN and RNN, and the default ResNet and transformer, on the first digits
pair-task with DEFAULT_TRAIN settings, in one run, side by side. The packed ResNet also makes
its one pass over the training set for the BatchNorm statistics (distsim.zoo.resnet).

    python benchmarks/bench_zoo.py [--device cpu|cuda] [--quick] [--threads N] [--packs 1,8,32,64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from distsim.config.arch import ArchConfig
from distsim.config.data import DataConfig
from distsim.config.training import DEFAULT_TRAIN, TrainConfig
from distsim.zoo.tasks import Task, make_tasks
from distsim.zoo.train import batch_orders, init_model, train_pack


def one_at_a_time(
    task: Task, arch: ArchConfig, seeds: list[int], cfg: TrainConfig, device: str
) -> float:
    """Seconds to train and evaluate ``seeds`` one after another with nn.Module + optim.SGD."""
    arch = arch.with_task_shape(task.input_shape, task.num_classes)
    x = torch.as_tensor(task.x_train, device=device)
    y = torch.as_tensor(task.y_train, device=device)
    x_test = torch.as_tensor(task.x_test, device=device)
    y_test = torch.as_tensor(task.y_test, device=device)
    start = time.perf_counter()
    for seed in seeds:
        model = init_model(arch, seed).to(device)
        opt: torch.optim.Optimizer = (
            torch.optim.Adam(model.parameters(), lr=cfg.lr) if cfg.optimizer == "adam"
            else torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum))
        model.train()
        for order in batch_orders([seed], len(x), cfg.epochs):
            order = torch.as_tensor(order[0], device=device)
            for lo in range(0, len(x), cfg.batch_size):
                idx = order[lo : lo + cfg.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            for xe, ye in ((x, y), (x_test, y_test)):
                logits = model(xe)
                float(F.cross_entropy(logits, ye)), float((logits.argmax(1) == ye).double().mean())
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def packed(task: Task, arch: ArchConfig, seeds: list[int], cfg: TrainConfig) -> float:
    """Seconds for train_pack on all ``seeds`` at once (results copied back to the CPU)."""
    start = time.perf_counter()
    results = train_pack(task, arch, seeds, cfg)
    assert all(r.status == "ok" for r in results)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--quick", action="store_true", help="2 epochs, K up to 32, 4 baseline seeds"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--packs", default="1,8,32,64", help="pack sizes K, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = make_tasks(DataConfig(dataset="digits", num_tasks=1, seed=0))[0]
    packs = [int(k) for k in args.packs.split(",")]
    if args.quick:
        packs = [k for k in packs if k <= 32]
    n_alone = 4 if args.quick else 8
    print(f"task {task.name}: {len(task.x_train)} train / {len(task.x_test)} test samples; "
          f"device {args.device}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    rows = []
    for kind in ("mlp", "cnn", "rnn", "resnet", "transformer"):
        arch = ArchConfig(kind=kind)
        base = DEFAULT_TRAIN[kind]
        cfg = TrainConfig(**{**base.__dict__, "device": args.device,
                             "epochs": 2 if args.quick else base.epochs})
        packed(task, arch, [0, 1], cfg)  # warm-up (allocator, kernels, CUDA context)
        one_at_a_time(task, arch, [0], cfg, args.device)
        t_alone = one_at_a_time(task, arch, list(range(n_alone)), cfg, args.device)
        alone_rate = n_alone / t_alone
        rows.append((kind, "one at a time", 1, t_alone / n_alone, alone_rate, 1.0))
        for k in packs:
            t = packed(task, arch, list(range(k)), cfg)
            rows.append((kind, "packed", k, t / k, k / t, (k / t) / alone_rate))
        model = init_model(arch.with_task_shape(task.input_shape, 2), 0)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"  {kind}: {cfg.epochs} epochs, batch {cfg.batch_size}, {n_params} params",
              flush=True)
    print()
    print(f"| {'arch':11} | {'mode':13} | {'K':>3} | {'s/model':>8} | {'models/s':>8} "
          f"| {'vs one-at-a-time':>16} |")
    print(f"|{'-' * 13}|{'-' * 15}|{'-' * 5}|{'-' * 10}|{'-' * 10}|{'-' * 18}|")
    for kind, mode, k, spm, rate, ratio in rows:
        print(f"| {kind:11} | {mode:13} | {k:>3} | {spm:8.4f} | {rate:8.1f} | {ratio:15.1f}x |")
    for r in rows:
        if r[0] == "mlp" and r[1] == "packed" and r[2] == 32:
            print(f"\nMLP packed K=32 vs one at a time: {r[5]:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
