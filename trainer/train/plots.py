"""The loss curve written at the end of every run (`loss.png`; with a reward panel for RL stages)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a kill; the rest is still useful
    return records


def plot_loss(metrics_path: Path, out_path: Path, title: str = "") -> Path | None:
    """Training loss per logging step and eval loss per evaluation, on one chart; for the stages
    that learn from rewards (ppo, raft, grpo), a second panel with the reward curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    rewards = [(r["step"], r["reward"]) for r in records if "reward" in r]
    kept = [(r["step"], r["kept_reward"]) for r in records if "kept_reward" in r]  # raft
    eval_rewards = [(r["step"], r["eval_reward"]) for r in records if "eval_reward" in r]
    if not train and not evals:
        return None
    panels = 2 if rewards or eval_rewards else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), dpi=110, squeeze=False)
    _panel(axes[0][0], title or "kubetune training", "loss", [
        (train, "-", "train loss", "tab:blue"), (evals, "o-", "eval loss", "tab:orange")])
    if panels == 2:
        _panel(axes[0][1], "reward", "reward", [
            (rewards, "-", "reward (samples)", "tab:green"), (kept, "--", "reward (kept samples)", "tab:purple"),
            (eval_rewards, "o-", "eval reward (greedy, held out)", "tab:red")])
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def _panel(ax, title: str, ylabel: str, series: list[tuple[list, str, str, str]]) -> None:
    for points, style, label, color in series:
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label, color=color)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
