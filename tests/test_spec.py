"""The training spec: defaults, validation messages, manifests vs bare specs, overrides, CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kubetune.trainer.api.errors import SpecErrors
from kubetune.trainer.api.specfile import apply_overrides, validate_training
from kubetune.trainer.cli.main import main
from kubetune.trainer.cli.specfiles import load_spec

from .conftest import EXAMPLES

MINIMAL = """\
model:
  path: builtin:tiny-llama
data:
  datasets:
    - path: examples/data/demo_alpaca.json
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_spec_is_five_lines_and_fills_defaults(tmp_path):
    assert len(MINIMAL.strip().splitlines()) == 5
    spec = load_spec(write(tmp_path, MINIMAL)).spec
    assert spec.stage == "sft" and spec.method == "lora"
    assert spec.train.learningRate > 0 and spec.checkpoint.resume == "auto"
    assert spec.packing_enabled is False
    assert spec.model_copy(update={"stage": "pt"}).packing_enabled is True
    assert spec.output_path == "outputs/kubetune"


def test_manifest_and_bare_spec_resolve_to_the_same_config(tmp_path):
    manifest = yaml.safe_load((EXAMPLES / "finetunejob-quickstart.yaml").read_text())
    bare = dict(manifest["spec"]["training"], name=manifest["metadata"]["name"])
    manifest["spec"]["nodes"] = 2  # cluster fields beside `training` are ignored locally
    from_manifest = load_spec(write(tmp_path, yaml.safe_dump(manifest), "job.yaml"))
    from_bare = load_spec(write(tmp_path, yaml.safe_dump(bare), "bare.yaml"))
    assert from_manifest.kind == "FineTuneJob" and from_manifest.field_prefix == "spec.training"
    assert from_bare.kind is None
    assert from_manifest.spec.to_document() == from_bare.spec.to_document()
    assert from_manifest.spec.name == "quickstart"


def test_overrides_set_nested_values_and_list_items():
    data = yaml.safe_load(MINIMAL)
    apply_overrides(data, ["train.maxSteps=7", "data.datasets.0.format=alpaca", "data.datasets.1.path=x.jsonl", "lora.targetModules=[q_proj, v_proj]"])
    spec = validate_training(data)
    assert spec.train.maxSteps == 7
    assert spec.data.datasets[0].format == "alpaca"
    assert spec.data.datasets[1].path == "x.jsonl"
    assert spec.lora.targetModules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("patch", "field", "hint"),
    [
        ({"train": {"learning_rate": 1e-4}}, "train.learning_rate", "did you mean `learningRate`"),
        ({"train": {"learningRate": -1}}, "train.learningRate", "greater than 0"),
        ({"train": {"batchSize": "four"}}, "train.batchSize", "valid integer"),
        ({"method": "qlora-ish"}, "method", "one of"),
        ({"data": {"datasets": [{"path": "a.jsonl", "format": "yaml"}]}}, "data.datasets[0].format", "one of"),
        ({"data": {"datasets": []}}, "data.datasets", "at least 1"),
        ({"freeze": {"trainableLayers": 0}}, "freeze", "nothing trainable"),
        ({"data": {"datasets": [{"path": "a.jsonl"}], "streaming": True}}, "(spec)", "train.maxSteps"),
    ],
)
def test_bad_specs_name_the_field(patch, field, hint):
    data = yaml.safe_load(MINIMAL)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    with pytest.raises(SpecErrors) as info:
        validate_training(data)
    message = str(info.value)
    assert f"{field}:" in message, message
    assert hint in message, message


def test_missing_model_is_reported(tmp_path):
    with pytest.raises(SpecErrors) as info:
        validate_training({"data": {"datasets": [{"path": "a.jsonl"}]}})
    assert "model: is required" in str(info.value)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """`kubetune ARGS` in-process: `main` returns the exit code (an error it does not turn into one
    propagates, so "no traceback" holds by the test not erroring); stdout and stderr captured."""
    start = Path.cwd()

    def run(*args: str, cwd: Path | None = None) -> CliResult:
        monkeypatch.chdir(cwd or start)
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code if isinstance(exit.code, int) else 1
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (MINIMAL.replace("builtin:tiny-llama", "builtin:tiny-llama\n  warp: 9"), "model.warp: unknown field"),
        (MINIMAL + "train:\n  learningRate: -0.1\n", "train.learningRate: Input should be greater than 0"),
        (MINIMAL + "train:\n  epochs: many\n", "train.epochs"),
        (MINIMAL.replace("demo_alpaca.json", "missing.jsonl"), "data.datasets[0].path: dataset 'examples/data/missing.jsonl' does not exist"),
        (MINIMAL + "      format: xml\n", "data.datasets[0].format: 'xml' is not a valid choice"),
        (MINIMAL + "stage: rlhf\n", "stage: 'rlhf' is not a valid choice"),
        ("model: [unclosed\n", "is not valid YAML"),
    ],
)
def test_cli_rejects_bad_specs_with_exit_code_2_and_no_traceback(run_cli, tmp_path, text, expect):
    spec = write(tmp_path, text)
    result = run_cli("validate", str(spec), cwd=EXAMPLES.parent)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expect in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3  # one paragraph, not a dump


def test_cli_names_manifest_fields_with_their_full_path(run_cli, tmp_path):
    manifest = yaml.safe_load((EXAMPLES / "finetunejob-quickstart.yaml").read_text())
    manifest["spec"]["training"]["train"]["learningRate"] = -1
    result = run_cli("validate", str(write(tmp_path, yaml.safe_dump(manifest))), cwd=EXAMPLES.parent)
    assert result.returncode == 2
    assert "spec.training.train.learningRate" in result.stderr


