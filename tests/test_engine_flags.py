"""The engine flag table (`kubetune.trainer.api.engine_flags`) is the one place an engine setting
is named: every entry reaches the InferenceService CRD, the `kubetune serve` flags, the server
container's arguments the operator renders and the argv `kubetune serve --engine vllm` execs,
each under the name the table gives it; and an `engineArgs` value arrives in vLLM's argv."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import pytest

from kubetune.operator.crdgen import crd
from kubetune.operator.resources import EngineArgs
from kubetune.operator.serving.render import ResolvedModels, render_inference
from kubetune.trainer.api import engine_flags
from kubetune.trainer.api.engine_flags import ALL, ENGINES, TRANSFORMERS, VLLM, EngineFlag
from kubetune.trainer.cli.main import build_parser

BASE_CR: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "chat", "namespace": "ml", "uid": "u-1"},
    "spec": {"model": {"uri": "s3://models/base"}, "engine": "vllm", "gpus": 1},
}

# A value for every InferenceService setting in the table (each is truthy: rendered).
SAMPLE: dict[str, Any] = {
    "dtype": "float16", "maxModelLen": 4096, "maxBatchSize": 8, "draftModel": "s3://models/draft",
    "numSpeculativeTokens": 3, "tensorParallelSize": 2, "quantization": "fp8", "gpuMemoryUtilization": 0.5,
    "maxLoras": 3, "maxLoraRank": 64, "extraArgs": ["--enable-prefix-caching"], "maxImagesPerPrompt": 2,
}


def _serve_args(engine: str, engine_args: dict[str, Any], model: str = "s3://models/base", **spec: Any) -> list[str]:
    cr = copy.deepcopy(BASE_CR)
    cr["spec"].update(engine=engine, engineArgs=engine_args, **spec)
    objs = render_inference(cr, ResolvedModels(model, {}))
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    server = deployment["spec"]["template"]["spec"]["containers"][0]
    assert server["command"] == ["kubetune"]
    return server["args"]


def _serve_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["serve"]


def _settings(engine: str) -> dict[str, Any]:
    """SAMPLE, less what the engine does not take (the CRD refuses those)."""
    names = {flag.crd for flag in ENGINES[engine] if flag.crd}
    return {k: v for k, v in SAMPLE.items() if k in names}


def test_every_setting_is_sampled_and_named_once() -> None:
    crd_names = [flag.crd for flag in ALL if flag.crd]
    assert sorted(crd_names) == sorted(SAMPLE), "add the new setting to SAMPLE"
    for attr in ("crd", "cli", "vllm"):
        names = [getattr(flag, attr) for flag in ALL if getattr(flag, attr)]
        assert len(names) == len(set(names)), attr
    assert [flag for flag in TRANSFORMERS if flag not in VLLM] == [engine_flags.DEVICE]


@pytest.mark.parametrize("flag", [f for f in ALL if f.crd and f.engine_args], ids=lambda f: f.crd)
def test_engine_args_fields_are_the_crd_schema(flag: EngineFlag) -> None:
    schema = crd("InferenceService")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    properties = schema["properties"]["spec"]["properties"]["engineArgs"]["properties"]
    assert list(properties) == [f.crd for f in engine_flags.engine_args_fields()]
    assert flag.crd in EngineArgs.model_fields
    assert properties[flag.crd].get("description") == flag.description


@pytest.mark.parametrize("flag", [f for f in ALL if f.cli], ids=lambda f: f.cli)
def test_every_cli_flag_is_a_kubetune_serve_flag(flag: EngineFlag) -> None:
    actions = {option: action for action in _serve_parser()._actions for option in action.option_strings}
    assert flag.cli in actions
    action = actions[flag.cli]
    assert action.dest == flag.dest and action.default == flag.flag_default and action.help == flag.help
    if flag.choices:
        assert tuple(action.choices) == flag.choices


@pytest.mark.parametrize("engine", ["vllm", "transformers"])
def test_every_crd_setting_is_rendered_with_its_flag(engine: str) -> None:
    args = _serve_args(engine, {k: v for k, v in _settings(engine).items() if k != "tensorParallelSize"},
                       **({"tensorParallelSize": 2, "gpus": 2} if engine == "vllm" else {"gpus": 0}))
    assert _serve_parser().parse_args(args[1:]).engine == engine  # what the operator renders, kubetune serve reads
    for flag in ENGINES[engine]:
        if not flag.crd:
            continue
        value = SAMPLE[flag.crd]
        if flag.cli is None:  # the LoRA capacity: passed through to vLLM
            assert engine_flags.vllm_arg(flag, value) in args, flag.crd
        elif flag.repeated:
            assert all(f"{flag.cli}={item}" in args for item in value), flag.crd
        else:
            assert args[args.index(flag.cli) + 1] == str(value), flag.crd
    vllm_only = {flag.cli for flag in VLLM if flag.cli} - {flag.cli for flag in TRANSFORMERS if flag.cli}
    if engine == "transformers":
        assert not vllm_only & set(args) and not any(a.startswith("--vllm-arg") for a in args)


def _vllm_argv(serve_args: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What `kubetune serve ... --engine vllm` execs for these arguments (its `--dry-run` line)."""
    from kubetune.trainer.cli.infer import _exec_vllm

    args = _serve_parser().parse_args([*serve_args[1:], "--dry-run"])
    capsys.readouterr()
    assert _exec_vllm(args) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("exec: "))
    return shlex.split(line[len("exec: "):])


