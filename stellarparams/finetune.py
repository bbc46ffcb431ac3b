"""Start a network from another model's weights (``train --init-from``), optionally freezing parts.

The parts of :class:`stellarparams.model.StellarNet`, by the names of its modules, which
``--freeze`` takes (comma-separated):

- ``stem``: ``trunks.*.stem``, the input Linear (n_in -> stem_width) and its LayerNorm;
- ``blocks``: ``trunks.*.blocks``, the residual blocks;
- ``ln_out``: ``trunks.*.ln_out``, the shared LayerNorm after the blocks;
- ``trunk``: stem + blocks + ln_out;
- ``heads``: every label's head; ``heads.LABEL`` (e.g. ``heads.teff``) one of them.

Every tensor is copied from the source network except, when the wavelength grid differs
(another number of pixels, or the same number over other wavelengths), the stem's input
Linear ``trunks.*.stem.0``: the only layer whose shape or meaning depends on the grid. It
keeps its fresh (seeded) initialisation; its LayerNorm and everything after are copied.
Frozen parameters get ``requires_grad = False``: no gradient, so AdamW leaves them (and
their weight decay) alone and they stay bitwise equal to the source.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

PARTS = ("stem", "blocks", "ln_out", "trunk", "heads")
GRID_LAYER = "stem.0."   # inside trunks.<i>.: the input Linear


@dataclass
class Init:
    """What :func:`stellarparams.training.fit` starts from instead of a fresh network.

    state: the source network's state dict; center, scale: its target scaler (kept, so the
    copied heads keep their meaning); reinit_stem: re-initialise the grid-dependent layer;
    freeze: part names (:data:`PARTS`, ``heads.LABEL``).
    """

    state: dict
    center: np.ndarray
    scale: np.ndarray
    reinit_stem: bool = False
    freeze: tuple = field(default_factory=tuple)


def parse_freeze(spec, labels) -> tuple:
    """``"stem,blocks"`` (or a sequence of names) -> a tuple of checked part names.

    Parameters
    ----------
    spec : str or sequence of str or None
        Part names, see the module docstring.
    labels : list of str
        The network's labels (for ``heads.LABEL``).

    Returns
    -------
    tuple of str

    Raises
    ------
    ValueError
        An unknown name, naming the known ones.
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec or ()) if s.strip()]
    known = list(PARTS) + [f"heads.{l}" for l in labels]
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"--freeze {','.join(bad)}: unknown part; choose from {', '.join(known)}")
    return tuple(names)


def in_part(key: str, part: str) -> bool:
    """Whether the parameter ``key`` (a StellarNet state-dict name) belongs to ``part``."""
    if part.startswith("heads"):
        return key.startswith(part + ".")
    if not key.startswith("trunks."):
        return False
    module = key.split(".")[2]
    return module in ("stem", "blocks", "ln_out") if part == "trunk" else module == part


def apply_init(net: torch.nn.Module, init: Init) -> list:
    """Copy ``init.state`` into ``net`` (all but the grid layer when ``init.reinit_stem``) and freeze.

    Parameters
    ----------
    net : StellarNet
        A freshly built network of the source's architecture (``n_in`` may differ).
    init : Init

    Returns
    -------
    list of str
        The names of the frozen parameters.

    Raises
    ------
    ValueError
        The source's tensors do not fit ``net`` (another architecture or label set).
    """
    own = net.state_dict()
    skip = {k for k in own if init.reinit_stem and k.startswith("trunks.") and k.split(".", 2)[2].startswith(GRID_LAYER)}
    missing = sorted(set(own) - set(init.state) - skip)
    wrong = sorted(k for k in set(own) & set(init.state) - skip if own[k].shape != init.state[k].shape)
    extra = sorted(set(init.state) - set(own))
    if missing or wrong or extra:
        raise ValueError("the source model's network does not fit this one (another architecture or labels): "
                         + "; ".join(f"{what} {names[:3]}" for what, names in
                                     (("missing", missing), ("other shape", wrong), ("unexpected", extra)) if names))
    with torch.no_grad():
        for k, v in own.items():
            if k not in skip:
                v.copy_(init.state[k])
    frozen = []
    for name, p in net.named_parameters():
        if any(in_part(name, part) for part in init.freeze):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
