"""The trainer's optimisation equals peft + torch.optim.AdamW on the same data, and its plan
is deterministic, so a resumed job runs the steps an uninterrupted one would."""

import dataclasses

import pytest
import torch

from tandem.server.engine.iteration import IGNORE_INDEX, TrainingSequence
from tandem.server.finetune.dataset import TrainingExample
from tandem.server.finetune.trainable_adapter import LoRASpec, TrainableAdapter
from tandem.server.errors import InvalidRequest
from tandem.server.finetune.trainer import MAX_EPOCHS, MAX_STEPS, Hyperparameters, StepPlan, Trainer, TrainingDiverged, micro_batches, plan_steps
from tests.adapters.make_adapters import ALL_LINEAR
from tests.engine.helpers import make_engine, random_prompts
from tests.finetune.test_gradients import peft_loss, peft_twin, randomize


def examples(vocab: int, lengths: list[int], seed: int = 3) -> list[TrainingExample]:
    out = []
    for ids in random_prompts(lengths, vocab, seed=seed):
        prompt = len(ids) // 3
        out.append(TrainingExample(tuple(ids), tuple([IGNORE_INDEX] * prompt + ids[prompt:])))
    return out


def run_to_end(trainer: Trainer, engine) -> list:
    return [r for r in trainer.run(engine) if r is not None]


