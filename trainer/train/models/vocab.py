"""Vocabulary extension (LMFlow's model customization): new tokens, new embedding rows.

New rows start at the mean of the existing rows plus small noise: a new token then begins as
an "average" token instead of a random vector far from everything the model knows, which keeps
the first steps' loss (and gradients) sane.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.spec import TrainingSpec

log = logging.getLogger(__name__)


def _corpus_texts(paths: list[str]) -> list[str]:
    texts: list[str] = []
    for i, name in enumerate(paths):
        path = Path(name)
        if not path.is_file():
            raise SpecError(f"vocab.trainCorpus[{i}]", f"{name!r} does not exist.", "list text or JSONL files.")
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except ValueError:
                    raise SpecError(f"vocab.trainCorpus[{i}]", f"{name!r} has a line that is not JSON.") from None
                line = str(record.get("text") or " ".join(str(v) for v in record.values()))
            texts.append(line)
    return texts


def tokens_from_corpus(tokenizer, texts: list[str], vocab_size: int) -> list[str]:
    """Whole words learned by a BPE tokenizer trained on the corpus that the current tokenizer
    splits into several pieces: the domain terms worth a token of their own."""
    if not getattr(tokenizer, "is_fast", False):
        raise SpecError("vocab.trainCorpus", "training a tokenizer needs a fast (Rust) tokenizer.", "list the tokens in vocab.addTokens instead.")
    trained = tokenizer.train_new_from_iterator(texts, vocab_size=vocab_size)
    found: list[str] = []
    for token in trained.get_vocab():
        word = trained.convert_tokens_to_string([token]).strip()
        if len(word) >= 3 and word.isalpha() and len(tokenizer.tokenize(word)) > 1 and word not in found:
            found.append(word)
    return sorted(found)


def new_tokens(spec: TrainingSpec, tokenizer) -> list[str]:
    vocab = spec.vocab
    tokens = list(vocab.addTokens)
    if vocab.tokensFile:
        path = Path(vocab.tokensFile)
        if not path.is_file():
            raise SpecError("vocab.tokensFile", f"{vocab.tokensFile!r} does not exist.", "point it at a file with one token per line.")
        tokens += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if vocab.trainCorpus:
        tokens += tokens_from_corpus(tokenizer, _corpus_texts(vocab.trainCorpus), vocab.trainVocabSize)
    existing = tokenizer.get_vocab()
    return list(dict.fromkeys(t for t in tokens if t not in existing))


def extend_tokenizer(spec: TrainingSpec, tokenizer) -> list[str]:
    """Add the spec's new tokens to the tokenizer; returns those actually added."""
    tokens = new_tokens(spec, tokenizer)
    if tokens:
        tokenizer.add_tokens(tokens)
        log.info("vocabulary extended by %d tokens (now %d)", len(tokens), len(tokenizer))
    return tokens


def resize_embeddings(model, new_size: int, noise_std: float, seed: int) -> int:
    """Grow input (and untied output) embeddings to `new_size`; new rows = mean + noise."""
    import torch

    old_size = model.get_input_embeddings().weight.shape[0]
    if new_size <= old_size:
        return old_size
    model.resize_token_embeddings(new_size, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    with torch.no_grad():
        for weight in matrices:
            old = weight[:old_size].float()
            mean, std = old.mean(dim=0), old.std(dim=0)
            noise = torch.randn(new_size - old_size, weight.shape[1], generator=generator) * std * noise_std
            weight[old_size:] = (mean + noise).to(weight.dtype)
    return old_size
