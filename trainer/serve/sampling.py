"""Picking the next token of every row of a decode batch, each row by its own settings.

Rows of one batch belong to different requests, so temperature, top-k, top-p, penalties and seeds
are applied per row (vectorised where the settings allow). Seeded rows draw from their own
`torch.Generator`, so a request with a `seed` samples the same tokens whatever else shares its
batch. Logprobs are taken from the model's raw distribution (before temperature, top-p and
penalties), which is what OpenAI's API reports and what a plain forward pass reproduces.
"""

from __future__ import annotations

from typing import Any

from kubetune.trainer.serve.params import Sequence, TokenLogprob


def make_generator(seq: Sequence, device: Any) -> Any:
    """A private random generator for a seeded, sampled sequence (None: greedy, or unseeded)."""
    import torch

    if seq.params.greedy or seq.params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seq.params.seed)
    return gen


def sample(logits: Any, rows: list[Sequence], generators: list[Any], counts: list[dict[int, int]]) -> list[int]:
    """The next token of every row. `counts[r]`: how often row r generated each token (penalties)."""
    import torch

    logits = logits.float()
    penalised = [r for r, seq in enumerate(rows) if (seq.params.frequency_penalty or seq.params.presence_penalty) and counts[r]]
    if penalised:
        logits = logits.clone()
        for r in penalised:
            p = rows[r].params
            ids = torch.tensor(list(counts[r]), device=logits.device)
            freq = torch.tensor(list(counts[r].values()), dtype=logits.dtype, device=logits.device)
            logits[r, ids] -= p.frequency_penalty * freq + p.presence_penalty
    out = logits.argmax(dim=-1).tolist()
    sampled = [r for r, seq in enumerate(rows) if not seq.params.greedy]
    if not sampled:
        return out
    index = torch.tensor(sampled, device=logits.device)
    temps = torch.tensor([rows[r].params.temperature for r in sampled], device=logits.device)
    scores = logits[index] / temps[:, None]
    for k, r in enumerate(sampled):
        top_k = rows[r].params.top_k
        if top_k:
            kth = torch.topk(scores[k], min(top_k, scores.shape[-1])).values[-1]
            scores[k] = scores[k].masked_fill(scores[k] < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    top_p = torch.tensor([rows[r].params.top_p for r in sampled], device=logits.device)
    if bool((top_p < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    shared = [k for k, r in enumerate(sampled) if generators[r] is None]
    if shared:
        picks = torch.multinomial(probs[shared], 1).squeeze(-1).tolist()
        for k, token in zip(shared, picks, strict=True):
            out[sampled[k]] = token
    for k, r in enumerate(sampled):
        if generators[r] is not None:  # seeded rows draw from their own generator: reproducible
            out[r] = int(torch.multinomial(probs[k], 1, generator=generators[r]))
    return out


def token_logprobs(logits: Any, tokens: list[int], top_n: list[int | None]) -> list[TokenLogprob | None]:
    """For each row r with `top_n[r]` set: the logprob of `tokens[r]` and of the `top_n[r]` most
    likely tokens. Only those rows pay for the log-softmax over the vocabulary."""
    import torch

    out: list[TokenLogprob | None] = [None] * len(tokens)
    wanted = [r for r, n in enumerate(top_n) if n is not None]
    if not wanted:
        return out
    index = torch.tensor(wanted, device=logits.device)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor([tokens[r] for r in wanted], device=logits.device)[:, None]).squeeze(-1).tolist()
    most = max(top_n[r] or 0 for r in wanted)
    top_values, top_ids = (logprobs.topk(most, dim=-1) if most else (None, None))
    for k, r in enumerate(wanted):
        n = top_n[r] or 0
        top: tuple[tuple[int, float], ...] = ()
        if n:
            top = tuple(zip(top_ids[k, :n].tolist(), top_values[k, :n].tolist(), strict=True))
        out[r] = TokenLogprob(token=tokens[r], logprob=chosen[k], top=top)
    return out
