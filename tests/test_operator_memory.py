"""Admission-time memory check: a job that cannot fit on nodes x gpusPerNode is refused (by the
webhook, and by the reconciler before anything is created), saying what would fit."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest

from kubetune.operator.resources import TrainingJobStatus
from kubetune.operator.training.decide import INSUFFICIENT_GPU_MEMORY, Observed, reconcile
from kubetune.operator.validation import (
    GPU_MEMORY_ENV,
    AdmissionRefused,
    admit,
    memory_refusal,
    validate_resource,
)
from tests.test_operator_crds import EXAMPLE_FTJ

T0 = datetime.datetime(2025, 5, 1, 12, 0, tzinfo=datetime.UTC)


@pytest.fixture(autouse=True)
def _no_operator_default(monkeypatch):
    monkeypatch.delenv(GPU_MEMORY_ENV, raising=False)


def full_7b(**spec: Any) -> dict[str, Any]:
    """Full fine-tuning of Llama-2-7B in bf16 (AMP): ~115 GiB per GPU without ZeRO."""
    cr = copy.deepcopy(EXAMPLE_FTJ)
    cr["metadata"].update(uid="uid-1", generation=1)
    cr["spec"].update(nodes=1, gpusPerNode=8, gpuMemoryGiB=80)
    cr["spec"]["training"] = {
        "model": {"path": "s3://models/Llama-2-7b-hf"},
        "data": {"datasets": [{"path": "s3://data/chat.jsonl"}], "maxLength": 2048},
        "method": "full",
        "train": {"batchSize": 1, "precision": "bf16", "gradientCheckpointing": True},
        "output": {"path": "s3://outputs/full-7b"},
    }
    for key, value in spec.items():
        if key == "training":
            cr["spec"]["training"] = {**cr["spec"]["training"], **value}
        else:
            cr["spec"][key] = value
    return cr


def refusal_of(cr: dict[str, Any]) -> str:
    with pytest.raises(AdmissionRefused) as info:
        admit("CREATE", None, cr)
    return str(info.value)


def test_a_job_that_cannot_fit_is_refused_saying_what_would():
    message = refusal_of(full_7b())
    assert message.startswith("FineTuneJob ml/llama-sft: spec.training does not fit in GPU memory (spec.gpuMemoryGiB)")
    assert "1 node(s) x 8 GPU(s) of 80 GiB" in message and "no ZeRO" in message
    for component in ("weights", "gradients", "optimizer", "activations"):
        assert component in message
    assert "It would fit with: distributed.deepspeed.stage: 3" in message
    assert "method: lora" in message and "method: qlora" in message


@pytest.mark.parametrize(
    "fix",
    [
        {"training": {"distributed": {"deepspeed": {"stage": 3}}}},
        {"training": {"method": "lora"}},
        {"training": {"method": "qlora"}},
    ],
    ids=["zero3", "lora", "qlora"],
)
def test_what_the_refusal_suggests_is_admitted(fix):
    assert admit("CREATE", None, full_7b(**fix)) == []


def test_one_gpu_per_node_needs_more_nodes_with_zero3():
    message = refusal_of(full_7b(gpusPerNode=1))
    assert "nodes: 2 with distributed.deepspeed.stage: 3" in message, message
    assert admit("CREATE", None, full_7b(gpusPerNode=1, nodes=2, training={"distributed": {"deepspeed": {"stage": 3}}})) == []
    # DDP replicates the whole model: more nodes alone do not help
    refusal_of(full_7b(gpusPerNode=1, nodes=8))


def test_the_example_manifest_needs_gradient_checkpointing_at_4k_tokens():
    cr = copy.deepcopy(EXAMPLE_FTJ)  # Llama-3-8B, LoRA, 4096 tokens x batch 4, no checkpointing
    cr["spec"]["gpuMemoryGiB"] = 80
    message = refusal_of(cr)
    assert "train.gradientCheckpointing: true" in message, message
    cr["spec"]["training"]["train"]["gradientCheckpointing"] = True
    assert admit("CREATE", None, cr) == []


def test_unknown_model_size_is_a_warning_until_model_parameters_is_set():
    cr = full_7b(training={"model": {"path": "s3://models/private-base"}})
    (warning, *_) = admit("CREATE", None, cr)
    assert "not checked" in warning and "spec.modelParameters" in warning
    cr["spec"]["modelParameters"] = "7B"
    assert "does not fit" in refusal_of(cr)


def test_no_gpu_memory_no_check_and_the_operator_default_applies(monkeypatch):
    cr = full_7b()
    del cr["spec"]["gpuMemoryGiB"]
    assert admit("CREATE", None, cr) == []
    with pytest.raises(AdmissionRefused, match="--gpu-memory-gib"):  # the operator's flag, passed in
        admit("CREATE", None, cr, default_gib=80)
    monkeypatch.setenv(GPU_MEMORY_ENV, "80")  # what `kubetune validate` reads
    assert f"the operator's default, --gpu-memory-gib / ${GPU_MEMORY_ENV}" in refusal_of(cr)
    cr["spec"]["gpuMemoryGiB"] = 141  # this job's GPUs are bigger than the default: it fits
    assert admit("CREATE", None, cr) == []
    cr["spec"]["gpusPerNode"] = 0  # CPU jobs are not checked
    assert memory_refusal(validate_resource(cr)) is None


def test_reconciler_fails_the_job_before_creating_anything_and_retries_after_a_fix():
    cr = full_7b()
    plan = reconcile(cr, Observed(secret_found=True), now=T0)
    TrainingJobStatus.model_validate(plan.status)
    assert plan.create == []
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == INSUFFICIENT_GPU_MEMORY
    conditions = {c["type"]: c for c in plan.status["conditions"]}
    assert conditions["SpecValid"]["status"] == "False"
    assert conditions["SpecValid"]["reason"] == INSUFFICIENT_GPU_MEMORY
    assert "distributed.deepspeed.stage: 3" in conditions["SpecValid"]["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", INSUFFICIENT_GPU_MEMORY)]
    failed = {**cr, "status": plan.status}
    # The same generation again: nothing new happens (no event storm, no crash loop).
    again = reconcile(failed, Observed(secret_found=True), now=T0)
    assert again.create == [] and again.events == []
    # The user switches to ZeRO-3 (a new generation): the job starts.
    fixed = copy.deepcopy(failed)
    fixed["spec"]["training"]["distributed"] = {"deepspeed": {"stage": 3}}
    fixed["metadata"]["generation"] = 2
    plan = reconcile(fixed, Observed(secret_found=True), now=T0)
    assert [o["kind"] for o in plan.create] == ["ConfigMap", "Service", "Job"]
    assert plan.status["phase"] == "Pending"


def test_a_started_job_is_never_stopped_by_the_check(monkeypatch):
    cr = full_7b(training={"distributed": {"deepspeed": {"stage": 3}}})
    del cr["spec"]["gpuMemoryGiB"]
    plan = reconcile(cr, Observed(secret_found=True), now=T0)
    started = {**cr, "status": plan.status}
    kinds = {o["kind"]: o for o in plan.create}
    monkeypatch.setenv(GPU_MEMORY_ENV, "16")  # the operator is reconfigured after the start
    job = {**kinds["Job"], "status": {"active": 1}}
    plan = reconcile(started, Observed(jobs=[job], config_map=kinds["ConfigMap"], service=kinds["Service"],
                                       secret_found=True), now=T0)
    assert plan.status["phase"] == "Running"
    suspended = copy.deepcopy(started)
    suspended["spec"]["suspend"] = True
    assert admit("UPDATE", started, suspended) == []
