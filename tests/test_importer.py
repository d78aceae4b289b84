"""import-reference on small npy zoos written in the reference's layout."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from rnnrep import lstm
from rnnrep.cli import app
from rnnrep.config import member_spec
from rnnrep.tasks import formal_languages as fl
from rnnrep.zoo.store import open_zoo

runner = CliRunner()
STEPS = [0, 100, 200]


def write_reference_fl(folder, members=12, rollouts=5, seed=0):
    """A zoo as the reference script stores it: real member rollouts and log-softmax logits."""
    rng = np.random.default_rng(seed)
    spec = member_spec("formal-languages")
    params, seqs, logits, tasks, nsc = [], [], [], [], []
    for run in range(members):
        task = [0, *rng.integers(-3, 3, size=3).tolist()]
        for step in STEPS:
            flat = lstm.init_params(spec, [torch.Generator().manual_seed(run * 10 + step)])
            tokens = torch.full((1, rollouts, 1), fl.BOS)
            state, lp = None, []
            for _ in range(41):
                out, state = lstm.step(spec, flat, F.one_hot(tokens[..., -1], 6).float(), state)
                p = torch.log_softmax(out, -1)
                lp.append(p)
                tokens = torch.cat([tokens, torch.multinomial(p.exp()[0], 1).unsqueeze(0)], -1)
            s = tokens[0].numpy().astype(np.int16)
            s[0, 0] = fl.EOS  # the reference's quirk: a sequence without EOS got EOS written at 0
            params.append(flat[0].numpy())
            seqs.append(s)
            logits.append(torch.stack(lp, 2)[0].numpy().astype(np.float16))
            tasks.append(task)
            nsc.append([run, step, int(rng.integers(0, 1001))])
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in [("parameters", np.array(params, np.float32)), ("sequences", np.array(seqs)),
                      ("logits", np.array(logits)), ("tasks", np.array(tasks)), ("num_step_correct", np.array(nsc))]:
        np.save(folder / f"{name}.npy", arr)
    return np.array(tasks), np.array(nsc)


def reference_split(tasks: np.ndarray) -> dict:
    """The reference's dataset split, written out independently."""
    unique = np.unique(tasks, axis=0)
    t = 1 + unique - unique.min(axis=-1, keepdims=True)
    d = t.astype(np.float32) / t.sum(axis=-1, keepdims=True)
    srt = unique[np.argsort(-(d * np.log(d + 1e-6)).sum(axis=-1))]
    n = len(unique)
    n_train, n_val = int(n * (1 - 0.15 - 0.15)), int(n * 0.15)
    perm = np.random.RandomState(1).permutation(n_train + n_val)
    out = {tuple(x[1:]): "ood" for x in srt[n_train + n_val :]}
    out.update({tuple(x[1:]): "train" for x in srt[perm[:n_train]]})
    out.update({tuple(x[1:]): "val" for x in srt[perm[n_train:]]})
    return out


def test_import_fl_keeps_split_metrics_and_logits(tmp_path):
    src = tmp_path / "ref"
    tasks, nsc = write_reference_fl(src)
    out = tmp_path / "zoo"
    r = runner.invoke(app, ["zoo", "import-reference", str(src), "--out", str(out), "--rows-per-file", "10"])
    assert r.exit_code == 0, r.output
    zoo = open_zoo(out, kind="formal-languages")
    meta = zoo.metadata()
    assert len(meta) == 36 and meta["member_id"].n_unique() == 12
    assert zoo.meta["snapshot_steps"] == STEPS and len(zoo.files) == 4
    expected = reference_split(tasks)
    for task, split in meta.select("task", "split").iter_rows():
        assert expected[tuple(int(v) for v in task)] == split
    acc = {(int(a), int(b)): c / 1000 for a, b, c in nsc}
    for m, step, a in meta.select("member_id", "step", "accuracy").iter_rows():
        assert a == pytest.approx(acc[(m, step)])
    assert meta["strict_accuracy"].is_nan().all()
    arrays = zoo.arrays(next(zoo.iter_tables(columns=["params", "sequences", "logits"])))
    assert (arrays["sequences"][:, :, 0] == fl.BOS).all()  # the quirk is undone
    x = F.one_hot(torch.from_numpy(arrays["sequences"][:, :, :-1].copy()).long(), 6).float()
    out_logits, _ = lstm.forward(zoo.spec, torch.from_numpy(arrays["params"].copy()), x)
    np.testing.assert_allclose(torch.log_softmax(out_logits, -1).numpy(), arrays["logits"].astype(np.float32), atol=1e-2)


def test_import_mnist(tmp_path):
    src = tmp_path / "ref"
    src.mkdir()
    n, spec = 9, member_spec("sequential-mnist")
    rng = np.random.default_rng(1)
    angles = np.repeat(rng.uniform(0, 360, size=(3, 1)), 3, axis=0)
    np.save(src / "parameters.npy", rng.normal(size=(n, spec.num_params)).astype(np.float32))
    np.save(src / "sequences.npy", rng.normal(size=(n, 3, 50, 16)).astype(np.float16))
    np.save(src / "logits.npy", rng.normal(size=(n, 3, 50, 10)).astype(np.float16))
    np.save(src / "tasks.npy", angles)
    np.save(src / "num_step.npy", np.array([[i // 3, [0, 100, 200][i % 3]] for i in range(n)]))
    np.save(src / "accuracy_losses.npy", np.array([[0.5, 1.0, 1.5, 0.01]] * n))
    out = tmp_path / "zoo"
    r = runner.invoke(app, ["zoo", "import-reference", str(src), "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta = open_zoo(out, kind="sequential-mnist").metadata()
    assert meta["generalization_gap"].to_list() == pytest.approx([0.5] * n)
    assert set(meta["split"]) <= {"train", "val", "ood"}


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "no folder at"),
        ("empty", "neither num_step_correct.npy"),
        ("wrong_p", "wrong zoo kind or architecture"),
        ("short", "has 3 rows, parameters.npy has 36"),
        ("garbage", "not a readable npy file"),
    ],
)
def test_bad_reference_input(tmp_path, setup, message):
    src = tmp_path / "ref"
    if setup != "missing":
        src.mkdir()
    if setup in ("wrong_p", "short", "garbage"):
        write_reference_fl(src, members=12, rollouts=2)
    if setup == "wrong_p":
        np.save(src / "parameters.npy", np.zeros((36, 100), np.float32))
    if setup == "short":
        np.save(src / "tasks.npy", np.zeros((3, 4), np.int64))
    if setup == "garbage":
        (src / "logits.npy").write_bytes(b"not numpy")
    out = tmp_path / "zoo"
    r = runner.invoke(app, ["zoo", "import-reference", str(src), "--out", str(out)])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not out.exists() and not list(tmp_path.glob(".zoo*"))


def test_existing_output_needs_overwrite(tmp_path):
    src = tmp_path / "ref"
    write_reference_fl(src, members=6, rollouts=2)
    out = tmp_path / "zoo"
    assert runner.invoke(app, ["zoo", "import-reference", str(src), "--out", str(out)]).exit_code == 0
    r = runner.invoke(app, ["zoo", "import-reference", str(src), "--out", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = runner.invoke(app, ["zoo", "import-reference", str(src), "--out", str(out), "--overwrite"])
    assert r.exit_code == 0 and json.loads((out / "zoo.json").read_text())["complete"]
