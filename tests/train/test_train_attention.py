"""The training forward two ways: FlexAttention with a block mask built from the layout (the GPU
path) against SDPA with a dense boolean mask (its slow twin), and the chunked loss against plain
cross-entropy over full logits. Same loss, same gradients."""

import random
from array import array

import pytest
import torch
import torch.nn.functional as F

from parathinker.model import load_model
from parathinker.spec.tokens import ControlTokens
from parathinker.train.data import TokenSample
from parathinker.train.loss import TrainForward, attention_meta, token_loss_sum
from parathinker.train.pack import IGNORE, PackOptions, build_row, collate


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Two rows: one packs two samples (one with relabelled paths), one is padded."""
    ctrl = ControlTokens.from_tokenizer(tokenizer)
    g = random.Random(0)

    def sample(num_paths):
        ids = lambda n: array("i", [g.randrange(30, 250) for _ in range(n)])  # noqa: E731
        return TokenSample(ids(5), tuple(ids(g.randint(2, 9)) for _ in range(num_paths)),
                           array("i", [ctrl.summary_open, *ids(4), ctrl.summary_close]))

    opts = PackOptions(extend_prob=1.0)
    rows = [build_row([sample(3), sample(2)], ctrl, opts, random.Random(1)),
            build_row([sample(4)], ctrl, opts, random.Random(2))]
    return collate(rows, pad_id=0, multiple=16)


def loss_and_grads(model, batch, attention, chunk_tokens=4096):
    model.zero_grad()
    loss, count = TrainForward(model, attention, chunk_tokens)(**batch)
    (loss / count).backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_flex_equals_sdpa_loss_and_gradients(ckpt_dir, batch, monkeypatch):
    model = load_model(ckpt_dir).train()
    sdpa_loss, sdpa_grads = loss_and_grads(model, batch, "sdpa")
    # flex_attention refuses a backward pass on CPU as a guard only; its eager (unfused) math
    # implementation is device-agnostic, so the test lifts the guard to compare gradients.
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    flex_loss, flex_grads = loss_and_grads(model, batch, "flex")
    assert abs(flex_loss - sdpa_loss) <= 1e-4 * abs(sdpa_loss)
    assert max_diff(flex_grads, sdpa_grads) <= 1e-5
    assert any(g.abs().sum() > 0 for n, g in sdpa_grads.items() if "seg_embeddings" in n)


def test_flex_forward_runs_on_cpu_without_grad(ckpt_dir, batch):
    model = load_model(ckpt_dir)
    with torch.no_grad():
        outs = [model(batch["input_ids"], batch["positions"], batch["segment_ids"],
                      attention_meta(batch["regions"], batch["doc_ids"], kind))
                for kind in ("sdpa", "flex")]
    real = batch["doc_ids"] >= 0
    assert (outs[0][real] - outs[1][real]).abs().max() <= 1e-5


def test_chunked_loss_equals_full_logits_cross_entropy(ckpt_dir, batch):
    model = load_model(ckpt_dir).train()
    chunked_loss, chunked = loss_and_grads(model, batch, "sdpa", chunk_tokens=7)  # checkpointed chunks
    model.zero_grad()
    hidden = model(batch["input_ids"], batch["positions"], batch["segment_ids"],
                   attention_meta(batch["regions"], batch["doc_ids"], "sdpa"))
    logits = model.compute_logits(hidden)  # [B, L, V], the naive way
    loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE,
                           reduction="sum")
    count = batch["targets"].ne(IGNORE).sum()
    (loss / count).backward()
    assert abs(loss.item() - chunked_loss) <= 1e-4 * loss.item()
    assert max_diff(chunked, {n: p.grad for n, p in model.named_parameters()}) <= 1e-6
    empty = torch.full_like(batch["targets"], IGNORE)
    zero, n = token_loss_sum(model, hidden, empty)
    assert zero.item() == 0 and n.item() == 0 and zero.requires_grad
