"""The off-by-one vocab (24001 rows, 24000-token tokenizer): reconciled, loaded, and trained on.

The failure this ends: a checkpoint with 24001 embedding rows loaded with ``strict=False`` into a
24000-token setup let the optimizer moments fall out of line and training silently stopped
learning. Here shardfix trims rows and moments in lockstep; the model and optimizer load into
the 24000-row model, and one step on real tokens changes the kept rows exactly as the same step
on the padded model does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import shardfix
from shardfix.api import convert
from shardfix.options import ConvertOptions

TRUE_VOCAB = 24000
DIM = 16


class Lm(nn.Module):
    """Embedding + head; the loss runs over the true vocab only (padded rows get no gradient)."""

    def __init__(self, rows: int, vocab: int = TRUE_VOCAB) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(rows, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, rows, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(tokens))
        return h @ self.head.weight[: self.vocab].t()


def batch(seed: int, high: int = TRUE_VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, high, (4, 9), generator=g)
    return t[:, :-1], t[:, 1:]


def step(model: Lm, opt: torch.optim.Optimizer, seed: int, high: int = TRUE_VOCAB) -> None:
    x, y = batch(seed, high)
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()


def make_tokenizer(path: Path, size: int) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0"))
    tok.save(str(path))
    return path


@pytest.fixture()
def padded_run(tmp_path: Path) -> tuple[Lm, torch.optim.Optimizer, Path]:
    torch.manual_seed(0)
    model = Lm(TRUE_VOCAB + 1)
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(3):
        step(model, opt, s)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"step": 3, "model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt)
    return model, opt, ckpt


def test_off_by_one_vocab_trains_identically(padded_run, tmp_path: Path) -> None:
    padded, padded_opt, ckpt = padded_run
    tok = make_tokenizer(tmp_path / "tokenizer.json", TRUE_VOCAB)
    out = tmp_path / "out"
    report = convert(ckpt, out, ConvertOptions(tokenizer=str(tok), executor="inline", progress=False))
    assert report["status"] == "complete"
    assert not [w for w in report["warnings"] if "discards row" in w]  # row 24000 was never trained

    model = Lm(TRUE_VOCAB)
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    result = shardfix.load_optimizer_state(opt, model, out)
    assert sorted(result.loaded) == ["embed.weight", "head.weight", "norm.bias", "norm.weight"]
    assert not result.missing and not result.unexpected

    step(padded, padded_opt, 99)
    step(model, opt, 99)
    for name, p in model.named_parameters():
        want = dict(padded.named_parameters())[name].detach()
        if name in ("embed.weight", "head.weight"):
            want = want[:TRUE_VOCAB]
        assert torch.equal(p.detach(), want), name
    sq = opt.state[model.embed.weight]["exp_avg_sq"]
    assert torch.equal(sq, padded_opt.state[padded.embed.weight]["exp_avg_sq"][:TRUE_VOCAB])


def test_trimming_a_trained_row_warns_with_the_row(tmp_path: Path) -> None:
    """If token 24000 *was* trained, trimming to 24000 still follows the target but says so."""
    torch.manual_seed(0)
    model = Lm(TRUE_VOCAB + 1, vocab=TRUE_VOCAB + 1)
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    x = torch.tensor([[TRUE_VOCAB, 5, 7]])
    nn.functional.cross_entropy(model(x).flatten(0, 1), torch.tensor([1, 2, 3])).backward()
    opt.step()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt)
    report = convert(ckpt, tmp_path / "out", ConvertOptions(vocab_size=TRUE_VOCAB, executor="inline", progress=False))
    warnings = [w for w in report["warnings"] if "discards row" in w]
    assert warnings and "24000" in warnings[0] and "embed.weight" in warnings[0]
    assert load_file(tmp_path / "out" / "model.safetensors")["embed.weight"].shape == (TRUE_VOCAB, DIM)
