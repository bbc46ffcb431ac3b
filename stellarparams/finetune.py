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

Partial catalogs: a label of the source that the dataset does not have (no column, or fewer
than 2 known training rows) keeps its head exactly as it was (``heads.LABEL`` is added to the
frozen parts by `train` and recorded in model.json; on the same grid its training targets are
the source network's outputs, :func:`stellarparams.training.fit`), or is dropped with ``--labels``
(:func:`select_labels`: the network then has only the kept heads, and the target scaler the
source's center/scale of those labels). With a new wavelength grid the stem's input layer
is new, so freezing the stem (``stem`` or ``trunk``) is refused (:class:`OptionError`).
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
    label_ranges: dict = field(default_factory=dict)   # the source's, for labels this dataset lacks
    label_units: dict = field(default_factory=dict)    # ... and their units
    uncertainty: object = None                         # the source's calibration (carried for frozen heads)

    def frozen_heads(self, labels) -> list:
        """The labels (of ``labels``) whose head is frozen."""
        return [l for l in labels if "heads" in self.freeze or f"heads.{l}" in self.freeze]


class OptionError(ValueError):
    """Options that contradict each other or the data (the CLI's exit status 2)."""


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


def check_freeze(freeze, reinit_stem: bool):
    """Refuse freezing the stem when its input layer starts fresh (another wavelength grid).

    Raises
    ------
    OptionError
        ``stem`` or ``trunk`` in ``freeze`` while ``reinit_stem``.
    """
    bad = [p for p in freeze if p in ("stem", "trunk")]
    if reinit_stem and bad:
        raise OptionError(f"--freeze {','.join(bad)}: the dataset's wavelength grid differs from the source model's, so "
                          "the stem's input layer (trunks.*.stem.0) is new and randomly initialised; freezing it would "
                          "keep random weights. Leave the stem trainable, e.g. --freeze blocks,ln_out,heads freezes "
                          "everything after it")


def select_labels(state: dict, src_labels, kept, multitask: bool = True) -> dict:
    """The source's state dict restricted to the heads of ``kept`` (``--labels`` with ``--init-from``).

    Parameters
    ----------
    state : dict
        The source StellarNet's state dict.
    src_labels, kept : list of str
        The source's labels and the labels kept (a subset, in any order).
    multitask : bool
        False: one trunk per label (``trunks.<i>`` follows the label order), renumbered too.

    Returns
    -------
    dict
        State dict of a StellarNet with heads ``kept``.
    """
    src_labels = list(src_labels)
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "heads":
            if parts[1] in kept:
                out[k] = v
        elif parts[0] == "trunks" and not multitask:
            label = src_labels[int(parts[1])]
            if label in kept:
                out[".".join(["trunks", str(list(kept).index(label))] + parts[2:])] = v
        else:
            out[k] = v
    return out


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
