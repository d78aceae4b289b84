"""Member training: the reference's recipe, one generator per member."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnrep import lstm
from rnnrep.config import zoo_config
from rnnrep.tasks import formal_languages as fl
from rnnrep.zoo.members import FormalLanguageTask, lr_at, plan_member, train_members


def reference_lr(step: int) -> float:
    """The reference's PiecewiseLinearSchedule([0, 10000, 20000], [0.01, 0.003, 0.0003])."""
    ts, vs = [0, 10_000, 20_000], [0.01, 0.003, 0.0003]
    for i, t in enumerate(ts):
        if step < t:
            return vs[0] if i == 0 else vs[i - 1] + (vs[i] - vs[i - 1]) * (step - ts[i - 1]) / (t - ts[i - 1])
    return vs[-1]


def test_lr_schedule_matches_reference_at_paper_scale():
    cfg = zoo_config("formal-languages", "paper")
    for s in (0, 1, 999, 5000, 9999, 10_000, 15_000, 19_999, 20_000):
        assert lr_at(cfg, s) == pytest.approx(reference_lr(s), rel=1e-12)


def test_paper_preset_snapshots():
    assert zoo_config("formal-languages", "paper").snapshot_steps == (0, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000)


def test_plans_are_deterministic_and_distinct():
    cfg = zoo_config("sequential-mnist", "tiny", members=50)
    a = [plan_member(cfg, i) for i in range(50)]
    assert a == [plan_member(cfg, i) for i in range(50)]
    assert len({p.seed for p in a}) == 50
    assert all(0 <= p.task[0] < 360 for p in a)
    assert {p.weight_decay for p in a} <= {0.0, 0.001, 0.01, 0.1}


def test_one_member_follows_the_reference_loop():
    """Same init and data: our batched trainer and nn.LSTM + torch AdamW agree step by step."""
    cfg = zoo_config("formal-languages", "tiny", steps=6, snapshot_steps=(6,), eval_samples=16, rollouts=4)
    plans = [plan_member(cfg, 3)]
    gens = [torch.Generator().manual_seed(plans[0].seed)]
    flat0 = lstm.init_params(cfg.spec, gens)
    task = FormalLanguageTask(cfg, plans, gens, "cpu")
    batches = [task.train_batch(s) for s in range(cfg.steps + 1)]

    mod, lin = lstm.to_modules(cfg.spec, flat0[0])
    params = list(mod.parameters()) + list(lin.parameters())
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=1e-4)
    for s, (x, y) in enumerate(batches):
        out, _ = mod(x[0])
        loss = F.cross_entropy(lin(out).reshape(-1, 6), y[0].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = reference_lr(s * 20_000 // cfg.steps)
    ref = lstm.from_modules(mod, lin)
    snap = next(iter(train_members(cfg, plans)))
    np.testing.assert_allclose(snap.params[0], ref.numpy(), atol=2e-5)


def test_member_does_not_depend_on_its_batch_mates():
    cfg = zoo_config("formal-languages", "tiny", steps=5, snapshot_steps=(5,), eval_samples=16, rollouts=4)
    alone = next(iter(train_members(cfg, [plan_member(cfg, 2)])))
    group = next(iter(train_members(cfg, [plan_member(cfg, i) for i in (0, 1, 2)])))
    np.testing.assert_allclose(alone.params[0], group.params[2], atol=1e-6)
    np.testing.assert_array_equal(alone.rollouts["sequences"][0], group.rollouts["sequences"][2])


def test_rollouts_are_samples_with_their_logits():
    cfg = zoo_config("formal-languages", "tiny", steps=3, snapshot_steps=(3,), eval_samples=32, rollouts=8)
    snap = next(iter(train_members(cfg, [plan_member(cfg, i) for i in range(2)])))
    seq, logp = snap.rollouts["sequences"], snap.logits.astype(np.float32)
    assert seq.shape == (2, 8, 42) and logp.shape == (2, 8, 41, 6)
    assert (seq[:, :, 0] == fl.BOS).all()
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=5e-3)  # log-softmax, as the reference stores
    x = F.one_hot(torch.from_numpy(seq[..., :-1]).long(), 6).float()
    out, _ = lstm.forward(cfg.spec, torch.from_numpy(snap.params), x)
    np.testing.assert_allclose(torch.log_softmax(out, -1).numpy(), logp, atol=2e-2)


def test_mnist_members_learn_and_report_metrics():
    cfg = zoo_config("sequential-mnist", "tiny", steps=30, snapshot_steps=(0, 30), eval_samples=200, rollouts=5)
    snaps = list(train_members(cfg, [plan_member(cfg, i) for i in range(2)]))
    first, last = snaps[0].metrics, snaps[-1].metrics
    assert set(last) == {"accuracy", "train_loss", "eval_loss", "generalization_gap", "weight_decay"}
    np.testing.assert_allclose(last["generalization_gap"], last["eval_loss"] - last["train_loss"], atol=1e-6)
    assert (last["train_loss"] < first["train_loss"]).all()
    assert snaps[-1].rollouts["inputs"].shape == (2, 5, 50, 16)
    assert snaps[-1].logits.shape == (2, 5, 50, 10)
