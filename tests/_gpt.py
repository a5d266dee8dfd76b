"""Small models shaped like real ones, built in code: a GPT-2 and a GRU classifier.

`TinyGPT2` has GPT-2's layout without downloading anything: token and position embeddings,
blocks whose projections are HF-style ``Conv1D`` layers (weight stored (in, out)), a
bias-free head tied to the token embedding (the model's only ``nn.Linear``), and a
``use_cache`` output whose members are not batch-first (each layer's keys and values stacked
as (2, B, heads, T, head_dim), as GPT-2's ``presents`` were).
"""

import torch


class Conv1D(torch.nn.Module):
    """HF transformers' Conv1D: a Linear layer whose weight is stored (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Block(torch.nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = torch.nn.LayerNorm(width)
        self.c_attn = Conv1D(3 * width, width)
        self.c_proj = Conv1D(width, width)
        self.ln_2 = torch.nn.LayerNorm(width)
        self.c_fc = Conv1D(2 * width, width)
        self.c_out = Conv1D(width, 2 * width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (c // self.heads) ** 0.5
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        h = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.c_proj(h)
        x = x + self.c_out(torch.nn.functional.gelu(self.c_fc(self.ln_2(x))))
        return x, torch.stack((k, v))  # present: (2, B, heads, T, head_dim)


class TinyGPT2(torch.nn.Module):
    """GPT-2's layout, tiny: returns ``(logits (B, T, vocab), presents)`` with use_cache."""

    def __init__(self, vocab=50, width=16, heads=2, layers=2, positions=16, use_cache=True):
        super().__init__()
        self.use_cache = use_cache
        self.wte = torch.nn.Embedding(vocab, width)
        torch.nn.init.normal_(self.wte.weight, std=0.1)  # (GPT-2 initializes it with 0.02)
        self.wpe = torch.nn.Embedding(positions, width)
        self.h = torch.nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(width)
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, ids):
        t = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(t, device=ids.device))
        presents = []
        for block in self.h:
            x, present = block(x)
            presents.append(present)
        logits = self.lm_head(self.ln_f(x))
        return (logits, tuple(presents)) if self.use_cache else logits


def lm_loss(reduction="mean"):
    """Next-token cross-entropy of ``(logits, presents)`` against (B, T) token labels."""

    def loss(outputs, labels):
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            reduction="none",
        ).reshape(labels.shape[0], -1)
        per_example = per_token.mean(1)
        return per_example.mean() if reduction == "mean" else per_example.sum()

    loss.reduction = reduction
    return loss


class GRUClassifier(torch.nn.Module):
    """A GRU that returns ``(logits, h_n)``: h_n is (layers, B, hidden), not batch-first."""

    def __init__(self, width=4, classes=3):
        super().__init__()
        self.gru = torch.nn.GRU(width, width, batch_first=True)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        out, h_n = self.gru(x)
        return self.head(out[:, -1]), h_n
