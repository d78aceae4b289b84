"""The C cell kernel against the LSTM cell written in torch ops, and its build."""

import logging

import pytest
import torch

from rnnrep import cell

K, H, B = 3, 5, 7


requires_compiler = pytest.mark.skipif(cell.find_compiler() is None, reason="no C compiler: the kernel cannot be built here")


def _kernels(dtype):
    k = cell.kernels(torch.zeros((), dtype=dtype))
    assert k is not None, "a C compiler is here but the cell kernel did not build (see the logged warning)"
    return k


def _cell_torch(acts, c_prev):
    """The cell and its backward factors, gate rows (o, i, f, g), as `_cell.c` defines them."""
    o, i, f, g = acts.double().unflatten(1, (4, H)).unbind(1)
    o, i, f, g = o.sigmoid(), i.sigmoid(), f.sigmoid(), g.tanh()
    c = f * c_prev.double() + i * g
    tc = c.tanh()
    q = torch.cat([tc * o * (1 - o), g * i * (1 - i), c_prev.double() * f * (1 - f), i * (1 - g * g)], 1)
    return c, o * tc, f, q, o * (1 - tc * tc)


@requires_compiler
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-14)])
def test_forward_matches_torch(dtype, tol):
    fwd, _ = _kernels(dtype)
    gen = torch.Generator().manual_seed(0)
    # pre-activations well past the saturation points and the exp clamp of float32
    acts = (torch.randn(K, 4 * H, B, generator=gen, dtype=torch.float64) * 30).to(dtype)
    acts[0, 0, :4] = torch.tensor([-200.0, 200.0, 0.0, -1e-6])
    c_prev = torch.randn(K, H, B, generator=gen, dtype=dtype) * 3
    out = [torch.empty(K, H, B, dtype=dtype) for _ in range(3)] + [torch.empty(K, 4 * H, B, dtype=dtype)]
    h_buf = torch.full((K, H + 2, B), float("nan"), dtype=dtype)  # h written into a strided block
    c_new, f, dc_dh, q = out
    fwd(K, H * B, acts.data_ptr(), c_prev.data_ptr(), c_new.data_ptr(), h_buf[:, 1:].data_ptr(), (H + 2) * B,
        f.data_ptr(), q.data_ptr(), dc_dh.data_ptr())
    want = _cell_torch(acts, c_prev)
    for got, ref in zip((c_new, h_buf[:, 1 : H + 1], f, q, dc_dh), want):
        torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)
    assert h_buf[:, 0].isnan().all() and h_buf[:, H + 1].isnan().all(), "wrote outside h's rows"
    # the no-grad variant: same c and h bit for bit, in place (c_prev is c_new)
    c_inplace, h2 = c_prev.clone(), torch.empty(K, H, B, dtype=dtype)
    fwd(K, H * B, acts.data_ptr(), c_inplace.data_ptr(), c_inplace.data_ptr(), h2.data_ptr(), H * B, None, None, None)
    assert torch.equal(c_inplace, c_new) and torch.equal(h2, h_buf[:, 1 : H + 1])


