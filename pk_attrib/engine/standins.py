"""Vmappable stand-ins: the same function as a model, in operations ``torch.func.vmap`` batches.

`FunctionalModel` evaluates a private copy of the model. When vmap cannot batch that copy,
`vmappable_copy` makes a second copy in which

- every ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` (whose fused kernels have no batching rule) is
  replaced by a `RecurrentStandIn`: the gate equations of PyTorch's documentation, unrolled
  over time with ordinary operations, from the same parameters under the same names (so the
  flat parameter vector does not change);
- every HuggingFace ``transformers`` configuration with ``"eager"`` or ``"sdpa"`` attention
  takes a registered implementation ``"pk_attrib_vmappable"``: the model's own eager attention
  with the attention mask always materialized (transformers skips an all-ones padding mask
  after ``if padding_mask.all()``, data-dependent control flow that vmap refuses).

Whether the copy computes the same per-example gradients as the original is checked by
`FunctionalModel` on the first real inputs (`FunctionalModel` keeps the original otherwise).
"""

from __future__ import annotations

import copy
import sys

import torch
from torch.nn import functional as F  # noqa: N812 - the usual name
from torch.nn.utils.rnn import PackedSequence

from ..exceptions import UnsupportedError

HF_ATTENTION = "pk_attrib_vmappable"


class RecurrentStandIn(torch.nn.Module):
    """``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` computed step by step with batchable operations.

    Holds the original's parameters under their names (``weight_ih_l0``, ...) and computes
    what it computes (outputs and final states, ``batch_first``, bidirectional, several
    layers, unbatched input, dropout between layers in training mode). LSTMs with
    ``proj_size`` and packed sequences are not handled (`standin_for` returns None; a
    packed sequence raises, so that `FunctionalModel` keeps the original).

    Args:
        original: The recurrent module.
    """

    def __init__(self, original: torch.nn.RNNBase):
        super().__init__()
        self.mode = original.mode  # "GRU", "LSTM", "RNN_TANH" or "RNN_RELU"
        self.hidden_size = original.hidden_size
        self.num_layers = original.num_layers
        self.bias = original.bias
        self.batch_first = original.batch_first
        self.directions = 2 if original.bidirectional else 1
        self.dropout = float(original.dropout)
        self.training = original.training
        for name, param in original._parameters.items():
            self.register_parameter(name, param)

    def forward(self, input: torch.Tensor, hx=None):  # noqa: A002 - nn.RNNBase's name
        """Like the original module: ``(output, h_n)``, or ``(output, (h_n, c_n))`` for LSTM.

        Args:
            input: (B, T, H_in) with ``batch_first``, else (T, B, H_in); or (T, H_in).
            hx: Initial state (D·L, B, H) (a pair for LSTM), or None for zeros.
        """
        if isinstance(input, PackedSequence):
            raise UnsupportedError("the recurrent stand-in does not take packed sequences")
        lstm = self.mode == "LSTM"
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(0 if self.batch_first else 1)
        if self.batch_first:
            x = x.transpose(0, 1)  # (T, B, H_in)
        steps, rows = x.shape[0], x.shape[1]
        if hx is None:
            zeros = x.new_zeros(self.num_layers * self.directions, rows, self.hidden_size)
            h0, c0 = zeros, zeros
        else:
            h0, c0 = hx if lstm else (hx, None)
            if not batched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
        last_h, last_c = [], []
        layer_in = x
        for layer in range(self.num_layers):
            if layer and self.dropout and self.training:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
            outs = []
            for direction in range(self.directions):
                k = layer * self.directions + direction
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih, w_hh = (
                    getattr(self, "weight_ih" + suffix),
                    getattr(self, "weight_hh" + suffix),
                )
                b_ih = getattr(self, "bias_ih" + suffix) if self.bias else None
                b_hh = getattr(self, "bias_hh" + suffix) if self.bias else None
                gi = F.linear(layer_in, w_ih, b_ih)  # (T, B, gates·H): all time steps at once
                h, c = h0[k], (c0[k] if lstm else None)
                seq: list[torch.Tensor] = [h] * steps
                for t in reversed(range(steps)) if direction else range(steps):
                    h, c = self._cell(gi[t], F.linear(h, w_hh, b_hh), h, c)
                    seq[t] = h
                outs.append(torch.stack(seq))
                last_h.append(h)
                last_c.append(c)
            layer_in = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        output = layer_in.transpose(0, 1) if self.batch_first else layer_in
        h_n = torch.stack(last_h)
        c_n = torch.stack(last_c) if lstm else None
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if lstm else None
        return output, ((h_n, c_n) if lstm else h_n)

    def _cell(self, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c):
        """One time step from the input and hidden projections (torch.nn's gate order)."""
        if self.mode == "GRU":
            i_r, i_z, i_n = gi.chunk(3, -1)
            h_r, h_z, h_n = gh.chunk(3, -1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            return (1 - z) * n + z * h, None
        if self.mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        pre = gi + gh
        return (torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)), None

    def extra_repr(self) -> str:
        """What the module's repr shows."""
        return f"{self.mode}, hidden_size={self.hidden_size}, num_layers={self.num_layers}"


