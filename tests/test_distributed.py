"""Distributed meta-training: a DistributedDataParallel model passed to ``ncp.meta_step``.

Two processes (gloo, CPU) each meta-train on their own half of a batch of tasks. After
``loss.backward()`` both must hold the meta-gradient of the whole batch, which the parent
process computes without any process group. The example script is run with torchrun.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

import ncp
from examples.distributed import train_ddp
from tests import _models
from tests._docpages import diff_sides, named_blocks

if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

WORLD = 2
TASKS = 4  # TASKS // WORLD per rank
POINTS = 16
EXACT = dict(rtol=0.0, atol=1e-10)
CFG = ncp.MetaConfig(
    inner_steps=2,
    pruner=ncp.ContextPruner(ratio=0.5),
    bootstrap=ncp.BootstrapMetaLoss(steps=2),
)
CHUNKED = dataclasses.replace(CFG, chunk_size=5)  # checkpointed query loss, recomputed in backward
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "distributed" / "train_ddp.py"


def _problem():
    """A float64 MLP and a batch of TASKS regression tasks, the same in every process."""
    torch.manual_seed(0)
    model = _models.mlp().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TASKS, POINTS, 2, generator=g, dtype=torch.float64)
    y = torch.rand(TASKS, POINTS, 1, generator=g, dtype=torch.float64)
    return model, x, y


def _rates(model):
    """Learned inner rates (one scalar per step, shared by every parameter), made unequal."""
    lr = ncp.LearnedLR(model, steps=CFG.inner_steps, init=0.1).double()
    with torch.no_grad():
        lr.rates[0].copy_(torch.tensor([0.05, 0.2], dtype=torch.float64))
    return lr


def _grads(params) -> Dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in params}


def _outer_steps(meta_model, model, x, y) -> Dict[str, Dict[str, torch.Tensor]]:
    """The outer loop both sides run: two meta-steps with an SGD step between them (the second
    with chunked full-context passes), then one with learned inner rates. ``meta_model`` is what
    ``meta_step`` receives (``model`` or its DDP wrapper); the gradients are read from
    ``model``, the wrapped module."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    ncp.meta_step(meta_model, (x, y), CFG).loss.backward()
    out["step1"] = _grads(model.named_parameters())
    optimizer.step()
    optimizer.zero_grad()
    ncp.meta_step(meta_model, (x, y), CHUNKED).loss.backward()
    out["step2"] = _grads(model.named_parameters())
    optimizer.zero_grad()
    rates = _rates(model)
    ncp.meta_step(meta_model, (x, y), CFG, learned_lr=rates).loss.backward()
    out["step3"] = _grads(model.named_parameters())
    out["rates"] = _grads(rates.named_parameters())
    out["final"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


BALANCED = ncp.MetaConfig(
    inner_steps=2, pruner=ncp.ContextPruner(ratio=0.5, balance_classes=3), bootstrap=None
)


def _classification():
    """A float64 classifier and TASKS tasks of 3 classes x 4 points with shuffled labels."""
    torch.manual_seed(0)
    model = _models.mlp(d_out=3).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(TASKS, 12, 2, generator=g, dtype=torch.float64)
    y = torch.stack([torch.randperm(12, generator=g) % 3 for _ in range(TASKS)])
    return model, x, y


def _balanced_grads(meta_model, model, x, y) -> Dict[str, torch.Tensor]:
    ncp.meta_step(meta_model, (x, y), BALANCED, loss_fn=ncp.losses.cross_entropy).loss.backward()
    return _grads(model.named_parameters())


def _adapt(model, x, y):
    return dict(ncp.adapt(model, x, y, CFG, steps=2, mode="rescaled").params)


def _page_model() -> torch.nn.Module:
    """The page's ``make_model()``: a float64 field network, seeded."""
    torch.manual_seed(0)
    return _models.mlp(d_out=3).double()


def _page_batch():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(TASKS, POINTS, 2, generator=g, dtype=torch.float64)
    return x, torch.rand(TASKS, POINTS, 3, generator=g, dtype=torch.float64)


def _run_page_loop(rank: int, port: int) -> Dict[str, torch.Tensor]:
    """Run the distributed loop of docs/distributed.md as written, on this rank's half."""
    _, code = diff_sides(named_blocks("distributed.md")["distributed-diff"])
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(env, WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    x, y = _page_batch()
    half = slice(rank * TASKS // WORLD, (rank + 1) * TASKS // WORLD)
    page = {"make_model": _page_model, "loader": [(x[half], y[half])]}
    exec(code, page)
    params = {n: p.detach().clone() for n, p in page["model"].module.named_parameters()}
    page.clear()
    gc.collect()  # free the page's DDP model, and with it its process group
    return params


def _worker(rank: int, store: str, out_dir: str, port: int) -> None:
    """One rank: its half of the tasks, a DDP-wrapped model, results saved for the parent."""
    warnings.simplefilter("error")  # as in the test suite: any warning fails the run
    warnings.filterwarnings("ignore", category=ncp.SmallContextWarning)  # as pyproject.toml
    torch.set_num_threads(1)
    page_params = _run_page_loop(rank, port)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        result = _rank_checks(rank)
    finally:
        # DDP sits in reference cycles and keeps the process group alive: collect it so that
        # destroy_process_group really stops gloo's threads (else they may abort at exit).
        gc.collect()
        dist.destroy_process_group()
    result["page"] = page_params
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _rank_checks(rank: int) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    model, x, y = _problem()
    half = slice(rank * TASKS // WORLD, (rank + 1) * TASKS // WORLD)
    x, y = x[half], y[half]
    ddp = DistributedDataParallel(model)
    reducer_calls = []

    def counting_allreduce(state, bucket):  # DDP's own averaging, counted
        reducer_calls.append(bucket.index())
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    result: dict = {}

    try:
        ncp.meta_step(model, (x, y), CFG)
    except ValueError as e:
        result["plain_error"] = str(e)

    maml = ncp.MetaConfig(inner_steps=1, pruner=None, bootstrap=None)
    loss = ncp.meta_step(ddp, (x, y), maml).loss
    try:
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    except RuntimeError as e:
        result["create_graph_error"] = str(e)

    # Test-time adaptation needs no collective: rank 0 adapts alone while rank 1 waits.
    if rank == 0:
        result["adapt_ddp"] = _adapt(ddp, x, y)
        result["adapt_plain"] = _adapt(model, x, y)
    dist.barrier()

    result.update(_outer_steps(ddp, model, x, y))
    result["reducer_calls"] = len(reducer_calls)

    clf, cx, cy = _classification()
    result["balanced"] = _balanced_grads(DistributedDataParallel(clf), clf, cx[half], cy[half])

    # Learned rates wrapped in DDP too (a user's first guess) give the same averaged gradients.
    for key, wrapped in (("rates_plain", False), ("rates_ddp", True)):
        model.zero_grad()
        rates = _rates(model)
        given = DistributedDataParallel(rates) if wrapped else rates
        ncp.meta_step(ddp, (x, y), CFG, learned_lr=given).loss.backward()
        result[key] = _grads(rates.named_parameters())
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the two ranks once (a few seconds) and load what each saved."""
    out = tmp_path_factory.mktemp("ranks")
    ctx = torch.multiprocessing.start_processes(
        _worker,
        args=(str(out / "store"), str(out), _free_port()),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish within 180 s (a collective hung?)")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    """The same outer loop on all TASKS tasks in one process, without torch.distributed."""
    model, x, y = _problem()
    return _outer_steps(model, model, x, y)


def _assert_grads_equal(got, want, **tol):
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_every_rank_holds_the_meta_gradient_of_all_tasks(ranks, reference):
    for result in ranks:
        for step in ("step1", "step2", "step3"):
            _assert_grads_equal(result[step], reference[step], **EXACT)
        _assert_grads_equal(result["final"], reference["final"], **EXACT)


def test_class_balanced_pruning_under_ddp_gives_the_meta_gradient_of_all_tasks(ranks):
    model, x, y = _classification()
    want = _balanced_grads(model, model, x, y)
    for result in ranks:
        _assert_grads_equal(result["balanced"], want, **EXACT)


def test_without_averaging_the_gradients_would_differ(reference):
    """Control: one rank's half alone gives a different meta-gradient, so the test above
    would catch gradients left local to each rank."""
    model, x, y = _problem()
    ncp.meta_step(model, (x[: TASKS // WORLD], y[: TASKS // WORLD]), CFG).loss.backward()
    local = _grads(model.named_parameters())
    assert all((local[n] - reference["step1"][n]).abs().max() > 1e-4 for n in local)


def test_ranks_hold_identical_gradients(ranks):
    first, second = ranks
    for key in ("step1", "step2", "step3", "rates", "final"):
        _assert_grads_equal(first[key], second[key], rtol=0.0, atol=0.0)


def test_learned_rate_gradients_are_averaged(ranks, reference):
    assert reference["rates"]["rates.0"].abs().min() > 0
    for result in ranks:
        _assert_grads_equal(result["rates"], reference["rates"], **EXACT)


def test_ddp_wrapped_learned_rates_are_accepted(ranks):
    for result in ranks:
        _assert_grads_equal(result["rates_ddp"], result["rates_plain"], **EXACT)
    assert ranks[0]["rates_ddp"]["rates.0"].abs().min() > 0


def test_ddp_reducer_never_runs(ranks):
    """The model's gradients are averaged once, by ncp: DDP's own all-reduce (which only a
    DDP forward arms) never fires, and three outer steps in a row raise nothing."""
    assert [r["reducer_calls"] for r in ranks] == [0, 0]


def test_plain_module_in_distributed_run_raises(ranks):
    for result in ranks:
        message = result["plain_error"]
        assert "DistributedDataParallel" in message
        assert "plain Sequential in a distributed run with 2 processes" in message


def test_differentiating_the_averaged_meta_gradient_raises(ranks):
    """The all-reduce has no derivative: create_graph=True must not treat it as the identity."""
    for result in ranks:
        assert "cannot be differentiated" in result["create_graph_error"]
        assert "create_graph=True" in result["create_graph_error"]


def test_adapt_unwraps_without_collectives(ranks):
    first = ranks[0]
    model, x, y = _problem()
    want = _adapt(model, x[: TASKS // WORLD], y[: TASKS // WORLD])
    _assert_grads_equal(first["adapt_ddp"], want, **EXACT)
    _assert_grads_equal(first["adapt_plain"], want, **EXACT)
    assert "adapt_ddp" not in ranks[1]


# --- docs/distributed.md ---------------------------------------------------------------------


def test_page_diff_applies_to_the_single_process_loop():
    blocks = named_blocks("distributed.md")
    old, new = diff_sides(blocks["distributed-diff"])
    assert old == blocks["distributed-before"]
    lines = blocks["distributed-diff"].splitlines()
    added = [ln for ln in lines if ln.startswith("+")]
    removed = [ln for ln in lines if ln.startswith("-")]
    assert (len(added), len(removed)) == (8, 1), "the page says: adds seven lines, changes one"
    assert "    out = ncp.meta_step(model, (x, y), cfg)" in old.splitlines()
    assert "    out = ncp.meta_step(model, (x, y), cfg)" in new.splitlines()


def test_page_loop_runs_and_matches_one_process_on_all_tasks(ranks):
    """The page's distributed loop, run by both ranks on their halves, takes the same Adam step
    as its single-process loop on the whole batch."""
    x, y = _page_batch()
    before = {"make_model": _page_model, "loader": [(x, y)]}
    exec(named_blocks("distributed.md")["distributed-before"], before)
    want = {n: p.detach() for n, p in before["model"].named_parameters()}
    start = dict(_page_model().named_parameters())
    assert all(not torch.equal(want[n], start[n]) for n in want)  # the step moved every tensor
    for result in ranks:
        _assert_grads_equal(result["page"], want, rtol=1e-9, atol=1e-12)


# --- examples/distributed/train_ddp.py ---------------------------------------------------


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # gloo on CPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={WORLD}", str(SCRIPT), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_example_trains_with_torchrun():
    run = _torchrun("--outer-steps", "2", "--resolution", "12", "--hidden", "16")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "2 processes (gloo, cpu), 2 images per process and step"
    assert [ln.split()[1] for ln in lines[1:3]] == ["1/2", "2/2"]
    assert all("meta-loss" in ln and "query PSNR" in ln for ln in lines[1:3])
    assert lines[-1] == "parameters identical on all ranks: True"


def test_example_refuses_the_unwrapped_module():
    run = _torchrun("--outer-steps", "2", "--resolution", "12", "--hidden", "16", "--unwrapped")
    assert run.returncode != 0
    assert "ValueError: `model` is a plain Siren in a distributed run" in run.stderr
    assert "Pass the DistributedDataParallel-wrapped model" in run.stderr
    assert "step 1/2" not in run.stdout


def test_example_splits_the_global_batch_between_ranks():
    shares = [set(train_ddp.rank_indices(3, r, world=2, batch=4)) for r in range(2)]
    assert shares[0].isdisjoint(shares[1])
    assert shares[0] | shares[1] == set(range(24, 32))  # step 3 of 8 images per step


def test_example_images_are_deterministic_per_index():
    a = train_ddp.blob_images([5, 6], resolution=10)
    assert a.shape == (2, 10, 10, 3) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert_close(train_ddp.blob_images([6], resolution=10)[0], a[1], rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])
    x, y = train_ddp.image_context(a)
    assert x.shape == (2, 100, 2) and y.shape == (2, 100, 3)
    assert_close(y[1, 10 * 3 + 4], a[1, 3, 4])
    assert_close(x[0, 10 * 9 + 9], torch.tensor([1.0, 1.0]))


def test_example_resumes_from_its_checkpoint_exactly(tmp_path):
    small = ("--resolution", "12", "--hidden", "16", "--ckpt-every", "1")
    straight = _torchrun("--outer-steps", "3", *small, "--out", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stdout + straight.stderr
    first = _torchrun("--outer-steps", "2", *small, "--out", str(tmp_path / "b"))
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = _torchrun("--outer-steps", "3", *small, "--out", str(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    log = [line for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if line]
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in log] == [1, 2, 3]
    other = _torchrun("--outer-steps", "4", *small, "--ratio", "0.5", "--out", str(tmp_path / "b"))
    assert other.returncode != 0 and "ratio: 0.25 -> 0.5" in other.stderr
