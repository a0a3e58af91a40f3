"""MLTPTrainer (Hugging Face Trainer) and the accelerate loop of docs/integrations.md, on tiny models
built from configs, checked against the hand-written loop (MLTPOptimizer + task_closures)."""

from __future__ import annotations

import copy
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_mltp import MLTPOptimizer, task_closures

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from torch_mltp.integrations.accelerate import unwrap_optimizer  # noqa: E402
from torch_mltp.integrations.transformers import MLTPTrainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MLTP = dict(mode="fo", eta=0.5, alpha_init=0.05)


def bert(dropout=0.0):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return transformers.BertForSequenceClassification(config)


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


class Bag(nn.Module):
    """A model whose forward takes no loss keyword arguments: the Trainer counts no items for it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.EmbeddingBag(100, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids, labels):
        return {"loss": F.cross_entropy(self.head(self.embedding(input_ids)), labels)}


def classification_data(n=32, length=8):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (n, length), generator=gen)
    return [{"input_ids": row, "labels": (row[0] < 50).long()} for row in ids]


def language_data(n=32, length=12):
    """Counting sequences (each token is the previous one plus one), right-padded to ``length`` from
    random lengths, so that micro-batches hold different numbers of predicted tokens."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for start, size in zip(torch.randint(0, 100, (n,), generator=gen), torch.randint(4, length + 1, (n,))):
        ids = (start + torch.arange(length)) % 100
        mask = (torch.arange(length) < size).long()
        rows.append(
            {"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return rows


def arguments(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_grad_norm=0.0,
        max_steps=1,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


class RecordingTrainer(MLTPTrainer):
    """Keeps the micro-batches it was given, for the hand-written loop to replay."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = [*getattr(self, "seen", []), {k: v.clone() for k, v in inputs.items()}]
        return super().training_step(model, inputs, num_items_in_batch)


def train(model, data, tmp_path, mltp=MLTP, **overrides):
    trainer = RecordingTrainer(
        model=model, args=arguments(tmp_path, **overrides), train_dataset=data, mltp=dict(mltp)
    )
    trainer.train()
    return trainer


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def items(batch):
    """The predicted tokens of a causal LM's micro-batch (labels shifted by one), else the examples."""
    labels = batch["labels"]
    return int((labels[:, 1:] != -100).sum()) if labels.dim() == 2 else len(labels)


def hand_written(model, steps, *, lr=1e-2, weight_decay=0.0, max_grad_norm=0.0, autocast=False):
    """The loop of the README: the Trainer's AdamW groups (no decay on biases and norms), one
    ``backward`` per micro-batch weighted by its share of the step's items, clipping, one step."""
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "norm" in n.lower()]
    decay = [p for p in model.parameters() if all(p is not q for q in no_decay)]
    base = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        fused=True,
    )
    opt = MLTPOptimizer(base, model, **MLTP)

    def loss_fn(*values, keys):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(**dict(zip(keys, values)))["loss"]

    objectives = []
    for micro_batches in steps:
        opt.zero_grad()
        total = sum(items(batch) for batch in micro_batches)
        objective = 0.0
        for batch in micro_batches:
            closures = task_closures(lambda *v, keys=list(batch): loss_fn(*v, keys=keys), *batch.values())
            weight = items(batch) / total
            objective += weight * opt.backward(*closures, weight=weight).item()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        objectives.append(objective)
    return opt, objectives


def assert_same_training(trainer, model, opt, rtol=1e-5, atol=1e-7):
    for (name, param), expected in zip(trainer.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(param, expected, rtol=rtol, atol=atol, msg=name)
    alphas = unwrap_optimizer(trainer.optimizer).alphas
    for name, alpha in opt.alphas.items():
        torch.testing.assert_close(alphas[name], alpha, rtol=rtol, atol=atol, msg=name)


def test_the_core_imports_no_engine_and_a_missing_engine_names_its_extra():
    code = (
        "import sys, torch_mltp, torch_mltp.integrations\n"
        "assert not {'transformers', 'accelerate'} & set(sys.modules), 'the core imported an engine'\n"
        "sys.modules['transformers'] = None  # not installed\n"
        "import torch_mltp.integrations.transformers\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert "ImportError: torch_mltp.integrations.transformers needs transformers" in result.stderr
    assert "pip install 'torch-mltp[transformers]'" in result.stderr


# -- training --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_model, data", [(bert, classification_data), (llama, language_data)])
def test_tiny_models_train_and_their_alphas_move(make_model, data, tmp_path):
    trainer = train(
        make_model(),
        data(),
        tmp_path,
        mltp=dict(mode="fo", alpha_init=0.01),
        max_steps=10,
        per_device_train_batch_size=16,
    )
    logged = losses(trainer)
    assert len(logged) == 10 and logged[-1] < 0.8 * logged[0]
    alphas = unwrap_optimizer(trainer.optimizer).alphas
    last = trainer.state.log_history[-2]  # the last training log (the one after it is the summary)
    assert {key for key in last if key.startswith("alpha/")} == {f"alpha/{name}" for name in alphas}
    assert all(last[f"alpha/{name}"] == pytest.approx(alpha.item()) for name, alpha in alphas.items())
    assert all(alpha.item() != 0.01 for alpha in alphas.values())


def test_one_step_equals_the_hand_written_loop(tmp_path):
    model = bert()
    reference = copy.deepcopy(model)
    trainer = train(model, classification_data(), tmp_path, weight_decay=0.1)
    opt, objectives = hand_written(reference, [trainer.seen], weight_decay=0.1)
    assert_same_training(trainer, reference, opt)
    assert losses(trainer) == [pytest.approx(objectives[0], rel=1e-6)]  # the logged loss is J
    assert len(trainer.optimizer.param_groups) == 3  # decay, no decay, alphas


@pytest.mark.parametrize("make_model, data", [(llama, language_data), (Bag, classification_data)])
def test_accumulation_and_clipping_equal_the_hand_written_loop(make_model, data, tmp_path):
    """Two steps of two micro-batches each: a causal LM, whose micro-batches hold different numbers
    of tokens (weights n_m / N), and a model that takes no loss keywords (weights 1/2); clipped."""
    model = make_model()
    reference = copy.deepcopy(model)
    trainer = train(
        model,
        data(),
        tmp_path,
        gradient_accumulation_steps=2,
        max_grad_norm=0.05,
        max_steps=2,
        lr_scheduler_type="constant",
    )
    assert trainer.model_accepts_loss_kwargs is (make_model is llama)  # whether it counts items
    steps = [trainer.seen[:2], trainer.seen[2:]]
    if make_model is llama:
        assert items(steps[0][0]) != items(steps[0][1])
    opt, objectives = hand_written(reference, steps, max_grad_norm=0.05)
    assert_same_training(trainer, reference, opt)
    assert losses(trainer) == pytest.approx(objectives, rel=1e-6)
    assert all(entry["grad_norm"] > 0.05 for entry in trainer.state.log_history if "loss" in entry)


class InOrder(RecordingTrainer):
    """Takes the examples in the data set's order, so that a test knows which micro-batch and task holds
    which; records the gradients that the optimizer step receives."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def optimizer_step_gradients(self):
        opt = unwrap_optimizer(self.optimizer)
        return {n: p.grad.clone() for n, p in self.model.named_parameters()}, {
            n: a.grad.clone() for n, a in opt.alphas.items()
        }


class _RecordGradients(transformers.TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.recorded = trainer, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.recorded = self.trainer.optimizer_step_gradients()


def unlabelled(rows):
    return [{**row, "labels": torch.full_like(row["labels"], -100)} for row in rows]


def test_a_micro_batch_without_counted_items_adds_nothing(tmp_path):
    """Every label -100 in the second micro-batch (n_m = 0): the step is the first micro-batch's alone, as
    in the plain Trainer."""
    rows = language_data(16)
    model = llama()
    reference = copy.deepcopy(model)
    trainer = InOrder(
        model=model,
        args=arguments(tmp_path, gradient_accumulation_steps=2, lr_scheduler_type="constant"),
        train_dataset=rows[:8] + unlabelled(rows[8:]),
        mltp=dict(MLTP),
    )
    trainer.train()
    assert len(trainer.seen) == 2 and items(trainer.seen[1]) == 0 < items(trainer.seen[0])
    opt, objectives = hand_written(reference, [trainer.seen[:1]])
    assert_same_training(trainer, reference, opt)
    assert losses(trainer) == pytest.approx(objectives, rel=1e-6)


@pytest.mark.parametrize("empty", ["i", "j"])
def test_a_task_without_counted_items_has_loss_zero(tmp_path, empty):
    """A task whose labels are all -100 has the loss 0 of a sum over no items: with task j empty
    ``J = L_i`` and ``dJ/dw = g_i``; with task i empty ``g_i = 0``, ``w' = w`` and ``J = eta * L_j(w)``;
    ``dJ/dalpha = 0`` either way."""
    rows = language_data(8)
    rows = unlabelled(rows[:4]) + rows[4:] if empty == "i" else rows[:4] + unlabelled(rows[4:])
    model = llama()
    reference = copy.deepcopy(model)
    trainer = InOrder(model=model, args=arguments(tmp_path), train_dataset=rows, mltp=dict(MLTP))
    recorder = _RecordGradients(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    batch = trainer.seen[0]
    counted = {k: v[4:] if empty == "i" else v[:4] for k, v in batch.items()}
    loss = reference(**counted)["loss"]
    factor = MLTP["eta"] if empty == "i" else 1.0
    expected = torch.autograd.grad(factor * loss, list(reference.parameters()), allow_unused=True)
    grads, alpha_grads = recorder.recorded
    for (name, grad), want in zip(grads.items(), expected):
        torch.testing.assert_close(grad, torch.zeros_like(grad) if want is None else want, msg=name)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in alpha_grads.values())
    assert losses(trainer) == pytest.approx([factor * loss.item()], rel=1e-6)


def test_bf16_autocast_equals_the_hand_written_loop_under_autocast(tmp_path):
    model = bert()
    reference, full_precision = copy.deepcopy(model), copy.deepcopy(model)
    trainer = train(model, classification_data(), tmp_path, bf16=True)
    opt, _ = hand_written(reference, [trainer.seen], autocast=True)
    assert_same_training(trainer, reference, opt)
    hand_written(full_precision, [trainer.seen])
    assert any(not torch.equal(p, q) for p, q in zip(reference.parameters(), full_precision.parameters()))


def test_the_accelerators_grad_scaler_scales_both_passes_and_skips_an_overflow(tmp_path):
    """With the GradScaler that fp16 gives the accelerator on a GPU: the first step overflows
    (J times 2**127 is not finite in float32) and is skipped, the second equals the unscaled loop."""
    model = llama()
    reference = copy.deepcopy(model)
    trainer = RecordingTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=2, lr_scheduler_type="constant"),
        train_dataset=language_data(),
        mltp=MLTP,
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == 2.0**27
    opt, _ = hand_written(reference, [trainer.seen[1:]])
    assert_same_training(trainer, reference, opt, rtol=0, atol=0)


def test_resumed_run_equals_the_uninterrupted_run(tmp_path):
    """Dropout on: the Trainer restores the random state, MLTPOptimizer the alphas and their moments."""
    settings = dict(
        max_steps=4, save_strategy="steps", save_steps=2, warmup_steps=1, weight_decay=0.1, max_grad_norm=1.0
    )
    uninterrupted = train(bert(dropout=0.1), classification_data(), tmp_path / "a", **settings)
    resumed = RecordingTrainer(
        model=bert(dropout=0.1),
        args=arguments(tmp_path / "a", **settings),
        train_dataset=classification_data(),
        mltp=MLTP,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert_same_training(
        resumed, uninterrupted.model, unwrap_optimizer(uninterrupted.optimizer), rtol=0, atol=0
    )
    assert losses(resumed)[-2:] == losses(uninterrupted)[-2:]


def test_the_schedule_moves_the_alphas_learning_rate_with_the_weights(tmp_path):
    rates = []

    class Rates(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            rates.append([group["lr"] for group in optimizer.param_groups])

    trainer = RecordingTrainer(
        model=bert(),
        args=arguments(tmp_path, max_steps=4, warmup_steps=2, weight_decay=0.1),
        train_dataset=classification_data(),
        mltp=MLTP,
        callbacks=[Rates()],
    )
    trainer.train()
    expected = [1e-2 * f for f in (1 / 2, 1, 1 / 2, 0)]  # after each step: warmup over 2 steps, then decay
    assert rates == [[pytest.approx(rate)] * 3 for rate in expected]


def test_an_mltp_optimizer_passed_in_is_used_and_settings_for_it_are_refused(tmp_path):
    model = bert()
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, mode="fo")
    args = arguments(tmp_path)
    trainer = MLTPTrainer(model=model, args=args, train_dataset=classification_data(), optimizers=(opt, None))
    assert trainer.create_optimizer() is opt
    trainer = MLTPTrainer(
        model=model, args=args, train_dataset=classification_data(), optimizers=(opt, None), mltp=MLTP
    )
    with pytest.raises(ValueError, match="already an MLTPOptimizer"):
        trainer.create_optimizer()


# -- accelerate -------------------------------------------------------------------------------------------


def documented_accelerate_loop():
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "docs/integrations.md").read_text(), re.S | re.M)
    (block,) = [block for block in blocks if "Accelerator(" in block]
    return block


def test_the_documented_accelerate_loop_equals_the_hand_written_loop(accelerator_state, tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(documented_accelerate_loop())
    run = runpy.run_path(str(script))
    torch.manual_seed(0)  # the block's model, data and alphas, rebuilt
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 4))
    x, y = torch.randn(256, 20), torch.randint(0, 4, (256,))
    opt = MLTPOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, mode="fo", eta=1.0)
    schedule = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.5, total_iters=2)
    for step in range(2):  # two steps of two micro-batches of 64
        opt.zero_grad()
        for k in (2 * step, 2 * step + 1):
            xb, yb = x[64 * k : 64 * (k + 1)], y[64 * k : 64 * (k + 1)]
            opt.backward(*task_closures(lambda a, b: F.cross_entropy(model(a), b), xb, yb), weight=0.5)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
    for name, param in model.state_dict().items():
        torch.testing.assert_close(run["model"].state_dict()[name], param, rtol=1e-6, atol=1e-7)
    for name, alpha in opt.alphas.items():
        torch.testing.assert_close(run["mltp"].alphas[name], alpha, rtol=1e-6, atol=1e-7)
    # accelerate's checkpoints hold the prepared MLTPOptimizer's state dict: the alphas too
    trained = {name: alpha.clone() for name, alpha in run["mltp"].alphas.items()}
    run["accelerator"].save_state(str(tmp_path / "state"))
    with torch.no_grad():
        for alpha in run["mltp"].alphas.values():
            alpha.zero_()
    run["accelerator"].load_state(str(tmp_path / "state"))
    assert all(torch.equal(run["mltp"].alphas[name], alpha) for name, alpha in trained.items())


def test_the_trainer_defaults_to_first_order_mltp(tmp_path):
    """Without ``mode`` in ``mltp=``, first order: most models' attention cannot be differentiated twice."""
    trainer = MLTPTrainer(
        model=bert(), args=arguments(tmp_path), train_dataset=classification_data(), mltp=dict(eta=0.5)
    )
    trainer.create_optimizer()
    opt = unwrap_optimizer(trainer.optimizer)
    assert opt.mode.describe() == "fo" and opt.eta == 0.5
    given = MLTPTrainer(model=bert(), args=arguments(tmp_path), train_dataset=classification_data(), mltp={})
    given.create_optimizer()
    assert unwrap_optimizer(given.optimizer).mode.describe() == "fo"
