"""The vLLM engine's room for new tokens counts a picture as vLLM does: its prompt holds one image
token per picture, which vLLM expands into the picture's features, so the offline engine
(`kubetune generate --engine vllm`) caps max_tokens by the expanded length, as the model's
processor counts it (tiny-llava: 16 features for a 32x32 picture)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from kubetune.trainer.serve.params import InvalidRequest, SamplingParams


@pytest.fixture(scope="module")
def tiny_llava_dir(_isolated_cache: Path) -> Path:
    from kubetune.trainer.train.models.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-llava")


def test_each_picture_adds_its_features_to_the_prompt_length(tiny_llava_dir):
    from kubetune.trainer.serve.vllm_engine import image_token_surplus, vision_processor_of

    processor = vision_processor_of(tiny_llava_dir)
    picture = Image.new("RGB", (32, 32), (200, 30, 30))
    assert image_token_surplus(processor, {"image": picture}) == 16 - 1
    assert image_token_surplus(processor, {"image": [picture, picture]}) == 2 * (16 - 1)
    assert image_token_surplus(processor, None) == 0
    assert image_token_surplus(None, {"image": picture}) == 0  # a text model
    # The same count the processor's own expansion gives (what the transformers engine feeds the model).
    expanded = processor(text="<image> what colour?", images=[picture], return_tensors="pt")["input_ids"][0]
    assert int((expanded == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 16


def test_a_prompt_whose_pictures_fill_the_context_is_refused(tiny_llava_dir):
    """A 4-token prompt holding two pictures (vLLM expands them to 2 x 16 tokens) in a 40-token
    context: 6 tokens are left, so max_tokens 8 is refused and an unset max_tokens becomes 6, not 36."""
    from kubetune.trainer.serve.params import Sequence
    from kubetune.trainer.serve.vllm_engine import VLLMEngine, vision_processor_of

    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM needed for the arithmetic
    engine.processor, engine.context_length = vision_processor_of(tiny_llava_dir), 40
    pictures = {"image": [Image.new("RGB", (32, 32)), Image.new("RGB", (32, 32))]}
    seq = Sequence(prompt_ids=[1, 2, 3, 4], params=SamplingParams(), media=pictures)
    assert engine.prompt_length(seq) == 4 + 2 * 15
    assert engine.check_length(engine.prompt_length(seq), SamplingParams()) == 6
    with pytest.raises(InvalidRequest, match="maximum context length is 40"):
        engine.check_length(engine.prompt_length(seq), SamplingParams(max_tokens=8))
