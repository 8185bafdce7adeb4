"""The generation library and `kubetune generate`/`chat`: batching (continuous: sequences join a
running batch), sampling, speculative decoding, adapters, RoPE scaling, LoRA outputs used with
their adapter, JSONL to S3, and clear errors for bad inputs."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.cli.infer import main as infer_main
from kubetune.trainer.serve import SamplingParams, Sequence, create_engine
from kubetune.trainer.serve.batch import load_examples
from kubetune.trainer.serve.decode import DecodeBatch
from kubetune.trainer.serve.transformers_engine import greedy_reference
from tests.storage_fixtures import *  # noqa: F403

from .test_infer_helpers import build_adapter, capitals_data, foreign_adapter, trained_model

QUESTIONS = ["What is the capital of France?", "Capital of Japan?", "Name the capital city of Peru.",
             "What is the opposite of hot? Answer in one word, please, and be brief about it."]


@pytest.fixture(scope="module")
def trained_engine():
    return create_engine(str(trained_model()), engine="transformers")


@pytest.mark.slow  # trains a model (trained_model())
def test_batched_decoding_matches_generate(trained_engine):
    """Prompts of different lengths decoded together (left padding, KV cache, rows leaving the
    batch as they finish) give exactly model.generate's greedy tokens for each prompt alone."""
    eng = trained_engine
    sequences = [Sequence(prompt_ids=eng.encode_chat([{"role": "user", "content": q}]),
                          params=SamplingParams(temperature=0, max_tokens=12 + 4 * i)) for i, q in enumerate(QUESTIONS)]
    eng.run(sequences)
    for seq in sequences:
        reference = greedy_reference(eng.model, eng.tokenizer, seq.prompt_ids, seq.params.max_tokens)
        assert seq.token_ids == reference[: len(seq.token_ids)]
        assert seq.finish_reason == ("stop" if len(seq.token_ids) < len(reference) or reference[-1] in eng.eos_ids else "length")
    assert sequences[0].text.strip().startswith("The capital of")


@pytest.mark.slow  # trains a model (trained_model())
def test_sequences_join_a_running_batch(trained_engine):
    """Continuous batching: sequences admitted while others are decoding (prompts shorter and
    longer than the running cache) finish on their own schedule, and each produces exactly the
    tokens it produces alone: greedy ones model.generate's, a seeded sampled one its own draw."""
    eng = trained_engine

    def seq(question, max_tokens, **kw):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **{"temperature": 0, **kw})
        return Sequence(prompt_ids=eng.encode_chat([{"role": "user", "content": question}]), params=params)

    long, short, sampled = seq(QUESTIONS[0], 30), seq(QUESTIONS[1], 4), seq(QUESTIONS[3], 8, temperature=1.2, seed=4)
    batch = DecodeBatch(eng)
    batch.admit([long])
    finished = [s for _ in range(6) for s in batch.step()]
    batch.admit([short])  # its prompt is shorter than the running cache
    finished += batch.step()
    batch.admit([sampled])  # its prompt is longer
    while batch:
        finished += batch.step()
    assert finished == [short, sampled, long]
    for s in (long, short):
        assert s.token_ids == greedy_reference(eng.model, eng.tokenizer, s.prompt_ids, s.params.max_tokens, eos_token_id=None)
    alone = seq(QUESTIONS[3], 8, temperature=1.2, seed=4)
    eng.run([alone])
    assert sampled.token_ids == alone.token_ids and sampled.finish_reason == "length"


