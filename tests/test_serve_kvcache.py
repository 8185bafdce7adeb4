"""The decode batch's growing KV cache layer: appends write in place into spare room, reads equal
transformers' concatenating `DynamicLayer`, and a continuous batch decodes the same tokens."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from kubetune.trainer.serve import SamplingParams, Sequence, create_engine
from kubetune.trainer.serve.decode import DecodeBatch
from kubetune.trainer.serve.kvcache import GrowingLayer, growing_cache


def _states(rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, length, 4, generator=gen), torch.randn(rows, 2, length, 4, generator=gen)


def test_growing_layer_reads_like_dynamic_layer_and_reuses_its_buffer():
    """Chunks of any size appended (a prefill, then single steps), rows selected and columns
    trimmed in between, read back exactly as transformers' own layer; while there is room an
    append writes into the same buffer instead of copying the cache."""
    plain, growing = DynamicLayer(), GrowingLayer()
    for step, length in enumerate([7, 1, 1, 3, 1]):
        keys, values = _states(3, length, seed=step)
        expected = plain.update(keys, values)
        got = growing.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert growing.get_seq_length() == plain.get_seq_length() == 13
    buffer = growing._key_buffer.data_ptr()
    plain.update(*_states(3, 1, seed=9))
    growing.update(*_states(3, 1, seed=9))
    assert growing._key_buffer.data_ptr() == buffer  # room left: written in place

    index = torch.tensor([0, 2])
    for layer in (plain, growing):  # what DecodeBatch does when rows finish and padding columns go
        layer.batch_select_indices(index)
        layer.keys, layer.values = layer.keys[..., 2:, :], layer.values[..., 2:, :]
    plain.update(*_states(2, 1, seed=10))
    growing.update(*_states(2, 1, seed=10))
    assert torch.equal(plain.keys, growing.keys) and torch.equal(plain.values, growing.values)
    assert growing.keys.shape == (2, 2, 13, 4)


def test_growing_cache_keeps_special_layers(tiny_model_dir):
    from transformers import AutoConfig

    cache = growing_cache(AutoConfig.from_pretrained(tiny_model_dir))
    assert cache.layers and all(type(layer) is GrowingLayer for layer in cache.layers)


def test_continuous_batch_decodes_the_same_tokens_with_either_cache(tiny_model_dir):
    """Rows joining a running batch (shorter and longer prompts) and leaving it produce the same
    greedy tokens with the growing cache as with transformers' DynamicCache."""
    from transformers import DynamicCache

    engine = create_engine(str(tiny_model_dir), engine="transformers")
    prompts = [[5, 9, 11, 40, 7, 3], [8, 2], [13, 14, 15, 16, 17, 18, 19, 20, 21]]

    def decode(new_cache) -> list[list[int]]:
        engine.new_cache = new_cache
        sequences = [Sequence(prompt_ids=ids, params=SamplingParams(temperature=0, max_tokens=6 + 4 * i, ignore_eos=True))
                     for i, ids in enumerate(prompts)]
        batch = DecodeBatch(engine)
        batch.admit(sequences[:1])
        for _ in range(3):
            batch.step()
        batch.admit(sequences[1:])
        while batch:
            batch.step()
        return [seq.token_ids for seq in sequences]

    growing = decode(lambda: growing_cache(engine.model.config))
    plain = decode(lambda: DynamicCache(config=engine.model.config))
    assert growing == plain
    assert [len(tokens) for tokens in growing] == [6, 10, 14]