def standin_for(module: torch.nn.Module) -> RecurrentStandIn | None:
    """A `RecurrentStandIn` for a torch.nn recurrent module, or None where none fits."""
    if not isinstance(module, (torch.nn.GRU, torch.nn.LSTM, torch.nn.RNN)):
        return None
    if getattr(module, "proj_size", 0):
        return None
    if type(module).forward not in (
        torch.nn.GRU.forward,
        torch.nn.LSTM.forward,
        torch.nn.RNN.forward,
    ):
        return None  # a subclass with a forward of its own: not what the stand-in computes
    return RecurrentStandIn(module)


def vmappable_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, list[str]] | None:
    """A copy of the model with vmappable stand-ins, and what was changed; None if nothing.

    Args:
        model: The engine's private copy (its parameters are shared with the result's).

    Returns:
        ``(copy, changes)``, changes such as ``["GRU stand-in", "eager attention"]``; or
        None when the model has nothing these stand-ins replace.
    """
    changes: list[str] = []
    result = _swap_recurrent(model, changes)
    if _uses_hf_attention(result):
        if result is model:
            result = _shell(model)
        _set_hf_attention(result)
        changes.append("eager attention")
    if not changes:
        return None
    return result, sorted(set(changes), key=changes.index)


def _shell(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of a module tree that shares parameters and buffers but not configurations."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def _swap_recurrent(model: torch.nn.Module, changes: list[str]) -> torch.nn.Module:
    found = [
        (name, standin_for(m))
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.GRU, torch.nn.LSTM, torch.nn.RNN))
    ]
    found = [(name, s) for name, s in found if s is not None]
    if not found:
        return model
    if found[0][0] == "":  # the model is itself a recurrent module
        changes.append(f"{found[0][1].mode.split('_')[0]} stand-in")
        return found[0][1]
    shell = _shell(model)
    for name, standin in found:
        parent_name, _, child = name.rpartition(".")
        parent = shell.get_submodule(parent_name) if parent_name else shell
        setattr(parent, child, standin)
        changes.append(f"{standin.mode.split('_')[0]} stand-in")
    return shell


def _configs(model: torch.nn.Module) -> list:
    seen, found = set(), []
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation"):
            seen.add(id(cfg))
            found.append(cfg)
    return found


def _uses_hf_attention(model: torch.nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False
    return any(
        getattr(cfg, "_attn_implementation", None) in ("eager", "sdpa") for cfg in _configs(model)
    )


def _set_hf_attention(model: torch.nn.Module) -> None:
    """Point the copy's configurations at the registered vmappable attention."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(HF_ATTENTION, _hf_attention)
    AttentionMaskInterface.register(HF_ATTENTION, _hf_mask)
    for cfg in _configs(model):
        if cfg._attn_implementation in ("eager", "sdpa"):
            cfg._attn_implementation = HF_ATTENTION


def _hf_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention (else transformers' SDPA attention), mask as given."""
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if own is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as own
    return own(module, query, key, value, attention_mask, **kwargs)


def _hf_mask(*args, **kwargs):
    """The transformers eager (additive) mask, never skipped after a data-dependent check."""
    from transformers.masking_utils import eager_mask

    kwargs["allow_is_bidirectional_skip"] = False
    return eager_mask(*args, **kwargs)