def test_sliding_window_cache_admits_only_into_an_empty_batch(tmp_path, tiny_tokenizer):
    """A model whose cache is not plain full attention (Mistral's sliding window) cannot have
    caches merged: newcomers wait for the batch to empty, and decoding stays exact."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=6, max_position_embeddings=128)
    MistralForCausalLM(config).save_pretrained(tmp_path / "sw")
    tiny_tokenizer.save_pretrained(tmp_path / "sw")
    eng = create_engine(str(tmp_path / "sw"), engine="transformers")
    sequences = [Sequence(prompt_ids=eng.encode_text(t), params=SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
                 for t in ("Hello there, how are you my friend?", "Hi")]
    batch = DecodeBatch(eng)
    batch.admit(sequences)
    assert not batch.can_admit
    while batch:
        batch.step()
    assert batch.can_admit
    for seq in sequences:
        assert seq.token_ids == greedy_reference(eng.model, eng.tokenizer, seq.prompt_ids, 10, eos_token_id=None)


@pytest.mark.slow  # trains a model (trained_model())
def test_speculative_decoding_is_exactly_greedy(trained_engine):
    """A draft model (the untrained builtin) and prompt lookup only speed decoding up: the greedy
    output is token for token the target's own greedy output."""
    draft = create_engine(str(trained_model()), engine="transformers", draft="builtin:tiny-llama", num_assistant_tokens=3)
    lookup = create_engine(str(trained_model()), engine="transformers", prompt_lookup=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for question in QUESTIONS[:3]:
        ids = trained_engine.encode_chat([{"role": "user", "content": question}])
        plain = greedy_reference(trained_engine.model, trained_engine.tokenizer, ids, 24, eos_token_id=None)
        for eng in (draft, lookup):
            seq = Sequence(prompt_ids=ids, params=params)
            eng.run([seq])
            assert seq.token_ids == plain, (eng.draft_model is not None, question)
            assert seq.finish_reason == "length"


@pytest.mark.slow  # trains a model (trained_model())
def test_sampling_settings(trained_engine):
    eng = trained_engine
    ids = eng.encode_chat([{"role": "user", "content": "What is the capital of Spain?"}])

    def sample(**kw):
        seq = Sequence(prompt_ids=ids, params=SamplingParams(max_tokens=16, **kw).validate())
        eng.run([seq])
        return seq

    a, b = sample(temperature=1.5, seed=7), sample(temperature=1.5, seed=7)
    assert a.token_ids == b.token_ids  # a seed makes sampling reproducible
    draws = {tuple(sample(temperature=2.0, seed=s).token_ids) for s in range(4)}
    assert len(draws) > 1  # and different seeds explore
    stopped = sample(temperature=0, stop=[" of"])
    assert stopped.text.strip() == "The capital" and stopped.finish_reason == "stop"
    with pytest.raises(SpecError, match="temperature"):
        SamplingParams(temperature=5).validate()


@pytest.mark.slow  # trains a model (trained_model())
def test_streaming_events_add_up(trained_engine):
    events = []
    seq = Sequence(prompt_ids=trained_engine.encode_chat([{"role": "user", "content": "Capital of Italy?"}]),
                   params=SamplingParams(temperature=0, max_tokens=20), emit=events.append, lstrip=True)
    trained_engine.run([seq])
    assert len([e for e in events if e.text]) >= 3
    assert "".join(e.text for e in events) == seq.text
    assert events[-1].finish_reason == seq.finish_reason and all(e.finish_reason is None for e in events[:-1])


def test_adapters_on_one_base(tiny_model_dir):
    """Two adapters and the base on one model: each name selects its own weights; a LoRA output
    directory given as the model is served on the base its kubetune-spec.yaml names."""
    a = build_adapter("alpha", tiny_model_dir, seed=1)
    b = build_adapter("beta", tiny_model_dir, seed=2)
    eng = create_engine(str(tiny_model_dir), engine="transformers", adapters=[_ref("alpha", a), _ref("beta", b)])
    assert eng.model_names == [tiny_model_dir.name, "alpha", "beta"]
    prompt = ["The capital of France"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    base_out = eng.generate(prompt, params)[0].text
    outs = {name: eng.generate(prompt, params, model=name)[0].text for name in ("alpha", "beta")}
    assert len({base_out, *outs.values()}) == 3
    plain = create_engine(str(tiny_model_dir), engine="transformers")
    assert plain.generate(prompt, params)[0].text == base_out  # disabling adapters gives the plain base
    single = create_engine(str(a), engine="transformers")
    assert single.model_names == [tiny_model_dir.name, "alpha"]
    assert single.generate(prompt, params, model="alpha")[0].text == outs["alpha"]


def test_rope_scaling_from_saved_config(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "scaled"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 512
    config["rope_parameters"] = {**(config.get("rope_parameters") or {}), "rope_type": "linear", "factor": 2.0}
    config.pop("rope_scaling", None)
    (model_dir / "config.json").write_text(json.dumps(config))
    eng = create_engine(str(model_dir), engine="transformers")
    assert eng.context_length == 512
    assert eng.model.config.rope_parameters["factor"] == 2.0
    long_prompt = "Capital of France? " * 60  # > 256 tokens: only fits thanks to the scaling
    out = eng.generate([long_prompt], SamplingParams(temperature=0, max_tokens=4))[0]
    assert out.prompt_tokens > 256 and out.completion_tokens >= 1


def _ref(name, path):
    from kubetune.trainer.artifacts.adapters import AdapterRef

    return AdapterRef(name, str(path))


# --------------------------------------------------------------------------------------------
# CLI


@pytest.mark.slow  # trains a model (trained_model())
def test_generate_cli_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    code = infer_main(["generate", str(trained_model()), "--data", str(capitals_data()), "--out", str(out),
                       "--max-samples", "6", "--max-tokens", "16", "--batch-size", "4", "--quiet"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6))
    for r in rows:
        assert r["prompt"][-1]["role"] == "user" and r["reference"].startswith("The capital of")
        assert r["output"] and r["finish_reason"] in ("stop", "length") and r["completion_tokens"] > 0


@pytest.mark.slow  # trains a model (trained_model())
def test_chat_cli_is_multi_turn(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Capital of France?\n/reset\nCapital of Peru?\n"))
    code = infer_main(["chat", str(trained_model()), "--temperature", "0", "--max-tokens", "12"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("The capital of ") for line in lines)
    assert "history cleared" in captured.err


def test_lora_output_uses_its_adapter_and_jsonl_goes_to_s3(s3, tiny_model_dir, monkeypatch, capsys):
    """`generate` and `chat` on a LoRA output directory answer with the adapter (not the bare
    base), and `generate --out s3://...` uploads the JSONL (a prefix gets generations.jsonl)."""
    adapter = build_adapter("alpha", tiny_model_dir, seed=1)
    eng = create_engine(str(adapter), engine="transformers")
    assert eng.default_model == "alpha"
    params = SamplingParams(temperature=0, max_tokens=6)
    examples = load_examples(str(capitals_data()), max_samples=2)
    tuned = [c.text for c in eng.generate([e.messages for e in examples], params, model="alpha")]
    assert tuned != [c.text for c in eng.generate([e.messages for e in examples], params)]  # the adapter matters
    s3_flags = ["--endpoint-url", s3.proxy.url, "--path-style"]
    code = infer_main(["generate", str(adapter), "--data", str(capitals_data()), "--max-samples", "2", "--max-tokens", "6",
                       "--out", s3.uri("runs/preds/"), "--quiet", *s3_flags])
    assert code == 0, capsys.readouterr().err
    assert f"by alpha to {s3.uri('runs/preds/generations.jsonl')}" in capsys.readouterr().out
    rows = [json.loads(line) for line in s3.get("runs/preds/generations.jsonl").decode().splitlines()]
    assert [r["model"] for r in rows] == ["alpha", "alpha"] and [r["output"] for r in rows] == tuned

    monkeypatch.setattr("sys.stdin", io.StringIO("Capital of France?\n"))
    assert infer_main(["chat", str(adapter), "--temperature", "0", "--max-tokens", "6"]) == 0
    expected = eng.generate([[{"role": "user", "content": "Capital of France?"}]], params, model="alpha")[0].text
    assert capsys.readouterr().out.strip() == expected.strip()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/model"], "does not exist"),
        (["{tiny}", "--adapter", "x={foreign}"], "does not fit the base model"),
        (["{tiny}", "--adapter", "x={data}"], "holds no LoRA adapter"),
        (["{tiny}", "--draft-model", "{tiny}", "--prompt-lookup", "2"], "cannot be combined"),
        (["{tiny}", "--temperature", "9"], "temperature"),
        (["{tiny}", "--model-name", "nope"], "does not exist"),
    ],
)
def test_cli_bad_inputs_exit_2(args, message, tmp_path, tiny_model_dir, capsys):
    values = {"tiny": str(tiny_model_dir), "foreign": str(foreign_adapter()) if "{foreign}" in " ".join(args) else "",
              "data": str(capitals_data())}
    argv = ["generate", *[a.format(**values) for a in args], "--data", str(capitals_data()),
            "--out", str(tmp_path / "o.jsonl"), "--quiet", "--max-samples", "2"]
    code = infer_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.startswith("kubetune: ") and "Traceback" not in err


def test_vllm_server_command_maps_the_flags(tiny_model_dir, monkeypatch):
    """`kubetune serve --engine vllm` execs vLLM's OpenAI server with kubetune's flags mapped (an
    argument list, no shell); an adapter output is served on its base under its own name."""
    from kubetune.trainer.serve.vllm_engine import server_command

    adapter = build_adapter("alpha", tiny_model_dir, seed=1)
    monkeypatch.setenv("KUBETUNE_API_KEY", "k")
    monkeypatch.setenv("VLLM_API_KEY", "")  # restored after the test
    argv = server_command(str(adapter), port=9000, max_model_len=256, dtype="float32", api_key_env="KUBETUNE_API_KEY",
                          adapters=[_ref("beta", build_adapter("beta", tiny_model_dir, seed=2))], prompt_lookup=3)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert flags["--model"] == str(tiny_model_dir) and flags["--served-model-name"] == tiny_model_dir.name
    assert flags["--port"] == "9000" and flags["--max-model-len"] == "256" and flags["--dtype"] == "float32"
    lora = argv.index("--lora-modules")
    assert "--enable-lora" in argv and argv[lora + 1:lora + 3] == [f"alpha={adapter}", f"beta={_root_of(adapter)}/adapter-beta"]
    assert json.loads(argv[argv.index("--speculative-config") + 1])["method"] == "ngram"
    import os

    assert os.environ["VLLM_API_KEY"] == "k" and "k" not in argv  # the key stays out of the process list


def _root_of(path):
    return path.parent
