"""Training zoo members, many at once.

K members train together: their flat parameters are one [K, P] tensor, the forward
is `rnnrep.lstm.forward` (batched matmuls over members), and one Adam over that
tensor is K independent AdamW optimisers, because Adam is elementwise and the
decoupled weight decay is applied per member (MNIST members each draw their own).

Each member owns a `torch.Generator` seeded from (zoo seed, member_id): its init,
its training data and its rollouts come from it alone, so a member's result does
not depend on which other members it shared a batch with.

Training follows the reference exactly: update s (s = 0..steps) uses the learning
rate of schedule(s - 1) (the reference sets it after each step), and the snapshot
at step s is taken after update s, so "step 0" is the member after one update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rnnrep import lstm
from rnnrep.config import ZooConfig
from rnnrep.tasks import formal_languages as fl
from rnnrep.tasks import sequential_mnist as mnist


@dataclass(frozen=True)
class MemberPlan:
    """What a member is, fixed before it trains: derived from (zoo seed, member_id)."""

    member_id: int
    seed: int
    task: tuple[float, ...]  # FL: (m_b, m_c, m_d); MNIST: (angle,)
    weight_decay: float


def plan_member(cfg: ZooConfig, member_id: int) -> MemberPlan:
    seq = np.random.SeedSequence([cfg.seed, member_id])
    seed = int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    rng = np.random.default_rng(seq.spawn(1)[0])
    if cfg.task == "formal-languages":
        task = tuple(float(v) for v in rng.integers(-3, 3, size=3))
    else:
        task = (float(rng.uniform(0.0, 360.0)),)
    weight_decay = float(cfg.weight_decay[rng.integers(len(cfg.weight_decay))])
    return MemberPlan(member_id, seed, task, weight_decay)


def lr_at(cfg: ZooConfig, step: int) -> float:
    """Piecewise linear: lr[0] at 0, lr[1] at steps/2, lr[2] at steps (the paper's 0/10k/20k)."""
    t = (0.0, cfg.steps / 2, float(cfg.steps))
    v = cfg.lr
    if step < t[1]:
        return v[0] + (v[1] - v[0]) * step / t[1]
    if step < t[2]:
        return v[1] + (v[2] - v[1]) * (step - t[1]) / (t[2] - t[1])
    return v[2]


@dataclass
class Snapshot:
    """One snapshot of K members: arrays with a leading member axis."""

    step: int
    index: int
    params: np.ndarray  # float32 [K, P]
    rollouts: dict[str, np.ndarray]  # FL: sequences; MNIST: inputs, labels
    logits: np.ndarray  # float16 [K, R, T, O]
    metrics: dict[str, np.ndarray]  # float32 [K] each


class Task:
    """What a batch of members learns: training batches and snapshot evaluation."""

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def evaluate(self, flat: Tensor) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
        raise NotImplementedError


class FormalLanguageTask(Task):
    BLOCK = 256  # steps of training strings drawn at once per member

    def __init__(self, cfg: ZooConfig, plans: list[MemberPlan], generators: list[torch.Generator], device):
        self.cfg, self.gens, self.device = cfg, generators, device
        self.offsets = torch.tensor([p.task for p in plans], dtype=torch.long)
        self._block_start, self._block = -1, None

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        start = step - step % self.BLOCK
        if start != self._block_start:
            n = torch.stack(
                [fl.sample_n(m, (self.BLOCK, self.cfg.batch_size), g) for m, g in zip(self.offsets, self.gens)]
            )  # [K, S, B]
            self._block = fl.strings_from_n(n, self.offsets[:, None, None, :]).to(self.device)
            self._block_start = start
        tokens = self._block[:, step - start]  # [K, B, 42]
        x = F.one_hot(tokens[..., :-1], fl.VOCAB).float()
        return x, tokens[..., 1:]

    @torch.no_grad()
    def evaluate(self, flat: Tensor):
        """Sample `eval_samples` strings per member from BOS; keep the first `rollouts`."""
        cfg, spec = self.cfg, self.cfg.spec
        K, N, T = flat.shape[0], cfg.eval_samples, fl.SEQ_LEN - 1
        # inverse-CDF sampling from per-member uniforms keeps each member's stream its own
        u = torch.stack([torch.rand(N, T, generator=g) for g in self.gens]).to(flat.device)
        u = u.permute(2, 0, 1).contiguous()  # [T, K, N]
        R = cfg.rollouts
        tokens = torch.full((K, T + 1, N), fl.BOS, dtype=torch.long, device=flat.device)
        logps = flat.new_empty(K, R, T, fl.VOCAB)
        step = lstm.Stepper(spec, flat, N)
        x = step.input  # [K, VOCAB, N]: the one-hot previous token, written in place
        for t in range(T):
            x.zero_().scatter_(1, tokens[:, t : t + 1], 1.0)
            logp = torch.log_softmax(step(), dim=1)  # [K, VOCAB, N]: classes on dim 1
            cdf = logp.exp().cumsum(1)
            nxt = (cdf < u[t].unsqueeze(1) * cdf[:, -1:]).sum(1).clamp_max(fl.VOCAB - 1)
            tokens[:, t + 1] = nxt
            logps[:, :, t] = logp[:, :, :R].transpose(1, 2)
        tokens = tokens.transpose(1, 2).contiguous()  # [K, N, T + 1]
        correct, _, strict = fl.accept(tokens, self.offsets.to(flat.device)[:, None, :])
        rollouts = {"sequences": tokens[:, :R].to(torch.int8).cpu().numpy()}
        logits = logps.to(torch.float16).cpu().numpy()  # [K, R, T, O]
        metrics = {
            "accuracy": correct.float().mean(1).cpu().numpy(),
            "strict_accuracy": strict.float().mean(1).cpu().numpy(),
        }
        return rollouts, logits, metrics


class MnistTask(Task):
    """Rotated sequential MNIST: each member sees every digit rotated by its own angle.

    Rotation and tiling are one gather per batch (`sequential_mnist.make_inputs`), so
    nothing per member is precomputed beyond a 784-entry index. Epochs reshuffle the
    training split with the member's generator; a last partial batch is dropped so all
    members step together (the reference's loader keeps it: one batch per epoch).
    """

    EVAL_CHUNK = 250

    def __init__(self, cfg: ZooConfig, plans: list[MemberPlan], generators: list[torch.Generator], device):
        self.cfg, self.gens, self.device = cfg, generators, device
        images, labels = load_digits_cached(cfg.mnist_source)
        self.images = images.reshape(len(images), -1).to(device)
        self.labels = labels.to(device)
        self.train_idx, self.eval_idx = (i.to(device) for i in mnist.split_indices(len(images)))
        angles = torch.tensor([p.task[0] for p in plans], dtype=torch.float32)
        self.rot = mnist.rotation_indices(angles).to(device)
        self.decays = np.array([p.weight_decay for p in plans], dtype=np.float32)
        self.per_epoch = len(self.train_idx) // cfg.batch_size
        if self.per_epoch < 1:
            raise ValueError(f"MNIST source has {len(self.train_idx)} training digits, fewer than a batch")
        self._epoch, self._order = -1, None

    def _inputs(self, idx: Tensor) -> Tensor:  # idx [K, B] -> [K, B, 50, 16]
        return mnist.make_inputs(self.images[idx], self.rot)

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        epoch, b = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            n = len(self.train_idx)
            self._order = torch.stack([torch.randperm(n, generator=g) for g in self.gens]).to(self.device)
            self._epoch = epoch
        B = self.cfg.batch_size
        idx = self.train_idx[self._order[:, b * B : (b + 1) * B]]
        y = self.labels[idx]
        return self._inputs(idx), y.unsqueeze(-1).expand(-1, -1, mnist.SEQ_LEN)

    def _pass(self, flat: Tensor, pool: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Loss and accuracy of each member on its own shuffled sample of `pool`."""
        n = min(self.cfg.eval_samples, len(pool))
        idx = pool[torch.stack([torch.randperm(len(pool), generator=g)[:n] for g in self.gens]).to(self.device)]
        losses, correct, first_x, first_logits = [], [], None, None
        for start in range(0, n, self.EVAL_CHUNK):
            chunk = idx[:, start : start + self.EVAL_CHUNK]
            x, y = self._inputs(chunk), self.labels[chunk]
            logits, _ = lstm.forward(self.cfg.spec, flat, x)
            target = y.unsqueeze(-1).expand(-1, -1, logits.shape[2])
            losses.append(_ce(logits, target).reshape(flat.shape[0], -1))
            correct.append(logits[:, :, -1].argmax(-1) == y)
            if first_x is None:
                first_x, first_logits = x, logits
        return torch.cat(losses, 1).mean(1), torch.cat(correct, 1).float().mean(1), idx, (first_x, first_logits)

    @torch.no_grad()
    def evaluate(self, flat: Tensor):
        R = self.cfg.rollouts
        train_loss, _, train_idx, (x, logits) = self._pass(flat, self.train_idx)
        eval_loss, accuracy, _, _ = self._pass(flat, self.eval_idx)
        if x.shape[1] < R:  # rollouts beyond the first chunk
            x = self._inputs(train_idx[:, :R])
            logits, _ = lstm.forward(self.cfg.spec, flat, x)
        rollouts = {
            "inputs": x[:, :R].to(torch.float16).cpu().numpy(),
            "labels": self.labels[train_idx[:, :R]].to(torch.int8).cpu().numpy(),
        }
        metrics = {
            "accuracy": accuracy.cpu().numpy(),
            "train_loss": train_loss.cpu().numpy(),
            "eval_loss": eval_loss.cpu().numpy(),
            "generalization_gap": (eval_loss - train_loss).cpu().numpy(),
            "weight_decay": self.decays,
        }
        return rollouts, logits[:, :R].to(torch.float16).cpu().numpy(), metrics


_DIGITS: dict[str | None, tuple[Tensor, Tensor]] = {}


def load_digits_cached(source: str | None) -> tuple[Tensor, Tensor]:
    """Digits are read once per process (an actor trains many batches of members)."""
    if source not in _DIGITS:
        _DIGITS[source] = mnist.load_digits(source)
    return _DIGITS[source]


def make_task(cfg: ZooConfig, plans, generators, device) -> Task:
    if cfg.task == "formal-languages":
        return FormalLanguageTask(cfg, plans, generators, device)
    return MnistTask(cfg, plans, generators, device)


def _ce(logits: Tensor, target: Tensor) -> Tensor:
    """Per-position cross-entropy of logits `[K, B, T, O]` against `[K, B, T]`: `[K, T, B]`.

    `lstm.forward` returns logits as a view of a `[K, O, T, B]` block; with the classes
    on dim 1 the log-softmax runs along contiguous positions, over 10x faster than
    over a last dimension of 6 classes.
    """
    return F.cross_entropy(logits.permute(0, 3, 2, 1), target.transpose(1, 2), reduction="none")


def _mean_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Each member's mean cross-entropy: `[K]`."""
    return _ce(logits, target).reshape(logits.shape[0], -1).mean(1)


def train_members(
    cfg: ZooConfig,
    plans: list[MemberPlan],
    device: str | torch.device = "cpu",
    on_step: Callable[[int], None] | None = None,
) -> Iterator[Snapshot]:
    """Train `plans` together; yield a `Snapshot` of all of them at each snapshot step."""
    spec = cfg.spec
    gens = [torch.Generator().manual_seed(p.seed) for p in plans]
    flat = lstm.init_params(spec, gens).to(device).requires_grad_()
    task = make_task(cfg, plans, gens, device)
    decay = torch.tensor([p.weight_decay for p in plans], dtype=torch.float64, device=device)
    opt = torch.optim.Adam([flat], lr=cfg.lr[0], betas=(0.9, 0.999), eps=1e-8, foreach=False)
    snapshots = set(cfg.snapshot_steps)
    index = 0
    for s in range(cfg.steps + 1):
        lr = lr_at(cfg, max(s - 1, 0))
        x, y = task.train_batch(s)
        logits, _ = lstm.forward(spec, flat, x)
        loss = _mean_ce(logits, y).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # AdamW's decoupled decay, one rate per member
            flat.mul_((1.0 - lr * decay).to(flat.dtype).unsqueeze(1))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        if on_step is not None:
            on_step(s)
        if s in snapshots:
            params = flat.detach()
            rollouts, out_logits, metrics = task.evaluate(params)
            yield Snapshot(s, index, params.cpu().numpy().copy(), rollouts, out_logits, metrics)
            index += 1