def test_validate_prints_the_resolved_spec(capsys, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    assert main(["validate", "examples/quickstart.yaml", "--print", "--set", "train.maxSteps=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["maxSteps"] == 3
    assert resolved["name"] == "quickstart"
    assert validate_training(resolved).to_document() == resolved  # the resolved spec round-trips


def test_alignment_job_with_base_model_from_validates_but_does_not_train_locally(tmp_path, capsys):
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "AlignmentJob", "metadata": {"name": "dpo"},
        "spec": {"baseModelFrom": {"fineTuneJob": "sft"},
                 "training": {"stage": "dpo",  # an AlignmentJob runs an alignment stage (admission says so)
                              "data": {"datasets": [{"path": "s3://data/prefs.jsonl", "format": "preference"}]}}},
    }
    path = write(tmp_path, yaml.safe_dump(manifest))
    loaded = load_spec(path)
    assert loaded.spec.model.path == "kubetune-ref://fineTuneJob/sft"
    assert main(["validate", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.training.model.path" in err and "--set model.path=" in err


# -- `kubetune validate` applies the admission webhook's rules, for every kind (issue 15) ---------

ISVC = {
    "apiVersion": "kubetune.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "chat"},
    "spec": {"model": {"uri": "s3://models/llama"}, "engine": "vllm", "gpus": 1},
}


def test_validate_checks_an_inference_service_like_the_webhook(run_cli, tmp_path):
    """It refused every InferenceService ("kind 'InferenceService' cannot be trained")."""
    from kubetune.operator.validation import AdmissionRefused, admit

    good = run_cli("validate", str(write(tmp_path, yaml.safe_dump(ISVC), "good.yaml")))
    assert good.returncode == 0 and "valid InferenceService" in good.stdout, good.stderr
    bad = yaml.safe_load(yaml.safe_dump(ISVC))
    bad["spec"].update(engine="tgi", maxReplicas=0)
    path = write(tmp_path, yaml.safe_dump(bad), "bad.yaml")
    result = run_cli("validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "spec.engine" in result.stderr and "spec.maxReplicas" in result.stderr
    with pytest.raises(AdmissionRefused) as refused:
        admit("CREATE", None, bad, source=str(path))
    assert result.stderr.strip() == f"kubetune: {refused.value}"  # one function, the same words


@pytest.mark.parametrize("command", ["validate", "train"])
def test_an_unknown_top_level_field_is_refused_like_kubectl_apply(run_cli, tmp_path, command):
    manifest = yaml.safe_load((EXAMPLES / "finetunejob-quickstart.yaml").read_text())
    manifest["definitelyNotAField"] = 3
    result = run_cli(command, str(write(tmp_path, yaml.safe_dump(manifest))), cwd=EXAMPLES.parent)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "definitelyNotAField: unknown field at the top of the manifest" in result.stderr
    isvc = {**ISVC, "sepc": {}}
    result = run_cli("validate", str(write(tmp_path, yaml.safe_dump(isvc), "isvc.yaml")))
    assert result.returncode == 2 and "did you mean `spec`?" in result.stderr


def test_a_manifest_with_local_data_trains_here_but_is_refused_for_the_cluster(run_cli, tmp_path):
    manifest = yaml.safe_load((EXAMPLES / "finetunejob-quickstart.yaml").read_text())
    manifest["spec"]["training"]["data"]["datasets"][0]["path"] = "examples/data/demo_alpaca.json"
    path = write(tmp_path, yaml.safe_dump(manifest))
    assert load_spec(path).spec.data.datasets[0].path == "examples/data/demo_alpaca.json"  # `kubetune train`
    result = run_cli("validate", str(path), cwd=EXAMPLES.parent)
    assert result.returncode == 2
    assert "spec.training.data.datasets[0].path" in result.stderr and "upload the file to S3" in result.stderr


def test_validate_echoes_a_huge_value_briefly(run_cli, tmp_path):
    manifest = yaml.safe_load((EXAMPLES / "finetunejob-quickstart.yaml").read_text())
    manifest["spec"]["training"]["method"] = "m" * 100_000
    for text in (yaml.safe_dump(manifest), yaml.safe_dump(manifest["spec"]["training"])):
        result = run_cli("validate", str(write(tmp_path, text)), cwd=EXAMPLES.parent)
        assert result.returncode == 2 and "method" in result.stderr and "more characters" in result.stderr
        assert len(result.stderr) < 2000, len(result.stderr)


def test_validate_warns_about_a_literal_secret_in_env(run_cli, tmp_path):
    manifest = yaml.safe_load((EXAMPLES / "finetunejob-quickstart.yaml").read_text())
    manifest["spec"]["env"] = [{"name": "HF_TOKEN", "value": "hf_secret"}]
    result = run_cli("validate", str(write(tmp_path, yaml.safe_dump(manifest))), cwd=EXAMPLES.parent)
    assert result.returncode == 0, result.stderr
    assert "kubetune: warning: spec.env[0] (HF_TOKEN) has a literal value" in result.stderr
    assert "hf_secret" not in result.stderr


@pytest.mark.parametrize(("stage", "packing"), [("sft", False), ("pt", True), ("dpo", False)])
def test_the_resolved_spec_says_whether_it_packs(stage, packing):
    """`kubetune-spec.yaml` has every default filled in, the derived `data.packing` too (#17 item 11)."""
    spec = validate_training({"stage": stage, "model": {"path": "builtin:tiny-llama"}, "data": {"datasets": [{"path": "d.json"}]}})
    document = spec.to_document()
    assert document["data"]["packing"] is packing
    assert validate_training(document).to_document() == document
