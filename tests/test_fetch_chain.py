"""The InferenceService init container follows a chain of adapters (a pipeline's last step is an
adapter on the previous step's output, itself an adapter on the base) and fetches every link."""

from __future__ import annotations

from pathlib import Path

import yaml

from kubetune.trainer.serve.fetch import fetch
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import S3Env
from tests.test_infer_helpers import build_adapter


def test_fetch_follows_a_chain_of_adapters_to_the_base(s3: S3Env, tiny_model_dir: Path, tmp_path: Path) -> None:
    first = build_adapter("chain-sft", tiny_model_dir, seed=3)
    second = tmp_path / "chain-dpo"
    second.mkdir()
    for file in build_adapter("chain-dpo-src", tiny_model_dir, seed=4).iterdir():
        (second / file.name).write_bytes(file.read_bytes())
    s3.upload_tree(tiny_model_dir, "models/base")
    # As a pipeline saves them: each step's spec names the previous step's output as its model.
    for adapter, base, prefix in ((first, s3.uri("models/base"), "runs/pipe/0-sft"), (second, s3.uri("runs/pipe/0-sft"), "runs/pipe/1-dpo")):
        spec = yaml.safe_load((adapter / "kubetune-spec.yaml").read_text())
        spec["model"]["path"] = base
        staged = tmp_path / "staged" / prefix
        staged.mkdir(parents=True)
        for file in adapter.iterdir():
            (staged / file.name).write_bytes(file.read_bytes())
        (staged / "kubetune-spec.yaml").write_text(yaml.safe_dump(spec))
        s3.upload_tree(staged, prefix)

    records = fetch(s3.uri("runs/pipe/1-dpo"), [], storage=s3.settings())
    assert [(r["field"], r["location"]) for r in records] == [
        ("model", s3.uri("runs/pipe/1-dpo")),
        ("base model", s3.uri("runs/pipe/0-sft")),
        ("base model", s3.uri("models/base")),
    ]
    assert all(Path(r["path"]).is_dir() for r in records)
