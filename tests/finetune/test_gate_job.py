"""Gate training as a fine-tuning job on the tiny model: a job with a router spec trains the
gates over frozen experts from task-labelled lines, checkpoints and publishes router files,
and the router is then served; bad gate-training requests are refused before a job exists."""

import json
import re

import pytest
import torch
from safetensors.torch import load as safetensors_load

from tandem.server.adapters.router_format import GATES_FILE, Router, gates_of, router_config, write_router
from tandem.server.api.finetuning_convert import job_request
from tandem.server.errors import FailedPrecondition, InvalidRequest, NotFound
from tandem.server.finetune.job import JobStatus
from tandem.server.finetune import jobs as jobs_module
from tandem.server.finetune.jobs import JobRequest
from tandem.server.finetune.trainable_gates import RouterSpec
from tandem.server.model.lora_targets import group_linears
from tandem.v1 import finetuning_pb2
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter
from tests.finetune.test_jobs import HP, dirs, request, run_until_step, start, unstarted, wait_for  # noqa: F401 (dirs: a fixture)

TASKS = {"e0": "Count:", "e1": "Spell:"}
DATA = "\n".join(
    json.dumps({"prompt": f"{prompt} {i}", "completion": f" {i * (3 if task == 'e0' else 5)}", **({"task": task} if i % 4 else {})})
    for i in range(12)
    for task, prompt in TASKS.items()
)


@pytest.fixture
def experts(dirs, tiny_hf_model):
    for seed, name in enumerate(TASKS):
        make_adapter(tiny_hf_model, dirs[0] / name, r=8, target_modules=ALL_LINEAR, seed=seed, b_std=0.2)
    make_adapter(tiny_hf_model, dirs[0] / "qv", r=4, target_modules=["q_proj", "v_proj"], seed=9)
    return dirs


def gate_request(**changes) -> JobRequest:
    fields = {"adapter": "learned", "hyperparameters": HP, "training_data": DATA, "router": RouterSpec(("e0", "e1"), top_k=1)}
    return JobRequest(**{**fields, **changes})


def test_a_gate_job_trains_checkpoints_and_publishes_a_served_router(tiny_model_dir, experts, monkeypatch):
    saved_files = []
    save = jobs_module.checkpoints.save
    monkeypatch.setattr(jobs_module.checkpoints, "save", lambda path, step, files, state: saved_files.append(files) or save(path, step, files, state))
    engine = start(tiny_model_dir, experts)
    try:
        job = wait_for(engine, engine.jobs.create(gate_request()).id)
        router = engine.engine.registry.get("learned")
    finally:
        engine.shutdown()
    assert job.status is JobStatus.SUCCEEDED and job.mode == "timeslice" and job.router.experts == ("e0", "e1")
    assert (job.step, job.total_steps) == (6, 6) and job.train_loss is not None
    assert isinstance(router, Router) and router.experts == ("e0", "e1") and router.top_k == 1
    assert [a.name for a in router.adapters] == ["e0", "e1"]
    # The gates moved off their zero start, and the last checkpoint held what was published
    # (the checkpoints themselves go once the job has ended).
    assert all(g.abs().max() > 0 for g in router.gates.values())
    saved = gates_of(safetensors_load(saved_files[-1][GATES_FILE]))
    assert saved.keys() == router.gates.keys() and all(torch.equal(saved[k], router.gates[k]) for k in saved)
    assert not (experts[1] / ".tandem" / "jobs" / job.id / "checkpoints").exists()


def test_a_resumed_gate_job_goes_on_only_over_the_expert_versions_it_started_with(tiny_model_dir, tiny_hf_model, experts):
    """Its checkpoints hold only gates: resumed over an expert republished meanwhile, it
    trained the rest of its steps over other weights than its first ones, silently."""

    def resumed_after_a_stop(adapter: str, republish: bool):
        engine = unstarted(tiny_model_dir, experts)
        try:
            job = engine.jobs.create(gate_request(adapter=adapter))
            run_until_step(engine, job.id, 3)  # checkpoints at 2, 4, 6
        finally:
            engine.shutdown()
        if republish:
            make_adapter(tiny_hf_model, experts[0] / "e1", r=8, target_modules=ALL_LINEAR, seed=7, b_std=0.2)
        engine = start(tiny_model_dir, experts)
        try:
            return wait_for(engine, job.id)
        finally:
            engine.shutdown()

    kept = resumed_after_a_stop("kept", republish=False)
    assert kept.status is JobStatus.SUCCEEDED, kept.error
    changed = resumed_after_a_stop("changed", republish=True)
    assert changed.status is JobStatus.FAILED and changed.error.code == "validation_failed"
    assert "router expert 'e1' changed since the job was created: its gates were trained over the earlier version" in changed.error.message


