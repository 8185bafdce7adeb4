"""Vision-language SFT (#22): image-text rows in both forms, the tiny LLaVA and its processor, the
loss mask (answers only; image tokens never), which parts train, images through `kubetune serve`
with the official `openai` client (data: URLs and s3://), the vLLM request translation, and
`kubetune estimate` counting the vision tower."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import pytest

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec
from kubetune.trainer.serve.params import InvalidRequest
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import S3Env

from .conftest import EXAMPLES

SHAPES = EXAMPLES / "data" / "shapes"


@pytest.fixture(scope="session")
def tiny_llava_dir(_isolated_cache: Path) -> Path:
    from kubetune.trainer.train.models.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-llava")


def spec_for(tmp_path: Path, **changes) -> TrainingSpec:
    doc = {"model": {"path": "builtin:tiny-llava"},
           "data": {"datasets": [{"path": str(SHAPES / "train.json"), "maxSamples": 8}],
                    "evalDatasets": [{"path": str(SHAPES / "eval.json"), "maxSamples": 4}], "maxLength": 64},
           "output": {"path": str(tmp_path / "out")}, **changes}
    return TrainingSpec.model_validate(doc)


def png_bytes(colour=(220, 30, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# --- data -------------------------------------------------------------------------------------

def test_both_row_forms_align_to_messages_and_images():
    from kubetune.trainer.train.data.vision import align_row

    sharegpt = {"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "red"}],
                "images": ["a.png"]}
    llava = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
    for row in (sharegpt, llava):
        messages, images = align_row(row)
        assert [m["role"] for m in messages] == ["user", "assistant"] and images == ["a.png"]
    # images without a placeholder go before the first user turn (LlamaFactory's rule)
    messages, _ = align_row({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}], "images": ["a", "b"]})
    assert messages[0]["content"] == "<image><image>Hi"


def test_placeholder_count_must_match_and_paths_stay_below_the_dataset(tmp_path):
    from kubetune.trainer.train.data.aligners import InvalidRow
    from kubetune.trainer.train.data.vision import align_row, load_rows

    with pytest.raises(InvalidRow, match="2 <image> placeholder"):
        align_row({"messages": [{"role": "user", "content": "<image><image>?"}, {"role": "assistant", "content": "x"}], "images": ["a"]})
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.json").write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}],
                                                 "images": ["../secret.png"]}]))
    spec = spec_for(tmp_path, data={"datasets": [{"path": str(data / "rows.json")}]})
    with pytest.raises(SpecError, match=r"cannot be stored as a local file|maps outside"):
        load_rows(spec, spec.data.datasets, "data.datasets")
    (data / "rows.json").write_text(json.dumps([{"image": "missing.png", "conversations": [{"from": "human", "value": "<image>?"},
                                                                                            {"from": "gpt", "value": "x"}]}]))
    with pytest.raises(SpecError, match="does not exist"):
        load_rows(spec, spec.data.datasets, "data.datasets")


def test_images_come_from_s3_through_the_storage_layer(s3: S3Env, tmp_path):
    from kubetune.trainer.train.data.vision import load_rows

    s3.put("pics/red.png", png_bytes())
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "red"}],
                                 "images": [s3.uri("pics/red.png")]}]))
    spec = spec_for(tmp_path, data={"datasets": [{"path": str(rows)}]}, storage=s3.settings().model_dump())
    [row] = load_rows(spec, spec.data.datasets, "data.datasets")
    assert Path(row["images"][0]).read_bytes() == png_bytes()


def test_only_answer_tokens_are_labelled_and_every_image_token_is_masked(tiny_llava_dir, tmp_path):
    from kubetune.trainer.train.data.vision import VisionCollator, build_vision_datasets
    from kubetune.trainer.train.models.vision import load_processor

    spec = spec_for(tmp_path)
    processor = load_processor(spec)
    data = build_vision_datasets(spec, processor)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    row = data.train[0]
    assert row["input_ids"].count(image_id) == 16  # 32x32 picture, 8x8 patches
    labelled = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    answer = processor.tokenizer.decode(labelled)
    assert answer.strip().startswith("It is") and answer.endswith("</s>") and image_id not in labelled
    assert data.stats["train"]["firstExample"][0]["trained"] is False
    batch = VisionCollator(processor)([data.train[0], data.train[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_eval_size_holds_out_image_rows_and_bad_rows_are_named(tiny_llava_dir, tmp_path):
    from kubetune.trainer.train.data.vision import build_vision_datasets
    from kubetune.trainer.train.models.vision import load_processor

    spec = spec_for(tmp_path, data={"datasets": [{"path": str(SHAPES / "train.json"), "maxSamples": 10}], "evalSize": 0.2})
    data = build_vision_datasets(spec, load_processor(spec))
    assert (len(data.train), len(data.eval)) == (8, 2)
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"messages": [{"role": "robot", "content": "?"}], "images": []}]))
    bad = spec_for(tmp_path, data={"datasets": [{"path": str(rows)}]})
    with pytest.raises(SpecError, match=r"row 0 is not an image-text conversation: unknown speaker 'robot'"):
        build_vision_datasets(bad, load_processor(bad))


def test_regenerating_the_shapes_demo_gives_the_committed_files(tmp_path):
    from kubetune.trainer.train.shapes import write_shapes

    write_shapes(tmp_path)
    for name in ("train.json", "eval.json", "preferences.json", "preferences_eval.json", "images/train-0000.png",
                 "images/eval-0059.png"):
        assert (tmp_path / name).read_bytes() == (SHAPES / name).read_bytes(), name


# --- model ------------------------------------------------------------------------------------

def parts_trainable(model) -> dict[str, int]:
    from kubetune.trainer.train.models.vision import part_of

    counts = {"language": 0, "tower": 0, "projector": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[part_of(name)] += param.numel()
    return counts


def test_lora_adapts_the_language_model_and_the_vision_parts_only_when_asked(tiny_llava_dir, tmp_path):
    from kubetune.trainer.train.stages import stage_for, vision

    spec = spec_for(tmp_path)
    assert stage_for(spec) is vision
    model = vision.apply_method(vision.load_model(spec, "fp32", None), spec)
    counts = parts_trainable(model)
    assert counts["language"] > 0 and counts["tower"] == 0 and counts["projector"] == 0
    adapted = {name for name, _ in model.named_modules() if name.endswith("lora_A")}
    assert adapted and all("language_model" in name for name in adapted)

    both = spec_for(tmp_path, vision={"trainProjector": True, "trainTower": True})
    counts = parts_trainable(vision.apply_method(vision.load_model(both, "fp32", None), both))
    assert counts["tower"] > 0 and counts["projector"] > 0

    full = spec_for(tmp_path, method="full")
    counts = parts_trainable(vision.apply_method(vision.load_model(full, "fp32", None), full))
    assert counts["language"] > 0 and counts["tower"] == counts["projector"] == 0


def test_vision_models_train_with_sft_or_dpo_only(tmp_path):
    from kubetune.trainer.train.stages import vision

    with pytest.raises(SpecError, match="stage sft or dpo, not kto"):
        vision.preflight(spec_for(tmp_path, stage="kto"))
    with pytest.raises(SpecError, match="padded batches"):
        vision.preflight(spec_for(tmp_path, data={"datasets": [{"path": str(SHAPES / "train.json")}], "packing": True}))


# --- serving ----------------------------------------------------------------------------------

def data_url(colour=(220, 30, 30)) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(colour)).decode()


def test_image_urls_are_bounded_and_only_data_or_s3():
    from kubetune.trainer.serve.media import fetch_image

    assert fetch_image(data_url()).size == (32, 32)
    for url, match in (("http://169.254.169.254/latest", "neither a data: URL"), ("/etc/passwd", "neither"),
                       ("data:image/png;base64,@@@", "not valid base64"), ("data:text/plain;base64,aGk=", "data:image")):
        with pytest.raises(InvalidRequest, match=match):
            fetch_image(url)
    with pytest.raises(InvalidRequest, match="over 0 MiB"):
        fetch_image(data_url(), max_bytes=10)
    with pytest.raises(InvalidRequest, match="not a picture"):
        fetch_image("data:image/png;base64," + base64.b64encode(b"not a png").decode())


def test_an_inference_service_bounds_images_per_request_on_either_engine():
    """`spec.engineArgs.maxImagesPerPrompt` -> `kubetune serve --max-images` -> vLLM's
    `--limit-mm-per-prompt`, or the transformers engine's own bound."""
    from kubetune.trainer.api.engine_flags import serve_args, vllm_args
    from kubetune.trainer.serve.media import fetch_images

    assert serve_args("vllm", {"maxImagesPerPrompt": 2}) == serve_args("transformers", {"maxImagesPerPrompt": 2}) == ["--max-images", "2"]
    argv = vllm_args({"max_images": 2})
    assert argv[argv.index("--limit-mm-per-prompt") + 1] == '{"image": 2}'
    with pytest.raises(InvalidRequest, match="at most 1"):
        fetch_images([data_url(), data_url()], max_images=1)


