"""The README's recipes for HuggingFace Accelerate and Lightning, checked against the plain loop.

Both run gradient accumulation over two micro-batches; each must modulate exactly as the
hand-written loop of the README does (``sync=False`` on micro-steps, or no step at all).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cggm import CGGM
from mmcore import ModalityBatch
from tests.cggm.test_modulator import make_model, vector_batch

BATCHES = [vector_batch(3, seed=s) for s in range(6)]


def _modulator(model):
    return CGGM(model, task="classification", num_outputs=3, rho=1.5, lam=0.2)


def _plain_loop(*, step_on_micro_batches: bool):
    """Accumulate two micro-batches per optimiser step by hand (the README's loop)."""
    model = make_model(BATCHES[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cggm = _modulator(model)
    coefficients = []
    torch.manual_seed(1)
    for i, batch in enumerate(DataLoader(BATCHES, batch_size=None)):
        loss = F.cross_entropy(model(batch), batch.target) + cggm.direction_loss()
        (loss / 2).backward()
        sync = i % 2 == 1
        if sync or step_on_micro_batches:
            coefficients.append(cggm.step(batch.target, sync=sync))
        if sync:
            optimizer.step()
            optimizer.zero_grad()
    return model.state_dict(), coefficients


def _assert_same(run, reference):
    (state, coefficients), (ref_state, ref_coefficients) = run, reference
    assert coefficients == ref_coefficients
    assert [b is None for b in coefficients] != [True] * len(coefficients)
    for name, value in ref_state.items():
        torch.testing.assert_close(state[name], value, msg=name)


def test_accelerate_accumulation_modulates_as_the_plain_loop():
    accelerate = pytest.importorskip("accelerate")
    model = make_model(BATCHES[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cggm = _modulator(model)
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    coefficients = []
    torch.manual_seed(1)
    for batch in DataLoader(BATCHES, batch_size=None):
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(batch), batch.target) + cggm.direction_loss()
            accelerator.backward(loss)
            coefficients.append(cggm.step(batch.target, sync=accelerator.sync_gradients))
            optimizer.step()  # Accelerate's optimiser steps only when the gradients sync
            optimizer.zero_grad()
    _assert_same((model.state_dict(), coefficients), _plain_loop(step_on_micro_batches=True))


# Lightning's own warnings about its set-up (few workers, its use of torch's pytree)
@pytest.mark.filterwarnings(
    "ignore::UserWarning:pytorch_lightning", "ignore::FutureWarning:pytorch_lightning"
)
def test_lightning_on_before_optimizer_step_modulates_as_the_plain_loop():
    pl = pytest.importorskip("pytorch_lightning")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_model(BATCHES[0])
            self.cggm = _modulator(self.model)
            self.coefficients = []

        def training_step(self, batch, batch_idx):
            self.target = batch.target
            return F.cross_entropy(self.model(batch), batch.target) + self.cggm.direction_loss()

        def on_before_optimizer_step(self, optimizer):
            self.coefficients.append(self.cggm.step(self.target))

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.1)

    module = Module()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    torch.manual_seed(1)  # the DataLoader's iterator draws from the global generator
    trainer.fit(module, DataLoader(BATCHES, batch_size=None))
    run = (module.model.state_dict(), module.coefficients)
    _assert_same(run, _plain_loop(step_on_micro_batches=False))


class _KeywordModel(torch.nn.Module):
    """The late-fusion model called as ``transformers.Trainer`` calls one: a keyword per
    column, returning ``{"loss", "logits"}``."""

    def __init__(self):
        super().__init__()
        self.net = make_model(BATCHES[0])

    def forward(self, m0, m1, m2, labels=None):
        logits = self.net(ModalityBatch({"m0": m0, "m1": m1, "m2": m2}))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def test_transformers_trainer_recipe_modulates_as_the_plain_loop(tmp_path):
    """The README's ``Trainer`` subclass: the direction term in ``compute_loss``, ``cggm.step``
    after each ``training_step`` with ``sync=self.accelerator.sync_gradients``."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it

    class CGGMTrainer(transformers.Trainer):
        def __init__(self, *args, cggm, **kwargs):
            super().__init__(*args, **kwargs)
            self.cggm, self.coefficients = cggm, []

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            loss = loss + self.cggm.direction_loss()
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, *args, **kwargs):
            loss = super().training_step(model, inputs, *args, **kwargs)
            b = self.cggm.step(inputs["labels"], sync=self.accelerator.sync_gradients)
            self.coefficients.append(b)
            return loss

        def get_train_dataloader(self):  # the plain loop's order, for the comparison only
            rows = [{**b.inputs, "labels": b.target} for b in BATCHES]
            return DataLoader(rows, batch_size=None)

    class SeedAtStart(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            torch.manual_seed(1)  # as the plain loop: the classifiers are built at the first step

    model = _KeywordModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=len(BATCHES) // 2,
        gradient_accumulation_steps=2,
        max_grad_norm=0.0,  # no clipping: the plain loop has none
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = CGGMTrainer(
        model=model,
        args=args,
        optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)),
        callbacks=[SeedAtStart()],
        cggm=_modulator(model.net),
    )
    trainer.train()
    _assert_same(
        (model.net.state_dict(), trainer.coefficients), _plain_loop(step_on_micro_batches=True)
    )


def _checkpointed_loop(use_reentrant: bool | None, inputs_need_grad: bool = False):
    """A few CGGM steps on a model whose encoders run under activation checkpointing
    (``None``: no checkpointing); encoder dropout on, so the recompute must replay its masks."""
    from torch.utils.checkpoint import checkpoint

    model = make_model(BATCHES[0])
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    if use_reentrant is not None:

        def encode(batch):
            return {
                m: checkpoint(
                    enc,
                    batch[m].requires_grad_(inputs_need_grad),
                    use_reentrant=use_reentrant,
                )
                for m, enc in model.encoders.items()
            }

        model.encode = encode
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cggm = _modulator(model)
    coefficients = []
    torch.manual_seed(1)
    for batch in BATCHES:
        batch = ModalityBatch({m: batch[m].clone() for m in batch.modalities}, target=batch.target)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batch), batch.target) + cggm.direction_loss()
        loss.backward()
        coefficients.append(cggm.step(batch.target))
        optimizer.step()
    return model.state_dict(), coefficients


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_encoders_modulate_as_the_plain_loop(use_reentrant):
    """Activation checkpointing re-runs each encoder (and CGGM's capture hook) in the backward:
    the coefficients and weights equal those of the loop without checkpointing."""
    run = _checkpointed_loop(use_reentrant, inputs_need_grad=use_reentrant)
    _assert_same(run, _checkpointed_loop(None))


def test_reentrant_checkpointing_without_input_gradients_is_named_in_the_error():
    """Reentrant checkpointing of an encoder whose inputs need no gradient leaves the encoder
    without one (torch's own pitfall): the error points there, not at a missing backward."""
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="use_reentrant=False"):
        _checkpointed_loop(True, inputs_need_grad=False)