def test_a_gate_job_whose_expert_was_republished_while_it_trained_publishes_no_router(tiny_model_dir, tiny_hf_model, experts):
    """It trained over frozen copies of its experts and published its gates over whatever
    versions were current by then: gates fitted to weights the router would never serve."""
    engine = unstarted(tiny_model_dir, experts)
    try:
        job = engine.jobs.create(gate_request())
        make_adapter(tiny_hf_model, experts[0] / "e1", r=8, target_modules=ALL_LINEAR, seed=7, b_std=0.2)
        engine.engine.registry.load("e1")
        engine.start()
        job = wait_for(engine, job.id)
        folder = engine.jobs._job_dir(job.id)
    finally:
        engine.shutdown()
    assert job.status is JobStatus.FAILED and job.error.code == "validation_failed" and job.step == 6
    assert job.error.message.startswith("could not publish router 'learned': router expert 'e1' changed since the job was created")
    assert not (experts[0] / "learned").exists() and not (folder / "checkpoints").exists()  # its gates fit no served version


def test_a_gate_job_and_a_job_that_trains_one_of_its_experts_are_never_both_active(tiny_model_dir, experts):
    """A gate job created while a job trained one of its experts trained to its end, then
    failed its publish: the expert's job, the older, ran first and replaced the expert
    version the gates were fitted to. Refused at creation, either way round."""
    engine = unstarted(tiny_model_dir, experts)
    try:
        expert_job = engine.jobs.create(request("e1"))
        with pytest.raises(FailedPrecondition, match=f"router expert 'e1' is being trained by job {expert_job.id}: .* wait for that job"):
            engine.jobs.create(gate_request())
        engine.jobs.cancel(expert_job.id)
        gate_job = engine.jobs.create(gate_request())
        with pytest.raises(FailedPrecondition, match=f"adapter 'e0' is an expert of router 'learned', whose gates job {gate_job.id} trains"):
            engine.jobs.create(request("e0"))
        assert engine.jobs.create(request("qv")).status is JobStatus.QUEUED  # no expert of it
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"router": RouterSpec(("e0", "nope"))}, NotFound, "'nope' not found"),
        # Every bad label, each by its line in the file (blank lines count).
        ({"router": RouterSpec(("e0", "e1"), top_k=1), "training_data": "\n".join(
            [json.dumps({"text": "a b c", "task": "e0"}), "", json.dumps({"text": "a b c", "task": "e7"}), json.dumps({"text": "a b", "task": "e8"})])},
         InvalidRequest, re.escape("training data has 2 invalid lines: line 3: task 'e7' is not one of the router's experts ['e0', 'e1']; line 4: task 'e8'")),
        ({"lora": {"r": 4}}, InvalidRequest, "trains only gates"),
        # The conflict first: looking the base up said NOT_FOUND, which no base would cure.
        ({"base_adapter": "ghost"}, InvalidRequest, "trains only gates"),
        ({"router": RouterSpec(("e0", "learned-before"))}, FailedPrecondition, "'learned-before' is not a LoRA adapter"),
        # Published under its own name, the router would replace that expert's files.
        ({"adapter": "e0"}, InvalidRequest, "adapter 'e0' is one of router.experts"),
    ],
    ids=["unknown-expert", "unknown-task", "lora-too", "unknown-base-too", "router-expert", "named-as-an-expert"],
)
def test_bad_gate_jobs_are_refused(tiny_model_dir, experts, changes, error, message):
    engine = start(tiny_model_dir, experts)
    try:
        linears = group_linears(engine.engine.runner.model)
        write_router(experts[0] / "learned-before", router_config(["e0", "e1"]), {k: torch.zeros(2, l.in_features) for k, l in linears.items()})
        with pytest.raises(error, match=message):
            engine.jobs.create(gate_request(**changes))
        assert engine.jobs.list_jobs() == []
    finally:
        engine.shutdown()


