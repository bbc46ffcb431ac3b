"""The residual multitask MLP of arXiv:2606.13868 (METHOD.md "Model"), in one file.

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
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _default_heads():
    return {"teff": (48, 32), "feh": (16,), "logg": (48,)}


@dataclass
class ModelConfig:
    """Every architectural knob; the defaults are the paper's selected model (542,771 params)."""

    n_in: int = 4000                  # grid pixels
    stem_width: int = 128
    block_widths: tuple = (64,)       # output width of each residual block
    heads: dict = field(default_factory=_default_heads)  # label -> hidden widths, in output order
    stem_dropout: float = 0.0
    trunk_dropout: float = 0.4        # dropout inside each residual block
    head_dropout: float = 0.0
    skip: bool = True                 # residual shortcuts
    layernorm: bool = True
    multitask: bool = True            # False: one full network per label
    activation: str = "gelu"

    def __post_init__(self):
        self.block_widths = tuple(int(w) for w in self.block_widths)
        self.heads = {str(k): tuple(int(w) for w in v) for k, v in dict(self.heads).items()}
        if not self.heads:
            raise ValueError("ModelConfig.heads is empty: give at least one label, e.g. {'teff': (48, 32)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} unknown; choose one of {sorted(ACTIVATIONS)}")

    @property
    def labels(self) -> list:
        return list(self.heads)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_widths"] = list(self.block_widths)
        d["heads"] = {k: list(v) for k, v in self.heads.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return config_from_dict(cls, d, "model")


def config_from_dict(cls, d: dict, what: str):
    """A config dataclass from a dict (TOML table, model.json); unknown keys are an error naming them."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what} config keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def _norm(width, on):
    return nn.LayerNorm(width) if on else nn.Identity()


class ResidualBlock(nn.Module):
    """(B, d_in) -> (B, d_out), METHOD.md's residual block."""

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

    def forward(self, h):
        u = self.fc1(self.ln_in(h))
        v = self.ln_mid(self.act(u))
        t = self.drop(self.fc2(v))
        if not self.skip:
            return t
        r = h if self.project is None else self.project(h)
        return t + r


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

    def forward(self, s):
        return self.mlp(s).squeeze(-1)


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

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.ln_out(h)


class StellarNet(nn.Module):
    """The residual multitask network. forward: x (B, n_in) float32 -> (B, L) scaled targets."""

    def __init__(self, config: ModelConfig = None):
        super().__init__()
        c = self.config = config or ModelConfig()
        self.labels = c.labels
        n_trunks = 1 if c.multitask else len(self.labels)
        self.trunks = nn.ModuleList(Trunk(c) for _ in range(n_trunks))
        self.heads = nn.ModuleDict(
            {k: Head(self.trunks[0].width, hidden, c.head_dropout, c.activation) for k, hidden in c.heads.items()})

    def forward(self, x):
        if len(self.trunks) == 1:
            s = self.trunks[0](x)
            return torch.stack([head(s) for head in self.heads.values()], dim=1)
        return torch.stack([head(trunk(x)) for trunk, head in zip(self.trunks, self.heads.values())], dim=1)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
