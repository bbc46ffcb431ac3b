"""The residual multitask MLP of arXiv:2606.13868 (docs/method.md, section "Model"), in one file.

x (B, n_in) standardized flux
  -> stem      h0 = GELU(LN(x W0 + b0))                      (B, stem_width)
  -> blocks    u = LN(h) W1 + b1; v = LN(GELU(u)); t = Dropout(v W2 + b2)
               r = h if d_in == d_out else LN(h) Wr + br;  h' = t + r
  -> shared    s = LN(h_B)                                   (B, block_widths[-1])
  -> heads     one small GELU MLP per label ending in a scalar
  -> (B, L)    predictions in scaled target units (RobustScaler space)

Ablations are flags on the one config: ``skip=False`` drops the shortcut r,
``layernorm=False`` replaces every LN by the identity, ``multitask=False`` builds one
complete network (stem, blocks, shared LN, head) per label.

The one forward pass takes an optional ``dropout(module, x)``: called at every Dropout
layer in place of the layer itself. Monte-Carlo dropout (stellarparams.uncertainty) passes
T fixed masks there, so rows fan out into T copies at the first dropout and everything
before it runs once. :meth:`StellarNet.features` is what runs before any dropout (the
shared stem), :meth:`StellarNet.tail` the rest: ``forward(x) == tail(features(x))``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of a torch module (the package's one counter).

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    int
        Sum of ``numel`` over the parameters that require a gradient.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _norm(width, on):
    return nn.LayerNorm(width) if on else nn.Identity()


def _drop(layer: nn.Dropout, x, dropout):
    return layer(x) if dropout is None else dropout(layer, x)


class ResidualBlock(nn.Module):
    """(B, d_in) -> (B, d_out), the residual block of docs/method.md, section "Model"."""

    def __init__(self, d_in, d_out, dropout, skip=True, layernorm=True, activation="gelu"):
        super().__init__()
        self.ln_in = _norm(d_in, layernorm)
        self.fc1 = nn.Linear(d_in, d_out)
        self.act = ACTIVATIONS[activation]()
        self.ln_mid = _norm(d_out, layernorm)
        self.fc2 = nn.Linear(d_out, d_out)
        self.drop = nn.Dropout(dropout)
        self.skip = skip
        self.project = None
        if skip and d_in != d_out:  # projection shortcut with its own LN
            self.project = nn.Sequential(_norm(d_in, layernorm), nn.Linear(d_in, d_out))

    def forward(self, h, dropout=None):
        t = _drop(self.drop, self.fc2(self.ln_mid(self.act(self.fc1(self.ln_in(h))))), dropout)
        if not self.skip:
            return t
        return t + (h if self.project is None else self.project(h))


class Head(nn.Module):
    """(B, d_in) -> (B,): hidden GELU layers then a linear scalar output."""

    def __init__(self, d_in, hidden, dropout, activation="gelu"):
        super().__init__()
        layers = []
        for w in hidden:
            layers += [nn.Linear(d_in, w), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            d_in = w
        layers.append(nn.Linear(d_in, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, s, dropout=None):
        for layer in self.mlp:
            s = _drop(layer, s, dropout) if isinstance(layer, nn.Dropout) else layer(s)
        return s.squeeze(-1)


class Trunk(nn.Module):
    """Stem + residual blocks + shared LN: (B, n_in) -> (B, block_widths[-1])."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(c.n_in, c.stem_width), _norm(c.stem_width, c.layernorm),
                                  ACTIVATIONS[c.activation](), nn.Dropout(c.stem_dropout))
        widths = (c.stem_width,) + c.block_widths
        self.blocks = nn.ModuleList(
            ResidualBlock(widths[i], widths[i + 1], c.trunk_dropout, c.skip, c.layernorm, c.activation)
            for i in range(len(c.block_widths)))
        self.ln_out = _norm(widths[-1], c.layernorm)
        self.width = widths[-1]

    def stem_out(self, x, dropout=None):
        return _drop(self.stem[-1], self.stem[:-1](x), dropout)

    def body(self, h, dropout=None):
        """Blocks and the shared LN, from the stem's output on."""
        for block in self.blocks:
            h = block(h, dropout)
        return self.ln_out(h)

    def forward(self, x, dropout=None):
        return self.body(self.stem_out(x, dropout), dropout)


class StellarNet(nn.Module):
    """The residual multitask network. forward: x (B, n_in) float32 -> (B, L) scaled targets.

    With ``dropout`` given (see the module docstring) and rows fanned out into T copies,
    the output is (T, B, L).
    """

    def __init__(self, config: ModelConfig = None):
        super().__init__()
        c = self.config = config or ModelConfig()
        self.labels = c.labels
        n_trunks = 1 if c.multitask else len(self.labels)
        self.trunks = nn.ModuleList(Trunk(c) for _ in range(n_trunks))
        self.heads = nn.ModuleDict(
            {k: Head(self.trunks[0].width, hidden, c.head_dropout, c.activation) for k, hidden in c.heads.items()})

    @property
    def shared_stem(self) -> bool:
        """True when one stem without dropout feeds every head: then :meth:`features` is that stem."""
        return len(self.trunks) == 1 and self.config.stem_dropout == 0

    def features(self, x):
        """What runs before any dropout: the shared stem's output, else ``x`` itself."""
        return self.trunks[0].stem_out(x) if self.shared_stem else x

    def tail(self, h, dropout=None):
        """Everything after :meth:`features`: ``h`` -> (B, L), or (T, B, L) once fanned out."""
        if len(self.trunks) == 1:
            s = self.trunks[0].body(h, dropout) if self.shared_stem else self.trunks[0](h, dropout)
            outs = [head(s, dropout) for head in self.heads.values()]
        else:
            outs = [head(trunk(h, dropout), dropout) for trunk, head in zip(self.trunks, self.heads.values())]
        return torch.stack(torch.broadcast_tensors(*outs), dim=-1)

    def forward(self, x, dropout=None):
        return self.tail(self.features(x), dropout)


class Ensemble(nn.Module):
    """K networks of one architecture trained with different seeds; the prediction is their mean.

    :meth:`features` runs each member's :meth:`StellarNet.features`; :meth:`tail` averages the
    members' outputs, or, with a ``dropout`` of T passes (MC dropout), returns the K x T draws
    of all members as (K*T, B, L), so a spread over them holds both each member's dropout
    spread and the spread between members.
    """

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.config = self.members[0].config
        self.labels = self.members[0].labels

    def to_dict(self) -> dict:
        """What :meth:`from_dict` rebuilds the (untrained) ensemble from (saved in model.json)."""
        return {"members": len(self.members), "model_config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Ensemble":
        return cls([StellarNet(ModelConfig.from_dict(d["model_config"])) for _ in range(int(d["members"]))])

    def features(self, x):
        return [m.features(x) for m in self.members]

    def tail(self, h, dropout=None):
        outs = [m.tail(hm, dropout) for m, hm in zip(self.members, h)]
        return torch.stack(outs).mean(0) if dropout is None else torch.cat(outs, 0)

    def forward(self, x, dropout=None):
        return self.tail(self.features(x), dropout)