def test_vllm_gets_the_pictures_as_multi_modal_data(tiny_llava_dir):
    """The vLLM engine path: one image token per picture in the prompt (vLLM expands it with its
    own processor) and the pictures as `multi_modal_data` in the prompt vLLM is given."""
    from kubetune.trainer.serve.params import SamplingParams, Sequence
    from kubetune.trainer.serve.vllm_engine import VLLMEngine, image_token_of, vllm_prompt

    assert image_token_of(tiny_llava_dir) == "<image>"
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.image_token = "<image>"
    engine.encode_chat = lambda messages, model=None, tools=None: [1, 2, 3]
    ids, media = engine.encode_chat_images([{"role": "user", "content": "<image>?"}], ["PICTURE"])
    seq = Sequence(prompt_ids=ids, params=SamplingParams(), media=media)
    assert vllm_prompt(dict, seq) == {"prompt_token_ids": [1, 2, 3], "multi_modal_data": {"image": "PICTURE"}}
    assert vllm_prompt(dict, Sequence(prompt_ids=[1], params=SamplingParams())) == {"prompt_token_ids": [1]}


def test_openai_client_sends_images_to_kubetune_serve(tiny_llava_dir, s3: S3Env):
    """A picture inline and one from S3, through the official client, into the continuous batch;
    the same request without a picture, and pictures to a text model, are answered as OpenAI does."""
    import openai

    from kubetune.trainer.serve import create_engine
    from kubetune.trainer.serve.server import ServerConfig, create_app

    from .test_server_openai import running

    s3.put("pics/blue.png", png_bytes((30, 60, 220)))
    engine = create_engine(str(tiny_llava_dir), engine="transformers", served_name="llava", storage=s3.settings())
    app = create_app(engine, config=ServerConfig(max_batch_size=4, batch_wait_s=0.02, storage=s3.settings()))
    with running(app) as (url, _server):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for image in (data_url(), s3.uri("pics/blue.png")):
            reply = client.chat.completions.create(model="llava", max_tokens=4, temperature=0, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What colour is the shape?"}]}])
            # 16 image tokens + the text: the picture reached the model as its processor expands it
            assert reply.usage.prompt_tokens > 16 and reply.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="neither a data: URL"):
            client.chat.completions.create(model="llava", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}])


