"""Vision-language models through real vLLM (#22): `kubetune serve builtin:tiny-llava --engine vllm`
answers chat requests with `image_url` data: URLs sent by the official `openai` client, and
`kubetune generate --engine vllm` answers image-text rows with their pictures (`multi_modal_data`).
In both, the picture reaches the model: the prompt counts its 16 image tokens, and the answer's
token log-probabilities are transformers' for the same prompt and picture (and differ between two
pictures).

vLLM's LLaVA needs torchvision (its CLIP image processor) and the hub's weight layout
(`vision_tower.vision_model.*`, which builtin:tiny-llava is saved in). The vLLM venv and skip rules
are those of tests/test_vllm_real.py; the module takes about two minutes on two cores.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import openai
import pytest

from .conftest import EXAMPLES
from .test_vllm_real import generate, require_vllm_python, serving, vllm_python

pytestmark = pytest.mark.slow

QUESTION = "What colour is the shape?"
COLOURS = ((220, 30, 30), (30, 60, 220))
IMAGE_TOKENS = 16  # 32x32 pictures in 8x8 patches
VLLM_FLAGS = ("--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory", "256M")


def data_url(colour: tuple[int, int, int]) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def tiny_llava_dir(_isolated_cache: Path) -> Path:
    from kubetune.trainer.train.models.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-llava")


@pytest.fixture(scope="module")
def llava_server(tiny_llava_dir, tmp_path_factory):
    python = require_vllm_python()
    with serving(python, tiny_llava_dir, tmp_path_factory.mktemp("vllm-llava"), "--served-model-name", "llava",
                 "--max-batch-size", "2", *VLLM_FLAGS) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_llava_dir):
    """kubetune's transformers engine on the same model (float32, greedy)."""
    from kubetune.trainer.serve import create_engine

    engine = create_engine(str(tiny_llava_dir), engine="transformers", dtype="float32")
    yield engine
    engine.close()


def reference_answer(engine, url: str, max_tokens: int):
    """transformers' greedy answer to QUESTION about the picture, the message rendered as vLLM
    renders a chat message's parts: its pictures' `<image>` first, then a newline and the text."""
    from kubetune.trainer.serve.media import fetch_image
    from kubetune.trainer.serve.params import SamplingParams, Sequence

    ids, media = engine.encode_chat_images([{"role": "user", "content": f"<image>\n{QUESTION}"}], [fetch_image(url)])
    seq = Sequence(prompt_ids=ids, params=SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1),
                   media=media, lstrip=True)
    engine.run([seq])
    return seq


def test_served_chat_with_an_image_url_answers_from_the_picture(llava_server, reference):
    client = openai.OpenAI(base_url=llava_server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    text_only = client.chat.completions.create(model="llava", max_tokens=1, temperature=0,
                                               messages=[{"role": "user", "content": QUESTION}]).usage.prompt_tokens
    first_logprobs = []
    for colour in COLOURS:
        url = data_url(colour)
        reply = client.chat.completions.create(model="llava", max_tokens=6, temperature=0, logprobs=True, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}])
        expected = reference_answer(reference, url, 6)
        # vLLM's processor expanded the picture into its image tokens (+1: the newline after them)
        assert reply.usage.prompt_tokens == len(expected.prompt_ids) == text_only + IMAGE_TOKENS + 1
        got = [token.logprob for token in reply.choices[0].logprobs.content]
        assert got == pytest.approx([token.logprob for token in expected.logprobs], abs=1e-3), colour
        # vLLM holds back a trailing partial UTF-8 character; the transformers engine emits U+FFFD.
        assert expected.text.startswith(reply.choices[0].message.content.rstrip("\ufffd"))
        first_logprobs.append(got[0])
    assert first_logprobs[0] != pytest.approx(first_logprobs[1], abs=1e-3)  # each answer depends on its picture


def test_generate_answers_image_rows_with_their_pictures(tiny_llava_dir, reference, tmp_path):
    """The offline engine (`VLLMEngine`: one `<image>` per picture in the prompt, the pictures as
    `multi_modal_data`) on LLaVA-form rows: what the transformers engine answers, image tokens counted."""
    from kubetune.trainer.serve.batch import generate_file
    from kubetune.trainer.serve.params import SamplingParams

    rows = EXAMPLES / "data" / "shapes" / "eval.json"
    out = tmp_path / "vllm.jsonl"
    generate(vllm_python(), tiny_llava_dir, tmp_path, "--data", str(rows), "--max-samples", "2", "--out", str(out),
             "--max-tokens", "4", *VLLM_FLAGS)
    expected_out = tmp_path / "transformers.jsonl"
    generate_file(reference, str(rows), str(expected_out), SamplingParams(temperature=0.0, max_tokens=4), max_samples=2, progress=False)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [json.loads(line) for line in expected_out.read_text().splitlines()]
    assert len(got) == len(expected) == 2
    for row, reference_row in zip(got, expected, strict=True):
        assert row["prompt_tokens"] == reference_row["prompt_tokens"] > IMAGE_TOKENS
        assert reference_row["output"].startswith(row["output"].rstrip("\ufffd")), (row, reference_row)