def test_steps_equal_peft_with_adamw(tiny_hf_model, smollm2_tokenizer):
    """Two optimizer steps with clipping, weight decay, warm-up and micro-batching (gradient
    accumulation) give the weights of peft trained with AdamW on the same batches."""
    engine = make_engine(tiny_hf_model, smollm2_tokenizer)
    spec = LoRASpec(r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    adapter = TrainableAdapter(engine.runner.model, spec, seed=0)
    randomize(adapter, seed=1)
    twin = peft_twin(tiny_hf_model, adapter)
    data = examples(len(smollm2_tokenizer), [9, 30, 14, 21, 6, 17])
    hp = Hyperparameters(
        learning_rate=5e-3, warmup_steps=1, tokens_per_step=50, weight_decay=0.1, max_grad_norm=0.5, seed=7, max_steps=2
    )
    trainer = Trainer(adapter, hp, data, [], micro_batch_tokens=24)
    reports = run_to_end(trainer, engine)
    assert [r.step for r in reports] == [1, 2] and trainer.done

    params = [p for p in twin.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, trainer._lr_factor)
    for step, indices in enumerate(trainer.plan):
        seqs = [TrainingSequence(data[i].input_ids, data[i].labels) for i in indices]
        loss = peft_loss(twin, seqs)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
        assert reports[step].train_loss == pytest.approx(loss.item(), rel=1e-5)
        assert reports[step].grad_norm == pytest.approx(norm.item(), rel=1e-4)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    assert [r.learning_rate for r in reports] == [0.0, 5e-3]
    twin_params = dict(twin.named_parameters())
    for key, value in adapter.peft_tensors().items():
        torch.testing.assert_close(value, twin_params[key.replace(".weight", ".default.weight")], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("name, theirs", [("linear", "linear"), ("cosine", "cosine"), ("constant", "constant_with_warmup")])
def test_the_learning_rate_follows_transformers_schedules(name, theirs, warmup):
    """Every step's learning rate is the one transformers' scheduler of that name gives (our
    "constant" warms up, as its constant_with_warmup)."""
    from transformers import get_scheduler

    data = [TrainingExample((1,) * 4, (1,) * 4) for _ in range(10)]
    hp = Hyperparameters(learning_rate=2e-3, lr_scheduler=name, warmup_steps=warmup, max_steps=10, tokens_per_step=4)
    trainer = Trainer(torch.nn.Linear(2, 2), hp, data, [], micro_batch_tokens=4)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=2e-3)
    schedule = get_scheduler(theirs, optimizer, num_warmup_steps=warmup, num_training_steps=10)
    expected = []
    for _ in range(10):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    ours = [2e-3 * trainer._lr_factor(step) for step in range(10)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert len(set(ours)) == (warmup + 1 if name == "constant" else 10)  # the comparison covers warm-up and decay


def test_the_plan_covers_every_epoch_and_is_deterministic():
    data = [TrainingExample((1,) * n, (1,) * n) for n in (5, 9, 3, 7, 4)]
    hp = Hyperparameters(n_epochs=3, tokens_per_step=10, seed=11)
    plan = plan_steps(data, hp)
    assert plan == plan_steps(data, hp)
    assert sorted(i for step in plan for i in step) == sorted(list(range(5)) * 3)
    assert all(sum(data[i].num_tokens for i in step) <= 10 or len(step) == 1 for step in plan)
    assert plan != plan_steps(data, Hyperparameters(n_epochs=3, tokens_per_step=10, seed=12))
    assert len(plan_steps(data, Hyperparameters(max_steps=17, tokens_per_step=10))) == 17
    # Built an epoch at a time: the longest plan allowed costs nothing until it is read.
    long = StepPlan(data, Hyperparameters(max_steps=MAX_STEPS, tokens_per_step=10))
    assert len(long) == MAX_STEPS and long[40] == plan_steps(data, Hyperparameters(max_steps=41, tokens_per_step=10))[40]
    assert [len(g) for g in micro_batches([data[i] for i in (0, 2, 1, 3)], 10)] == [2, 1, 1]


def test_epochs_that_come_to_more_steps_than_a_job_may_take_are_refused_before_they_are_packed(monkeypatch):
    """Nothing bounded n_epochs x steps per epoch: 50 epochs of a large file of short lines
    packed for minutes at every create and restart, and past 10^8 steps the checkpoints'
    numbers no longer sorted (a resume from an old one)."""
    data = [TrainingExample((1, 1), (1, 1))] * (MAX_STEPS // 40 + 1)  # a step each at tokens_per_step 2
    packed = []
    pack = StepPlan._pack
    monkeypatch.setattr(StepPlan, "_pack", lambda self, epoch: packed.append(epoch) or pack(self, epoch))
    with pytest.raises(InvalidRequest, match=rf"^40 epochs of about {MAX_STEPS // 40 + 1} steps each is more than the {MAX_STEPS} steps"):
        StepPlan(data, Hyperparameters(n_epochs=40, tokens_per_step=2))
    assert packed == [0]
    assert len(StepPlan(data, Hyperparameters(n_epochs=39, tokens_per_step=2))) == 39 * (MAX_STEPS // 40 + 1)


def test_the_engine_thread_packs_no_epoch_of_a_plan_read_in_order_or_located(monkeypatch):
    """The engine thread reads the plan step by step: packing an epoch there (a shuffle of 200k
    examples took 0.3 s, and a resume packed every epoch before its step) held up every
    request. In order, the next epoch is packed ahead on another thread; a resumed job's step
    located off the engine thread costs its own epoch only."""
    import threading

    data = [TrainingExample((1,) * n, (1,) * n) for n in (5, 9, 3, 7, 4, 6, 2, 8)]
    hp, long_hp = Hyperparameters(n_epochs=4, tokens_per_step=10, seed=5), Hyperparameters(max_steps=MAX_STEPS, tokens_per_step=10, seed=5)
    expected, expected_long = plan_steps(data, hp), plan_steps(data, dataclasses.replace(long_hp, max_steps=2000))
    packed_here, pack, main = [], StepPlan._pack, threading.current_thread()

    def recorded(self, epoch):
        if threading.current_thread() is main:
            packed_here.append(epoch)
        return pack(self, epoch)

    monkeypatch.setattr(StepPlan, "_pack", recorded)
    plan, long = StepPlan(data, hp), StepPlan(data, long_hp)
    packed_here.clear()  # made off the engine thread: counting n_epochs packs each there
    assert [plan[i] for i in range(len(plan))] == expected
    assert [long[i] for i in range(1000)] == expected_long[:1000]  # epochs counted as they are read
    assert packed_here == []
    resumed = StepPlan(data, long_hp)
    resumed.locate(1700)  # as a resumed job's revalidation does, off the engine thread
    packed_here.clear()
    assert resumed[1700] == expected_long[1700]
    assert len(packed_here) == 1


def test_n_epochs_is_bounded_only_where_it_counts():
    """With max_steps set a job runs that many steps whatever n_epochs says (Hugging Face's
    rule): a config carrying a large epoch count beside max_steps is accepted. Without it,
    the epochs are planned, and bounded."""
    assert Hyperparameters(n_epochs=10 * MAX_EPOCHS, max_steps=10).max_steps == 10
    allowed = rf"in \[1, {MAX_EPOCHS}\] \(any count >= 1 with max_steps set\)"
    with pytest.raises(InvalidRequest, match=rf"^hyperparameters.n_epochs must be {allowed}, got {10 * MAX_EPOCHS}$"):
        Hyperparameters(n_epochs=10 * MAX_EPOCHS)
    with pytest.raises(InvalidRequest, match=rf"^hyperparameters.n_epochs must be {allowed}, got 0$"):
        Hyperparameters(n_epochs=0, max_steps=10)


def test_a_resumed_trainer_ends_with_the_same_weights(tiny_hf_model, smollm2_tokenizer):
    engine = make_engine(tiny_hf_model, smollm2_tokenizer)
    spec = LoRASpec(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), lora_dropout=0.1)
    data = examples(len(smollm2_tokenizer), [8, 12, 10, 9, 11, 7, 13, 6])
    hp = Hyperparameters(learning_rate=1e-2, tokens_per_step=30, n_epochs=2, seed=3)

    whole = Trainer(TrainableAdapter(engine.runner.model, spec, seed=5), hp, data, [], 64)
    run_to_end(whole, engine)

    first = Trainer(TrainableAdapter(engine.runner.model, spec, seed=5), hp, data, [], 64)
    for report in first.run(engine):
        if report is not None and report.step == 3:
            break
    saved_weights = {k: v.clone() for k, v in first.adapter.peft_tensors().items()}
    saved_state = first.state_dict()
    resumed = Trainer(TrainableAdapter(engine.runner.model, spec, seed=99), hp, data, [], 64)
    resumed.adapter.load_peft_tensors(saved_weights)
    resumed.load_state_dict(saved_state)
    reports = run_to_end(resumed, engine)
    assert reports[0].step == 4 and resumed.step == whole.step == whole.total_steps
    for key, value in whole.adapter.peft_tensors().items():
        assert torch.equal(value, resumed.adapter.peft_tensors()[key]), key


def test_a_diverging_job_fails_with_a_clear_error(tiny_hf_model, smollm2_tokenizer):
    engine = make_engine(tiny_hf_model, smollm2_tokenizer)
    adapter = TrainableAdapter(engine.runner.model, LoRASpec(r=4, target_modules=("q_proj",)), seed=0)
    with torch.no_grad():
        next(iter(adapter.a.values()))[0, 0] = float("nan")
    trainer = Trainer(adapter, Hyperparameters(max_steps=2), examples(len(smollm2_tokenizer), [8, 9]), [], 64)
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 1: loss nan, gradient norm nan$"):
        run_to_end(trainer, engine)
    assert trainer.step == 0


def test_eval_loss_is_reported_at_checkpoint_intervals(tiny_hf_model, smollm2_tokenizer):
    engine = make_engine(tiny_hf_model, smollm2_tokenizer)
    adapter = TrainableAdapter(engine.runner.model, LoRASpec(r=4, lora_dropout=0.5), seed=0)
    data = examples(len(smollm2_tokenizer), [8, 9, 10, 11, 12])
    held_out = examples(len(smollm2_tokenizer), [7, 15], seed=4)
    trainer = Trainer(adapter, Hyperparameters(max_steps=5, tokens_per_step=10, checkpoint_interval=2), data, held_out, 64)
    reports = run_to_end(trainer, engine)
    assert [r.eval_loss is not None for r in reports] == [False, True, False, True, True]
    # No dropout in evaluation: the final weights give the final eval loss again, exactly.
    assert evaluate(trainer, engine) == evaluate(trainer, engine) == reports[-1].eval_loss


def evaluate(trainer: Trainer, engine) -> float:
    steps = trainer._evaluate(engine)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def test_a_trainer_checkpointed_in_an_eval_runs_that_eval_first_when_resumed(tiny_hf_model, smollm2_tokenizer):
    """A state taken while a step's eval runs (a shutdown's checkpoint) resumed after that
    step, and its eval point was never reported: the resumed trainer reports it first."""
    engine = make_engine(tiny_hf_model, smollm2_tokenizer)
    spec = LoRASpec(r=4, target_modules=("q_proj", "v_proj"))
    data = examples(len(smollm2_tokenizer), [8, 9, 10, 11, 12])
    held_out = examples(len(smollm2_tokenizer), [7, 15, 9], seed=4)
    hp = Hyperparameters(max_steps=5, tokens_per_step=10, checkpoint_interval=2, learning_rate=1e-2)
    whole = run_to_end(Trainer(TrainableAdapter(engine.runner.model, spec, seed=5), hp, data, held_out, 8), engine)

    first = Trainer(TrainableAdapter(engine.runner.model, spec, seed=5), hp, data, held_out, 8)
    for report in first.run(engine):
        if report is None and first.step == 2:  # step 2 done, its report not yet out: in its eval
            break
    saved_weights = {k: v.clone() for k, v in first.adapter.peft_tensors().items()}
    resumed = Trainer(TrainableAdapter(engine.runner.model, spec, seed=99), hp, data, held_out, 8)
    resumed.adapter.load_peft_tensors(saved_weights)
    resumed.load_state_dict(first.state_dict())
    assert not resumed.done
    reports = run_to_end(resumed, engine)
    assert [(r.step, r.eval_loss, r.resumed) for r in reports] == [(r.step, r.eval_loss, r.step == 2) for r in whole[1:]]
    assert reports[0].train_loss == whole[1].train_loss and resumed.done