def test_models_with_their_own_image_positions_are_sent_to_vllm(tiny_llava_dir):
    """Qwen2-VL's M-RoPE (`get_rope_index`) is not what the decode batch computes: refused, not wrong."""
    from kubetune.trainer.serve import create_engine
    from kubetune.trainer.serve.transformers_engine import multimodal_positions

    engine = create_engine(str(tiny_llava_dir), engine="transformers")
    assert not multimodal_positions(engine.model)
    engine.model.model.get_rope_index = lambda *args: None  # as Qwen2VLModel has
    assert multimodal_positions(engine.model)
    with pytest.raises(InvalidRequest, match="--engine vllm"):
        engine.encode_chat_images([{"role": "user", "content": "<image>?"}], [object()])


def test_image_parts_to_a_text_model_are_refused(tiny_model_dir):
    from kubetune.trainer.serve.protocol import ChatMessage

    message = ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": data_url()}}, {"type": "text", "text": "?"}])
    assert message.as_template_message("<image>")["content"] == "<image>?"
    with pytest.raises(InvalidRequest, match="takes no images"):
        message.as_template_message(None)


def test_served_image_prefill_matches_generate(tiny_llava_dir):
    """The continuous batch's prefill with pixels gives transformers' own greedy answer."""
    import torch

    from kubetune.trainer.serve import create_engine
    from kubetune.trainer.serve.media import fetch_image
    from kubetune.trainer.serve.params import SamplingParams, Sequence

    engine = create_engine(str(tiny_llava_dir), engine="transformers")
    ids, media = engine.encode_chat_images([{"role": "user", "content": "<image>What colour is the shape?"}], [fetch_image(data_url())])
    seq = Sequence(prompt_ids=ids, params=SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), media=media)
    engine.run([seq, Sequence(prompt_ids=ids[-5:], params=SamplingParams(temperature=0.0, max_tokens=3))])
    with torch.inference_mode():
        prompt = torch.tensor([ids])
        reference = engine.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                          eos_token_id=None, pad_token_id=engine.pad_id, **media)[0, len(ids):].tolist()
    assert seq.token_ids == reference