def test_an_engine_args_value_round_trips_to_the_vllm_argv(tiny_model_dir: Path, capsys) -> None:
    model = str(tiny_model_dir)
    settings = {k: v for k, v in _settings("vllm").items() if k not in ("tensorParallelSize", "draftModel",
                                                                         "numSpeculativeTokens")}
    settings["draftModel"] = model  # a local draft (resolved like the model)
    settings["numSpeculativeTokens"] = 3
    argv = _vllm_argv(_serve_args("vllm", settings, model=model, tensorParallelSize=2, gpus=2), capsys)

    def value(name: str) -> str | None:
        return argv[argv.index(name) + 1] if name in argv else None

    assert value("--dtype") == "float16" and value("--max-model-len") == "4096"
    assert value("--max-num-seqs") == "8" and value("--tensor-parallel-size") == "2"
    assert value("--quantization") == "fp8" and value("--gpu-memory-utilization") == "0.5"
    assert {"--enable-lora", "--max-loras=3", "--max-lora-rank=64", "--enable-prefix-caching"} <= set(argv)
    assert '"num_speculative_tokens": 3' in value("--speculative-config")
    # every table entry that is a vLLM argument of its own arrives under its vLLM name
    for flag in VLLM:
        if flag.vllm and flag.crd in settings | {"tensorParallelSize": 2}:
            assert flag.vllm in argv or any(a.startswith(f"{flag.vllm}=") for a in argv), flag.vllm


@pytest.mark.parametrize("flag", [f for f in VLLM if f.vllm and f.dest], ids=lambda f: f.cli)
def test_every_serve_flag_with_a_vllm_name_reaches_the_vllm_argv(flag: EngineFlag, tiny_model_dir: Path, capsys) -> None:
    sample = {str: "1G" if flag.to_vllm else "fp8", int: "2", float: "0.5"}
    value = flag.choices[-1] if flag.choices else sample[_kind(flag)]
    argv = _vllm_argv(["serve", str(tiny_model_dir), "--engine", "vllm", flag.cli, str(value)], capsys)
    expected = str(flag.to_vllm(value)) if flag.to_vllm else str(value)
    assert argv[argv.index(flag.vllm) + 1] == expected


def _kind(flag: EngineFlag) -> type:
    from kubetune.trainer.cli.infer import _value_type

    return _value_type(flag.type)


def test_kubetune_never_caps_vllm_below_its_own_defaults() -> None:
    """#19 item 8: `kubetune serve` used to pass `--max-num-seqs 16` (its transformers engine's
    batch size) to vLLM, queueing above 16 streams what plain vLLM batches. Unset, vLLM decides."""
    import argparse

    from kubetune.trainer.cli.infer import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "some/model", "--engine", "vllm"])
    argv = engine_flags.vllm_args(engine_flags.vllm_flag_values(vars(args)))
    assert "--max-num-seqs" not in argv, argv
    args = parser.parse_args(["serve", "some/model", "--engine", "vllm", "--max-batch-size", "64"])
    argv = engine_flags.vllm_args(engine_flags.vllm_flag_values(vars(args)))
    assert argv[argv.index("--max-num-seqs") + 1] == "64"
