"""`rnnrep bench`: speed as a ratio against a baseline measured in the same command.

The zoo baseline is the reference's way of building a zoo: one member at a time, a
fused `torch.nn.LSTM`, torch's AdamW, fresh strings every step, and at every snapshot
1,000 sampled strings for accuracy plus 100 more with their logits. The contender is
a whole `rnnrep zoo build` (Ray start-up, training, snapshot evaluation, writing)
of the same members, steps and snapshots.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from rnnrep.config import BuildOptions, ConfigError, zoo_config
from rnnrep.malloc import keep_freed_memory
from rnnrep.tasks import formal_languages as fl
from rnnrep.zoo.members import lr_at, plan_member


def matmul_peak_gflops(device: str = "cpu", seconds: float = 1.0) -> float:
    """This device's float32 matmul rate (CPU: all threads torch uses), from 1024^3 or 8192^3 products."""
    n = 1024 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = _synchronizer(device)
    a @ b
    sync()
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        sync()
        k += 1
    return k * 2 * n**3 / (time.perf_counter() - t0) / 1e9


def member_step_gflop(task: str) -> float:
    """Matmul work of one training step of one member (forward + backward = 3x forward)."""
    cfg = zoo_config(task, "tiny")
    s, B = cfg.spec, cfg.batch_size
    T = 41 if task == "formal-languages" else 50
    fwd = 0
    for layer in range(s.num_layers):
        fan_in = s.input_size if layer == 0 else s.hidden_size
        fwd += 2 * B * 4 * s.hidden_size * (fan_in + s.hidden_size)
    fwd += 2 * B * s.hidden_size * s.output_size
    return 3 * fwd * T / 1e9