@requires_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("last_step", [True, False])
def test_backward_matches_torch(dtype, last_step):
    _, bwd = _kernels(dtype)
    gen = torch.Generator().manual_seed(1)
    dh, dc, f_next, dc_dh = (torch.randn(K, H, B, generator=gen, dtype=dtype) for _ in range(4))
    q = torch.randn(K, 4 * H, B, generator=gen, dtype=dtype)
    want_dc = (dc if last_step else dc * f_next) + dh * dc_dh
    want = torch.cat([dh * q[:, :H], want_dc.repeat(1, 3, 1) * q[:, H:]], 1)
    d_acts = torch.empty(K, 4 * H, B, dtype=dtype)
    bwd(K, H * B, dh.data_ptr(), dc.data_ptr(), None if last_step else f_next.data_ptr(), dc_dh.data_ptr(),
        q.data_ptr(), d_acts.data_ptr())
    torch.testing.assert_close(dc, want_dc, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(d_acts, want, atol=1e-6, rtol=1e-6)


@requires_compiler
def test_a_call_split_over_threads_is_the_calls_one_member_at_a_time():
    """Large calls run their members on torch's threads: the same values, bit for bit."""
    fwd, bwd = _kernels(torch.float32)
    gen = torch.Generator().manual_seed(2)
    k, h, b = 8, 64, 64  # 32,768 values per gate: above the kernel's threshold for threads
    acts = torch.randn(k, 4 * h, b, generator=gen) * 3
    c_prev, dh, dc = (torch.randn(k, h, b, generator=gen) for _ in range(3))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for members in ([slice(0, k)], [slice(i, i + 1) for i in range(k)]):
            c, hh, f, dc_dh = (torch.empty(k, h, b) for _ in range(4))
            q, d_acts, dc_out = torch.empty(k, 4 * h, b), torch.empty(k, 4 * h, b), dc.clone()
            for m in members:
                n = m.stop - m.start
                fwd(n, h * b, acts[m].data_ptr(), c_prev[m].data_ptr(), c[m].data_ptr(), hh[m].data_ptr(), h * b,
                    f[m].data_ptr(), q[m].data_ptr(), dc_dh[m].data_ptr())
                bwd(n, h * b, dh[m].data_ptr(), dc_out[m].data_ptr(), f[m].data_ptr(), dc_dh[m].data_ptr(),
                    q[m].data_ptr(), d_acts[m].data_ptr())
            results.append((c, hh, f, dc_dh, q, d_acts, dc_out))
    finally:
        torch.set_num_threads(threads)
    for whole, one_by_one in zip(*results):
        assert torch.equal(whole, one_by_one)


@requires_compiler
def test_applies_to_cpu_float_only():
    assert cell.kernels(torch.zeros(1, dtype=torch.float16)) is None
    assert cell.kernels(torch.zeros(1, dtype=torch.int64)) is None
    assert cell.kernels(torch.zeros(1)) is not None


@requires_compiler
def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNREP_CACHE", str(tmp_path))
    cell.library.cache_clear()
    try:
        assert cell.library() is not None
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so", built  # no temp files left
        mtime = built[0].stat().st_mtime_ns
        cell.library.cache_clear()
        assert cell.library() is not None
        assert built[0].stat().st_mtime_ns == mtime, "rebuilt although cached"
    finally:
        cell.library.cache_clear()


@requires_compiler
def test_builds_single_threaded_where_the_compiler_lacks_openmp(tmp_path, monkeypatch):
    """The DWS kernel's threads are OpenMP; a compiler without it still builds every kernel."""
    fake = tmp_path / "cc"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = {cell.OPENMP} ] && exit 1; done\nexec {cell.find_compiler()} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("RNNREP_CACHE", str(tmp_path / "cache"))
    cell.library.cache_clear()
    try:
        assert cell.kernels(torch.zeros(1)) is not None
        forward, _ = cell.dws_kernels(torch.zeros(1))
        x, wt = torch.tensor([[[[2.0]]]]), torch.tensor([[-1.0, 1.0]])  # one entry, 1 -> 2 channels
        col, row = torch.tensor([[[0.5, 0.5]]]), torch.tensor([[[0.0, 1.0]]])
        y, s_rows, s_cols = torch.empty(1, 1, 1, 2), torch.empty(1, 1, 2), torch.empty(1, 1, 2)
        assert forward(2, 1, 1, 1, 1, 2, x.data_ptr(), wt.data_ptr(), col.data_ptr(), row.data_ptr(), y.data_ptr(),
                       s_rows.data_ptr(), s_cols.data_ptr()) == 0
        assert y.flatten().tolist() == [0.0, 3.5] and s_rows.flatten().tolist() == s_cols.flatten().tolist() == [0.0, 3.5]
    finally:
        cell.library.cache_clear()


@pytest.mark.parametrize("env", [{"CC": "/nonexistent/cc"}, {"RNNREP_CELL_KERNEL": "0"}])
def test_falls_back_to_torch_ops(tmp_path, monkeypatch, caplog, env):
    monkeypatch.setenv("RNNREP_CACHE", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cell.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="rnnrep.cell"):
            assert cell.kernels(torch.zeros(1)) is None
        if "CC" in env:
            assert "compiling the C kernels failed" in caplog.text
        assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())
    finally:
        cell.library.cache_clear()


@requires_compiler
def test_torch_ops_block_turns_the_kernel_off_and_back_on():
    x = torch.zeros(1)
    assert cell.kernels(x) is not None
    with cell.torch_ops():
        assert cell.kernels(x) is None
        with cell.torch_ops():
            assert cell.kernels(x) is None
        assert cell.kernels(x) is None
    assert cell.kernels(x) is not None