def test_generate_answers_image_rows_with_their_pictures(tiny_llava_dir, tmp_path):
    """`kubetune generate` on LMFlow/LLaVA rows: the pictures reach the model (16 image tokens in
    every prompt), the answers are kept as references."""
    from kubetune.trainer.serve import create_engine
    from kubetune.trainer.serve.batch import generate_file
    from kubetune.trainer.serve.params import SamplingParams

    engine = create_engine(str(tiny_llava_dir), engine="transformers")
    out = tmp_path / "gen.jsonl"
    assert generate_file(engine, str(SHAPES / "eval.json"), str(out), SamplingParams(temperature=0.0, max_tokens=3),
                         max_samples=3, progress=False) == 3
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["prompt_tokens"] > 16 and r["reference"].startswith("It is") for r in records)


# --- estimate ---------------------------------------------------------------------------------

def test_estimate_counts_the_vision_tower(tiny_llava_dir):
    from kubetune.trainer.api.estimate import estimate, shape_for_path

    text = shape_for_path("builtin:tiny-llama")
    vlm = shape_for_path("builtin:tiny-llava")
    assert vlm.vision_params > 0 and text.vision_params == 0
    config = json.loads((tiny_llava_dir / "config.json").read_text())
    real = sum(p.numel() for name, p in _model_params(tiny_llava_dir) if "vision_tower" in name)
    assert abs(vlm.vision_params - real) / real < 0.05
    spec = TrainingSpec.model_validate({"model": {"path": "builtin:tiny-llava"}, "data": {"datasets": [{"path": "x.json"}]}})
    frozen = estimate(spec, shape=vlm)
    trained = estimate(spec.model_copy(update={"vision": spec.vision.model_copy(update={"trainTower": True})}), shape=vlm)
    assert frozen.parameters - estimate(spec, shape=text).parameters == vlm.vision_params + vlm.projector_params
    assert trained.trainable > frozen.trainable and trained.total > frozen.total
    assert any("vision encoder" in note and "frozen" in note for note in frozen.notes)
    assert "vision_config" in config


def _model_params(directory: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(directory).named_parameters()


# --- the demo ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_multimodal_demo_learns_to_answer_from_the_picture(tmp_path, tiny_llava_dir):
    """examples/multimodal.yaml, shortened: held-out exact match far above the base model's (0:
    random weights) and above guessing a colour or a shape (at most 1 in 3)."""
    import yaml

    from kubetune.trainer.train.runner import run

    doc = yaml.safe_load((EXAMPLES / "multimodal.yaml").read_text())
    doc["output"]["path"] = str(tmp_path / "out")
    doc["train"]["epochs"] = 4  # the example's 6 reach 70%; 4 keep the test near 2 minutes
    doc["data"]["datasets"][0]["path"] = str(SHAPES / "train.json")
    doc["data"]["evalDatasets"][0]["path"] = str(SHAPES / "eval.json")
    result = run(TrainingSpec.model_validate(doc))
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    heldout = status["heldout"]
    assert result.global_step > 0 and heldout["learned"]
    assert heldout["exact_match"] > 50, heldout
    assert (tmp_path / "out" / "processor_config.json").is_file()
    # the trained adapter, served: the official client sends a held-out picture and gets its answer
    import openai

    from kubetune.trainer.serve import create_engine
    from kubetune.trainer.serve.server import ServerConfig, create_app

    from .test_server_openai import running

    engine = create_engine(str(tmp_path / "out"), engine="transformers", served_name="base")
    rows = json.loads((SHAPES / "eval.json").read_text())
    with running(create_app(engine, config=ServerConfig(max_batch_size=8))) as (url, _server):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        right = 0
        for row in rows[:12]:
            picture = base64.b64encode((SHAPES / row["image"]).read_bytes()).decode()
            question = row["conversations"][0]["value"].replace("<image>", "")
            reply = client.chat.completions.create(model=engine.default_model, temperature=0, max_tokens=8, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{picture}"}},
                                             {"type": "text", "text": question}]}])
            right += reply.choices[0].message.content.strip() == row["conversations"][1]["value"]
    assert right >= 6, right  # the base model answers none
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