def baseline_fl(members: int, steps: int, device: str = "cpu") -> float:
    """The reference loop for formal-language members; returns member-steps per second.

    On a GPU the strings are sampled on the CPU and copied over, and acceptance is
    checked on the CPU, as the reference does.
    """
    cfg = zoo_config("formal-languages", "small", members=members, steps=steps)
    snapshots = set(cfg.snapshot_steps)
    t0 = time.perf_counter()
    for member_id in range(members):
        plan = plan_member(cfg, member_id)
        torch.manual_seed(plan.seed)
        offsets = torch.tensor(plan.task, dtype=torch.long)
        lstm = torch.nn.LSTM(6, 32, 2, batch_first=True).to(device)
        linear = torch.nn.Linear(32, 6).to(device)
        params = [*lstm.parameters(), *linear.parameters()]
        opt = torch.optim.AdamW(params, lr=0.01, weight_decay=1e-4)
        lo = int(fl.min_n(offsets))
        for step in range(steps + 1):
            seq = fl.strings_from_n(torch.randint(lo, fl.MAX_N, (32,)), offsets).to(device)
            out, _ = lstm(F.one_hot(seq[:, :-1], 6).float())
            loss = F.cross_entropy(linear(out).reshape(-1, 6), seq[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            if step in snapshots:
                for n in (1000, 100):  # accuracy samples, then stored rollouts
                    _sample(lstm, linear, offsets, n)
    _synchronizer(device)()
    return members * (steps + 1) / (time.perf_counter() - t0)


@torch.no_grad()
def _sample(lstm, linear, offsets, n: int) -> float:
    device = linear.weight.device
    tokens = [torch.full((n, 1), fl.BOS, device=device)]
    state = None
    for _ in range(fl.SEQ_LEN - 1):
        out, state = lstm(F.one_hot(tokens[-1], 6).float(), state)
        probs = torch.softmax(linear(out[:, -1]), -1)
        tokens.append(torch.multinomial(probs, 1))
    correct, _, _ = fl.accept(torch.cat(tokens, 1).cpu(), offsets)
    return float(correct.float().mean())


def _synchronizer(device: str) -> Callable[[], None]:
    """What waits for queued GPU work, so a timer stops when the work is done; a no-op on CPU."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown --device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here; use --device cpu")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_zoo(
    task: str,
    members: int | None,
    steps: int,
    baseline_members: int,
    members_per_batch: int | None,
    out: Path | None,
    device: str = "cpu",
    gpus_per_actor: float = 0.25,
) -> str:
    """Whole-build member-steps/s vs the one-member loop, both on `device`.

    On cuda the build's actors each hold `gpus_per_actor` of the GPU, so several train
    their batches of members at once, and the baseline runs nn.LSTM on the same GPU.
    `members=None` builds the small preset's 64 on a CPU and 1,024 on a GPU, whose
    speed comes from many members at once.
    """
    if members is None:
        members = 1024 if device == "cuda" else 64
    if task != "formal-languages":
        raise ConfigError("bench zoo measures the formal-language build (the reference's baseline loop)")
    if members < 1 or steps < 1 or baseline_members < 1:
        raise ConfigError("--members, --steps and --baseline-members must be at least 1")
    _check_device(device)
    if device == "cuda" and not 0 < gpus_per_actor <= 1:
        raise ConfigError(f"--gpus-per-actor must be in (0, 1], got {gpus_per_actor}")
    from rnnrep.zoo.build import build

    keep_freed_memory()  # as the build's actors do: the baseline gets the same allocator
    peak = matmul_peak_gflops(device)
    base = baseline_fl(baseline_members, steps, device)
    opts = BuildOptions(
        members_per_actor_batch=members_per_batch,
        progress=False,
        device=device,
        gpus_per_actor=gpus_per_actor if device == "cuda" else 0.0,
    )
    cfg = zoo_config(task, "small", members=members, steps=steps)
    rss = {"before": _rss_mb(), "peak": _rss_mb()}
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(0.2):
            rss["peak"] = max(rss["peak"], _rss_mb())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with tempfile.TemporaryDirectory(prefix="rnnrep-bench-") as tmp:
        t0 = time.perf_counter()
        result = build(cfg, Path(tmp) / "zoo", opts)
        wall = time.perf_counter() - t0
    watching.set()
    watcher.join()
    whole = members * (steps + 1) / wall
    achieved = whole * member_step_gflop(task)
    res = {
        "task": task,
        "members": members,
        "steps": steps,
        "cpus": os.cpu_count(),
        "device": result.device,
        "baseline_member_steps_per_s": round(base, 1),
        "build_member_steps_per_s_wall": round(whole, 1),
        "build_member_steps_per_s_training": round(result.member_steps_per_s, 1),
        "ratio_wall": round(whole / base, 2),
        "matmul_peak_gflops": round(peak, 1),
        "build_matmul_gflops": round(achieved, 2),
        "share_of_peak": round(achieved / peak, 4),
        "driver_rss_mb_before": round(rss["before"]),
        "driver_rss_mb_peak": round(rss["peak"]),
    }
    if out is not None:
        out.write_text(json.dumps(res, indent=1) + "\n")
    return "\n".join(f"{k:36s} {v}" for k, v in res.items())


# Seconds per emulation training step (64 members, paper architecture) of the reference
# implementation on a 2-core machine of this kind (REFERENCE.md); shown beside ours.
REFERENCE_STEP_S = {
    "statistics": 0.14, "flat": 0.13, "transformer": 9.3, "dws": 0.47, "noninteractive": 0.31, "interactive": 0.31,
}


def _time_steps(*fns, min_steps: int, min_seconds: float) -> list[float]:
    """Median seconds per call of each of `fns`, called in turn (round robin).

    Medians, because on a shared 2-core machine a few steps are stretched by other
    processes; in turn, because the machine's speed drifts over seconds (the
    emulator-only step measured 0.051 and 0.054 s in two runs), and a ratio of two
    steps is only fair when both saw the same conditions.
    """
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_steps or time.perf_counter() - start < min_seconds * len(fns):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def bench_train(
    task: str, encoders: list[str], batch: int, min_steps: int, out: Path | None, device: str = "cpu",
    precision: str = "fp32",
) -> str:
    """Seconds per training step per encoder and of the emulator alone, same process, device and precision.

    The reference's figures (REFERENCE.md) are float32 steps, whatever `precision` is.
    """
    from rnnrep.config import member_spec
    from rnnrep.emulation.emulator import Emulator, EmulatorConfig
    from rnnrep.emulation.losses import emulation_loss
    from rnnrep.emulation.step import (
        EmulationBatch,
        adamw,
        autocast,
        build_model,
        check_precision,
        make_optimizers,
        train_step,
    )
    from rnnrep.encoders import ENCODERS

    unknown = sorted(set(encoders) - set(ENCODERS))
    if unknown:
        raise ConfigError(f"unknown encoder(s) {unknown}: choose from {', '.join(ENCODERS)}")
    if batch < 1 or min_steps < 1:
        raise ConfigError("--batch and --min-steps must be at least 1")
    check_precision(precision)
    _check_device(device)
    keep_freed_memory()  # as training workers do
    spec = member_spec(task)
    T = 41 if task == "formal-languages" else 50
    g = torch.Generator().manual_seed(0)
    data = EmulationBatch(
        params=torch.randn(batch, spec.num_params, generator=g) * 0.2,
        inputs=torch.randn(batch, T, spec.input_size, generator=g),
        targets=torch.randn(batch, T, spec.output_size, generator=g),
    ).to(device)
    # the emulator alone: the floor under every encoder's step
    emulator = Emulator(spec.input_size, spec.output_size, EmulatorConfig()).to(device)
    opt = adamw(emulator)  # as make_optimizers builds it
    z = torch.nn.functional.normalize(torch.randn(batch, 16, generator=g), dim=-1).to(device)
    sync = _synchronizer(device)

    def emulator_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(precision, device):
            logits = emulator(z, data.inputs)
        emulation_loss("total_variation", logits.float(), data.targets).backward()
        torch.nn.utils.clip_grad_norm_(emulator.parameters(), 0.1)
        opt.step()
        sync()

    rows, emu_times = [], []
    for name in encoders:
        model = build_model(name, spec, task, precision=precision).to(device)
        opts = make_optimizers(model)
        emu_s, s = _time_steps(emulator_step, lambda: train_step(model, opts, data), min_steps=min_steps, min_seconds=2.0)
        emu_times.append(emu_s)
        rows.append(
            {
                "encoder": name,
                "step_s": round(s, 4),
                "steps_per_s": round(1 / s, 2),
                "emulator_only_step_s": round(emu_s, 4),
                "over_emulator_only": round(s / emu_s, 2),
                "reference_step_s": REFERENCE_STEP_S[name],
                "speedup_vs_reference": round(REFERENCE_STEP_S[name] / s, 2),
            }
        )
    emu_s = statistics.median(emu_times)
    res = {"task": task, "batch": batch, "device": device, "precision": precision, "threads": torch.get_num_threads(),
           "emulator_only_step_s": round(emu_s, 4), "encoders": rows}
    if out is not None:
        out.write_text(json.dumps(res, indent=1) + "\n")
    where = f"{res['threads']} threads" if device == "cpu" else device
    lines = [f"{task}, batch {batch}, {where}, {precision}; emulator-only step {emu_s:.3f} s "
             "(timed in turn with each encoder; /emulator is against that encoder's turns)",
             f"{'encoder':16s}{'step s':>9s}{'steps/s':>9s}{'/emulator':>10s}{'ref s':>8s}{'speed-up':>9s}"]
    for r in rows:
        lines.append(f"{r['encoder']:16s}{r['step_s']:>9.3f}{r['steps_per_s']:>9.2f}{r['over_emulator_only']:>10.2f}"
                     f"{r['reference_step_s']:>8.2f}{r['speedup_vs_reference']:>9.2f}")
    return "\n".join(lines)


_DRIVER = """
import json, resource, sys
from rnnrep.config import BuildOptions, zoo_config
from rnnrep.zoo.build import build
cfg = zoo_config("{task}", "tiny", members={members}, steps={steps})
build(cfg, sys.argv[1], BuildOptions(members_per_actor_batch={per_batch}, progress=False))
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def bench_zoo_memory(task: str, members: int, factor: int, steps: int, members_per_batch: int) -> str:
    """Driver peak RSS of a build of `members` and of `factor` times as many, each in its own process."""
    import subprocess
    import sys

    if members < 1 or factor < 2 or steps < 1:
        raise ConfigError("--members and --steps must be at least 1, --factor at least 2")
    peaks = []
    for n in (members, members * factor):
        with tempfile.TemporaryDirectory(prefix="rnnrep-mem-") as tmp:
            code = _DRIVER.format(task=task, members=n, steps=steps, per_batch=members_per_batch)
            r = subprocess.run([sys.executable, "-c", code, str(Path(tmp) / "zoo")], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"build of {n} members failed:\n{r.stderr[-2000:]}")
            peaks.append(json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"])
    return (
        f"driver peak RSS: {members} members {peaks[0]:.0f} MB, {members * factor} members {peaks[1]:.0f} MB, "
        f"ratio {peaks[1] / peaks[0]:.2f}"
    )


LSTM_IMPLS = ("nn.LSTM per member", "batched autograd", "fused, torch ops", "fused, C cell kernel", "torch.compile")


def bench_lstm(task: str, members: int, threads: int, min_steps: int, compile_: bool, device: str) -> str:
    """Member-steps/s of one member training step (forward, backward, Adam) per LSTM implementation.

    The zoo build's choice per device: nn.LSTM one member at a time (the reference),
    K members in plain batched autograd ops, the fused layer with its elementwise work
    in torch ops (what GPUs run) or in the C cell kernel (what CPUs run), and
    torch.compile of the batched autograd step (`--compile`: minutes to compile).
    """
    from rnnrep import cell, lstm
    from rnnrep.zoo.members import _mean_ce

    if members < 1 or threads < 1 or min_steps < 1:
        raise ConfigError("--members, --threads and --min-steps must be at least 1")
    _check_device(device)
    torch.set_num_threads(threads)
    keep_freed_memory()  # as the build's actors do
    cfg = zoo_config(task, "tiny")
    spec, B = cfg.spec, cfg.batch_size
    T = 41 if task == "formal-languages" else 50
    g = torch.Generator().manual_seed(0)
    x = torch.randn(members, B, T, spec.input_size, generator=g).to(device)
    y = torch.randint(0, spec.output_size, (members, B, T), generator=g).to(device)
    sync = _synchronizer(device)

    def batched(impl: str):
        flat = lstm.init_params(spec, [torch.Generator().manual_seed(i) for i in range(members)]).to(device)
        flat.requires_grad_()
        opt = torch.optim.Adam([flat], lr=1e-3, foreach=False)

        def step() -> None:
            logits, _ = lstm.forward(spec, flat, x, impl=impl)
            opt.zero_grad(set_to_none=True)
            _mean_ce(logits, y).sum().backward()
            opt.step()

        return step

    def per_member():
        mods = [lstm.to_modules(spec, lstm.init_params(spec, [torch.Generator().manual_seed(i)])[0]) for i in range(members)]
        mods = [(m.to(device), lin.to(device)) for m, lin in mods]
        opts = [torch.optim.AdamW([*m.parameters(), *lin.parameters()], lr=1e-3) for m, lin in mods]

        def step() -> None:
            for k, ((m, lin), opt) in enumerate(zip(mods, opts)):
                out, _ = m(x[k])
                loss = F.cross_entropy(lin(out).reshape(-1, spec.output_size), y[k].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return step

    def timed(step) -> float:
        def run() -> None:
            step()
            sync()

        return members / _time_steps(run, min_steps=min_steps, min_seconds=1.0)[0]

    rows = {LSTM_IMPLS[0]: timed(per_member()), LSTM_IMPLS[1]: timed(batched("autograd"))}
    with cell.torch_ops():
        rows[LSTM_IMPLS[2]] = timed(batched("fused"))
    if device == "cpu" and cell.library() is not None:
        rows[LSTM_IMPLS[3]] = timed(batched("fused"))
    if compile_:
        step = batched("autograd")
        compiled = torch.compile(step)
        t0 = time.perf_counter()
        compiled()
        compile_s = time.perf_counter() - t0
        rows[f"{LSTM_IMPLS[4]} (compiled in {compile_s:.0f} s)"] = timed(compiled)
    base = rows[LSTM_IMPLS[0]]
    lines = [f"{task}, {members} members, batch {B}, {threads} thread(s), {device}: member-steps/s of a training step",
             f"{'implementation':36s}{'member-steps/s':>15s}{'vs nn.LSTM':>12s}"]
    best = max(rows, key=rows.get)
    for name, v in rows.items():
        lines.append(f"{name:36s}{v:>15.1f}{v / base:>11.2f}x" + ("  <- fastest" if name == best else ""))
    return "\n".join(lines)


def bench_train_memory(task: str, members: int, factor: int, encoder: str, steps: int) -> str:
    """Peak RSS of the training worker on a zoo and on one `factor` times larger.

    Both zoos are built here (tiny members, a few steps: what matters is the rows),
    then trained for the same steps; the worker's peak comes from its metrics.
    """
    from rnnrep.emulation.train import run_training, train_config
    from rnnrep.zoo.build import build

    if members < 1 or factor < 2 or steps < 2:
        raise ConfigError("--members must be at least 1, --factor at least 2, --steps at least 2")
    peaks, rows = [], []
    with tempfile.TemporaryDirectory(prefix="rnnrep-trainmem-") as tmp:
        for n in (members, members * factor):
            cfg = zoo_config(task, "tiny", members=n, steps=10)
            zoo = Path(tmp) / f"zoo{n}"
            build(cfg, zoo, BuildOptions(progress=False))
            tcfg = train_config("tiny", zoo=str(zoo), encoder=encoder, steps=steps, val_every=steps // 2)
            last = run_training(tcfg, Path(tmp) / f"run{n}")
            peaks.append(last["peak_rss_mb"])
            rows.append(len(cfg.snapshot_steps) * n)
    return (
        f"training worker peak RSS ({encoder}, {steps} steps): zoo of {members} members ({rows[0]} rows) "
        f"{peaks[0]:.0f} MB, {members * factor} members ({rows[1]} rows) {peaks[1]:.0f} MB, ratio {peaks[1] / peaks[0]:.2f}"
    )