def test_gate_jobs_the_server_could_not_train_or_serve_are_refused_at_creation(tiny_model_dir, tiny_hf_model, experts):
    """Experts sharing no adapted linear failed only once the job started (internal_error);
    more experts than slots trained to the end, then failed to publish over the router's
    files; top_k 1 with no task label trained nothing (a top-1 choice has no gradient) and
    published the gates it began with."""
    make_adapter(tiny_hf_model, experts[0] / "down", r=4, target_modules=["down_proj"], seed=3)
    unlabelled = "\n".join(json.dumps({"prompt": f"Count: {i}", "completion": f" {3 * i}"}) for i in range(12))
    engine = start(tiny_model_dir, experts, max_loras=2)
    try:
        refused = (
            (RouterSpec(("e0", "e1", "qv")), FailedPrecondition, "mixes 3 experts, more than the server's 2 adapter slots: raise --max-loras"),
            (RouterSpec(("qv", "down")), InvalidRequest, re.escape("experts ['qv', 'down'] adapt no linear in common")),
        )
        for spec, error, message in refused:
            with pytest.raises(error, match=message):
                engine.jobs.create(gate_request(router=spec))
        with pytest.raises(InvalidRequest, match="router.top_k 1 gives the gates no gradient"):
            engine.jobs.create(gate_request(training_data=unlabelled))
        with pytest.raises(InvalidRequest, match="router.top_k 1 gives the gates no gradient"):
            engine.jobs.create(gate_request(router=RouterSpec(("e0", "e1"), top_k=1, routing_loss_weight=0.0)))
        assert engine.jobs.list_jobs() == []
        assert engine.jobs.create(gate_request(router=RouterSpec(("e0", "e1"), top_k=2), training_data=unlabelled)).router.top_k == 2
    finally:
        engine.shutdown()


def test_the_api_request_carries_the_router_spec():
    request = finetuning_pb2.CreateJobRequest(adapter="r", training_data="{}", router=finetuning_pb2.RouterTraining(experts=["a", "b"], temperature=0.5))
    assert job_request(request).router == RouterSpec(("a", "b"), top_k=2, temperature=0.5, routing_loss_weight=1.0)
    assert job_request(finetuning_pb2.CreateJobRequest(adapter="r", training_data="{}")).router is None
    with pytest.raises(InvalidRequest, match="router.top_k must lie in"):
        job_request(finetuning_pb2.CreateJobRequest(adapter="r", router=finetuning_pb2.RouterTraining(experts=["a", "b"], top_k=3)))
    # The documented minimum, as float32 carries it (9.99999975e-05), is the minimum.
    least = finetuning_pb2.RouterTraining(experts=["a", "b"], temperature=1e-4, routing_loss_weight=0.1)
    spec = job_request(finetuning_pb2.CreateJobRequest(adapter="r", training_data="{}", router=least)).router
    assert (spec.temperature, spec.routing_loss_weight) == (1e-4, 0.1)
    lora = finetuning_pb2.LoraConfig(r=4, lora_alpha=0.1, lora_dropout=0.05)
    assert job_request(finetuning_pb2.CreateJobRequest(adapter="r", training_data="{}", lora=lora)).lora == {
        "r": 4, "lora_alpha": 0.1, "lora_dropout": 0.05,
    }


@pytest.mark.parametrize("experts", [["a"], []])
def test_gates_over_fewer_than_two_experts_are_refused(experts):
    """One expert's weight is always 1: such a job ran to its end and published the gates it
    began with (with task labels), or was refused with advice to raise top_k, which one expert
    cannot."""
    request = finetuning_pb2.CreateJobRequest(adapter="r", training_data="{}", router=finetuning_pb2.RouterTraining(experts=experts))
    with pytest.raises(InvalidRequest, match=rf"^router.experts names {len(experts)} adapter\(s\): gates over fewer than 2 experts"):
        job_request(request)
    # 1 / 1e-40 is inf in float32: every routed token's mixture would be NaN.
    with pytest.raises(InvalidRequest, match=r"^router.temperature must be a finite number >= 0.0001, got 1e-40$"):
        RouterSpec(("a", "b"), temperature=1e-40)
