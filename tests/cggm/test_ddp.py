"""CGGM under DDP (2 CPU processes, gloo): every rank scales identically."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from cggm import CGGM
from tests.cggm.test_modulator import make_model, vector_batch
from tests.distributed import run_ranks


def _train_once(rank, from_wrapper):
    model = make_model(vector_batch(3))  # same seed: same weights on every rank
    if from_wrapper:  # CGGM built from the DDP wrapper: it hooks the module DDP holds
        ddp = DDP(model)
        cggm = CGGM(ddp, task="classification", num_outputs=3, rho=1.3, lam=0.2)
    else:
        cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.2)
        ddp = DDP(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    history = []
    for step in range(3):
        batch = vector_batch(3, seed=100 * rank + step)  # different data per rank
        opt.zero_grad()
        (F.cross_entropy(ddp(batch), batch.target) + cggm.direction_loss()).backward()
        history.append(cggm.step(batch.target))
        opt.step()
    return history, model.state_dict(), cggm.classifiers.state_dict()


def _train(rank, world):
    return [_train_once(rank, from_wrapper) for from_wrapper in (False, True)]


def test_ranks_stay_identical_and_cggm_may_be_built_from_the_ddp_wrapper():
    results = [run for rank in run_ranks(_train) for run in rank]
    h0, w0, c0 = results[0]
    for h, w, c in results[1:]:
        assert h == h0  # B from all-reduced statistics
        for k in w0:
            torch.testing.assert_close(w[k], w0[k], msg=k)
        for k in c0:
            torch.testing.assert_close(c[k], c0[k], msg=k)


def _train_with_a_bad_batch_on_rank_1(rank, world):
    """Step 1 of rank 1 sees an infinite feature; every rank skips that step (the model's as
    GradScaler would, CGGM's by itself)."""
    model = make_model(vector_batch(3))
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.2)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    history, warned = [], []
    for step in range(3):
        batch = vector_batch(3, seed=100 * rank + step)
        if step == 1 and rank == 1:
            x = batch["m2"].clone()
            x[0] = float("inf")
            batch = batch.replace(inputs={**batch.inputs, "m2": x})
        opt.zero_grad()
        (F.cross_entropy(ddp(batch), batch.target) + cggm.direction_loss()).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history.append(cggm.step(batch.target))
        warned += [str(w.message) for w in caught]
        if all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
            opt.step()
    finite = all(torch.isfinite(p).all().item() for p in cggm.classifiers.parameters())
    return history, warned, finite, model.state_dict()


def test_a_bad_batch_on_one_rank_is_skipped_on_every_rank():
    (h0, warned0, finite0, w0), (h1, warned1, finite1, w1) = run_ranks(
        _train_with_a_bad_batch_on_rank_1
    )
    assert h0 == h1 and h0[1] is None and None not in (h0[0], h0[2])
    assert finite0 and finite1
    assert all(
        "for ['m2'] are NaN or infinite on this step's batch of some rank" in w[0]
        for w in (warned0, warned1)
    )
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], msg=k)


def _steps_on(model, cggm, batches, forward):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for batch in batches:
        opt.zero_grad()
        (F.cross_entropy(forward(batch), batch.target) + cggm.direction_loss()).backward()
        history.append(cggm.step(batch.target))
        opt.step()
    return history, model.state_dict(), cggm.classifiers.state_dict()


def _full_batches():
    return [vector_batch(3, b=16, seed=step) for step in range(3)]


def _train_on_this_ranks_half(rank, world):
    model = make_model(vector_batch(3))
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.2)
    ddp = DDP(model)
    halves = [full.select(list(range(8 * rank, 8 * rank + 8))) for full in _full_batches()]
    return _steps_on(model, cggm, halves, ddp)


def test_two_ranks_on_halves_of_each_batch_equal_one_process_on_the_whole():
    # the scores behind B are all-reduced sums (not one rank's), and the classifiers' gradients
    # are averaged, so the split run is the whole-batch run
    model = make_model(vector_batch(3))
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.2)
    h_one, w_one, c_one = _steps_on(model, cggm, _full_batches(), model)
    for h, w, c in run_ranks(_train_on_this_ranks_half):
        for got, expected in zip(h, h_one, strict=True):
            assert got == pytest.approx(expected, rel=1e-5)
        for k in w_one:
            torch.testing.assert_close(w[k], w_one[k], msg=k)
        for k in c_one:
            torch.testing.assert_close(c[k], c_one[k], msg=k)


def _train_with_gradient_directions(rank, world):
    model = make_model(vector_batch(3))
    cggm = CGGM(
        model, task="classification", num_outputs=3, rho=1.3, lam=0.5, direction="gradients"
    )
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    history = []
    for step in range(3):
        batch = vector_batch(3, seed=100 * rank + step)
        opt.zero_grad()
        loss = F.cross_entropy(ddp(batch), batch.target)
        (loss + cggm.direction_loss(loss)).backward()  # a double backward through the head
        history.append(cggm.step(batch.target))
        opt.step()
    return history, model.state_dict()


def test_gradient_directions_keep_the_ranks_identical():
    (h0, w0), (h1, w1) = run_ranks(_train_with_gradient_directions)
    assert h0 == h1
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], msg=k)


def _train_with_ignored_labels_on_rank_1(rank, world):
    """Rank 1's batches have unlabelled samples (ignore_index), rank 0's none."""
    model = make_model(vector_batch(3))
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.2, ignore_index=-100)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    history = []
    for step in range(3):
        batch = vector_batch(3, seed=100 * rank + step)
        if rank == 1:
            batch = batch.replace(target=batch.target.masked_fill(torch.arange(16) % 3 == 0, -100))
        opt.zero_grad()
        (F.cross_entropy(ddp(batch), batch.target) + cggm.direction_loss()).backward()
        history.append(cggm.step(batch.target))
        opt.step()
    return history, model.state_dict(), cggm.classifiers.state_dict()


def test_ranks_with_different_numbers_of_unlabelled_samples_stay_identical():
    (h0, w0, c0), (h1, w1, c1) = run_ranks(_train_with_ignored_labels_on_rank_1)
    assert h0 == h1  # B from the all-reduced counts of labelled samples
    for first, second in ((w0, w1), (c0, c1)):
        for k in first:
            torch.testing.assert_close(second[k], first[k], msg=k)