# --- Qwen2-VL: multimodal RoPE, served by vLLM only -------------------------------------------

QWEN_IMAGE_TOKENS = 16  # 64x64 pixels (the image processor's fixed size) in 8x8 patches, merged 2x2


@pytest.fixture(scope="module")
def tiny_qwen2_vl_dir(_isolated_cache: Path) -> Path:
    from kubetune.trainer.train.models.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-qwen2-vl")


def qwen_reference(model_dir: Path, url: str, max_tokens: int, question: str = "\n" + QUESTION) -> tuple[int, list[float], str]:
    """transformers' greedy answer to QUESTION about the picture on the same Qwen2-VL (its 3-D
    positions from the processor's token types): the prompt's length and each token's logprob.
    The message is rendered as vLLM renders an image part for Qwen2-VL: the picture between its
    vision markers, a newline, the text."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kubetune.trainer.serve.media import fetch_image

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    content = f"<|vision_start|><|image_pad|><|vision_end|>{question}"
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                   add_generation_prompt=True)
    inputs = processor(text=[text], images=[fetch_image(url)], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    logprobs = [torch.log_softmax(score[0].float(), -1)[token].item() for score, token in zip(out.scores, new, strict=False)]
    return inputs["input_ids"].shape[1], logprobs, processor.tokenizer.decode(new, skip_special_tokens=True)


def test_qwen2_vl_served_by_vllm_answers_from_the_picture(tiny_qwen2_vl_dir, tmp_path_factory):
    """The official client's image_url reaches Qwen2-VL in vLLM: the prompt counts the picture's 16
    merged-patch tokens and its two markers, and each answer token's logprob is transformers'
    (multimodal RoPE included) for the same picture."""
    python = require_vllm_python()
    with serving(python, tiny_qwen2_vl_dir, tmp_path_factory.mktemp("vllm-qwen2-vl"), "--served-model-name", "qwen",
                 "--max-batch-size", "2", *VLLM_FLAGS) as server:
        client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
        text_only = client.chat.completions.create(model="qwen", max_tokens=1, temperature=0,
                                                   messages=[{"role": "user", "content": QUESTION}]).usage.prompt_tokens
        first = []
        for colour in COLOURS:
            url = data_url(colour)
            reply = client.chat.completions.create(model="qwen", max_tokens=6, temperature=0, logprobs=True, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}])
            length, expected, _ = qwen_reference(tiny_qwen2_vl_dir, url, 6)
            assert reply.usage.prompt_tokens == length == text_only + QWEN_IMAGE_TOKENS + 3  # markers and a newline
            got = [token.logprob for token in reply.choices[0].logprobs.content]
            assert got == pytest.approx(expected[:len(got)], abs=1e-3), colour
            first.append(got[0])
    assert first[0] != pytest.approx(first[1], abs=1e-3)


def test_qwen2_vl_generate_offline_wraps_each_picture_in_its_markers(tiny_qwen2_vl_dir, tmp_path):
    """`kubetune generate --engine vllm` on LLaVA-form rows: each `<image>` becomes Qwen2-VL's
    `<|vision_start|><|image_pad|><|vision_end|>` (as in training), vLLM expands the pad with the
    picture (its 3-D positions need the start marker), and the answer is transformers' greedy one."""
    rows = json.loads((EXAMPLES / "data" / "shapes" / "eval.json").read_text())[:2]
    out = tmp_path / "vllm.jsonl"
    generate(require_vllm_python(), tiny_qwen2_vl_dir, tmp_path, "--data",
             str(EXAMPLES / "data" / "shapes" / "eval.json"), "--max-samples", "2", "--out", str(out),
             "--max-tokens", "4", *VLLM_FLAGS)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    for row, answer in zip(rows, got, strict=True):
        picture = base64.b64encode((EXAMPLES / "data" / "shapes" / row["image"]).read_bytes()).decode()
        question = row["conversations"][0]["value"].replace("<image>", "")
        length, _, text = qwen_reference(tiny_qwen2_vl_dir, f"data:image/png;base64,{picture}", 4, question)
        assert answer["prompt_tokens"] == length
        assert text.startswith(answer["output"].rstrip("\ufffd")), (answer, text)
