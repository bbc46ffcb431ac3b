"""Every config dataclass of the network and its training, and TOML in and out (a leaf module).

``ModelConfig`` is the architecture (docs/method.md, section "Model"), ``TrainConfig`` the
optimisation (docs/method.md, section "Training"). A TOML file holds an optional ``[model]``
table (with ``[model.heads]``) and an optional ``[train]`` table; :func:`load_config` reads
it and :func:`config_toml` writes one (with ``tomli_w``).
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import tomli_w

ACTIVATION_NAMES = ("gelu", "relu", "silu", "tanh")


def _default_heads():
    return {"teff": (48, 32), "feh": (16,), "logg": (48,)}


def config_from_dict(cls, d: dict, what: str):
    """A config dataclass from a dict (TOML table, model.json); unknown keys are an error naming them."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what} config keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


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
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"activation {self.activation!r} unknown; choose one of {sorted(ACTIVATION_NAMES)}")

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


@dataclass
class TrainConfig:
    """Optimisation settings; defaults are the paper's (docs/method.md, section "Training")."""

    lr: float = 7e-4
    weight_decay: float = 0.01
    batch_size: int = 256
    epochs: int = 30
    warmup_frac: float = 0.05     # fraction of all steps with linear warm-up
    lr_floor: float = 0.01        # cosine decays to lr_floor * lr (ours: the paper gives no value)
    huber_delta: float = 1.0
    n_augment: int = 2            # noisy copies per training spectrum
    noise_min: float = 0.01       # noise std as a fraction of the spectrum's std
    noise_max: float = 0.05
    seed: int = 0
    threads: int | None = None    # torch threads (None: torch's default)
    eval_batch_size: int = 4096
    calib_folds: int = 3          # out-of-fold models for the sigma calibration (0: validation split only)
    recipe: str = "paper"         # the preset these values started from (RECIPES); a record, not a switch
    # Physical augmentation of the noisy copies (k >= 1), stellarparams.augment; 0 = off (the paper).
    aug_shift_pix: float = 0.0    # residual RV / wavelength shift, U(-a, a) grid pixels (67.6 km/s each)
    aug_calib_sigma: float = 0.0  # flux-calibration / response distortion, Legendre coefficients N(0, s)
    aug_calib_order: int = 5      # ... of degrees 1..order
    aug_ebv: float = 0.0          # extra reddening E(B-V) ~ U(-a/3, a) mag, G23 curve as in `simulate`
    aug_lsf_pix: float = 0.0      # LSF jitter: extra Gaussian sigma U(0, a) grid pixels
    aug_mask_runs: int = 0        # up to this many bridged pixel runs of 1-30 px (cosmic rays, bad columns)
    aug_telluric: float = 0.0     # residual O2/H2O band depth U(-a, a)
    aug_pixnoise: float = 0.0     # extra noise from each pixel's own sigma, scale U(0, a) (replaces the paper's)
    aug_mixup: float = 0.0        # fraction of noisy copies replaced by a blend with a label-neighbour star
    mixup_k: int = 4              # ... one of the k stars nearest in label space; blend weight U(0, 1)
    ensemble: int = 1             # members trained with seeds seed, seed+1, ...; predictions averaged (one folder)
    ema: float = 0.0              # decay of an exponential moving average of the weights, validated and kept
                                  # instead of the raw weights (0: off, the paper; ~0.998 = a ~500-step memory),
                                  # capped at 1 - 0.5 / steps per epoch (a memory of ~2 epochs) for small sets
    init_from: str | None = None  # model folder whose weights and target scaler training starts from (finetune.py)
    init_sha256: str = ""         # ... the sha256 of its weights (set by `train`; a mismatch is refused)
    freeze: tuple = ()            # parts kept fixed: stem, blocks, ln_out, trunk, heads, heads.LABEL
    # Domain adaptation (stellarparams.adapt; docs/method.md, "Domain adaptation"): off unless adapt_to is set.
    adapt_to: str | None = None   # the target survey's spectra: a prepared dataset, folder, file or catalog with
                                  # FILE (labels there are never read)
    adapt_hash: str = ""          # ... its input hash (set by `train`)
    adapt_match: int = 2          # rounds of input matching (estimate the target's instrument, retrain); 1-3
    adapt_bins: int = 16          # groups of predicted labels the two populations are compared in (1: the whole
                                  # population, no first pass; biased when the two hold different stars); 1-32
    adapt_group: str = "ridge"    # what predicts the labels the groups are made of: "ridge" (ridge regression on
                                  # each spectrum's ln flux less its own order-adapt_order Legendre fit: blind to
                                  # the smooth response, so the groups cannot absorb it; no extra training) or
                                  # "net" (a first-pass network, retrained each of adapt_match rounds)
    adapt_order: int = 10         # Legendre order of the estimated ln response over the grid; 0-20
    adapt_narrow: float = 0.0     # also match narrow features shared by every group above this many standard errors
                                  # (telluric, sky residuals); 0 = the smooth response only; 0-5
    adapt_coral: float = 0.0      # weight of Deep CORAL between source and target trunk features; 0-10
    adapt_consistency: float = 0.0  # weight of the mean-teacher consistency on target spectra; 0-10
    adapt_pseudo: float = 0.0     # confident pseudo-labels: the adapted model labels this fraction of the target's
                                  # spectra (smallest MC-dropout spread) and a network is trained again on the
                                  # matched source plus those; 0 = off; 0-1
    adapt_noise: float = 0.0      # noise added to each matched source spectrum, this times the per-pixel variance the
                                  # target has beyond the source's within like groups (varying telluric depth, sky
                                  # residuals); 0 = off; 0-2
    adapt_widen: bool = True      # widen the adapted model's sigmas by how much more it disagrees, on the target than
                                  # on the source, with a ridge blind to smooth differences (no target label needed)

    def __post_init__(self):
        f = self.freeze or ()
        self.freeze = tuple(x.strip() for x in (f.split(",") if isinstance(f, str) else f) if x.strip())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Keys missing from ``d`` take the values of its ``recipe`` (the paper's when none is named)."""
        base = RECIPES.get(d.get("recipe", "paper"))
        if base is None:
            raise ValueError(f"unknown recipe {d['recipe']!r}; choose one of {sorted(RECIPES)}")
        return config_from_dict(cls, {**base, **d}, "train")

    @property
    def augments(self) -> bool:
        """Whether any physical augmentation is on."""
        return any(getattr(self, f.name) for f in fields(self) if f.name.startswith("aug_") and f.name != "aug_calib_order")


# Physical limits of the labels (docs/design.md, "Failure modes"): a catalog value outside is an error of
# the catalog, not a star. prepare rejects such a row as "bad_label"; predict ignores such catalog rows with
# a warning. Change them here (stellarparams.config.LABEL_LIMITS[...] = (lo, hi)) for unusual stars.
LABEL_LIMITS = {"teff": (2000.0, 60000.0),   # K: coolest M dwarfs to hot O stars
                "logg": (-1.0, 6.0),         # dex (cgs): supergiants to white-dwarf-like compact stars
                "feh": (-5.0, 1.5)}          # dex: the most metal-poor known stars to the most metal-rich
DEFAULT_LABEL_LIMITS = dict(LABEL_LIMITS)


def label_outside_limits(name: str, values) -> "np.ndarray":
    """Mask of finite ``values`` of label ``name`` outside :data:`LABEL_LIMITS` (NaN is "missing", not bad).

    Parameters
    ----------
    name : str
        Label name (``teff``, ``logg``, ``feh``; others have no limits).
    values : array-like
        Label values in the label's unit.

    Returns
    -------
    numpy.ndarray of bool
    """
    import numpy as np

    v = np.asarray(values, np.float64)
    lo, hi = LABEL_LIMITS.get(name, (-np.inf, np.inf))
    return np.isfinite(v) & ((v < lo) | (v > hi))


# Named training recipes: TrainConfig values on top of the dataclass defaults (the paper's).
# "paper" is the paper's recipe bit for bit; "default" is what generalises to unseen stars and
# other spectrographs (docs/benchmarks.md, "Accuracy"; bench/accuracy.py and bench/robustness.py measure it).
RECIPES = {
    "paper": {"recipe": "paper"},
    "default": {"recipe": "default", "epochs": 12, "ema": 0.998, "aug_shift_pix": 1.0, "aug_calib_sigma": 0.05,
                "aug_calib_order": 8, "aug_ebv": 0.15, "aug_lsf_pix": 1.0, "aug_mask_runs": 3, "aug_telluric": 0.05},
}
DEFAULT_RECIPE = "default"
RECIPE_HELP = "training recipe: 'default' (generalises to unseen stars) or 'paper' (arXiv:2606.13868 exactly)"


def recipe(name: str = DEFAULT_RECIPE, **overrides) -> TrainConfig:
    """The TrainConfig of a named recipe, with ``overrides`` on top.

    Parameters
    ----------
    name : str
        A key of :data:`RECIPES`: "paper" (the paper's recipe, exactly) or "default".
    **overrides
        TrainConfig fields to change (e.g. ``seed=1``).

    Returns
    -------
    TrainConfig
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return TrainConfig.from_dict({**RECIPES[name], **overrides})


def load_config(path, recipe_name: str | None = None, default_recipe: str = "paper") -> tuple[ModelConfig, TrainConfig]:
    """Read a TOML file with optional ``[model]`` (and ``[model.heads]``) and ``[train]`` tables.

    Example::

        [model]
        stem_width = 96
        block_widths = [64, 32]
        [model.heads]
        teff = [48, 32]
        logg = [48]
        [train]
        epochs = 20

    Parameters
    ----------
    path : str or Path
        The TOML file.
    recipe_name : str, optional
        The recipe whose values ``[train]`` keys override, as given on the command line: it
        wins over a ``recipe = "..."`` in ``[train]`` (the command line wins, as for every
        option). None: the file's recipe, else ``default_recipe``. The TrainConfig's
        ``recipe`` (recorded in model.json) names the one used.
    default_recipe : str
        The recipe when neither names one.

    Returns
    -------
    (ModelConfig, TrainConfig)
        Missing tables and keys keep their defaults.

    Raises
    ------
    ValueError
        Unreadable file, unknown table or key (named in the message).
    """
    path = Path(path)
    try:
        d = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot read the config ({e})") from e
    unknown = set(d) - {"model", "train"}
    if unknown:
        raise ValueError(f"{path}: unknown tables {sorted(unknown)}; use [model] and [train]")
    try:
        train = d.get("train", {})
        name = recipe_name or train.get("recipe") or default_recipe
        return ModelConfig.from_dict(d.get("model", {})), TrainConfig.from_dict({**train, "recipe": name})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def config_toml(mc: ModelConfig, tc: TrainConfig, header: str = "") -> str:
    """TOML text with [model], [model.heads] and [train] tables, readable by :func:`load_config`.

    Parameters
    ----------
    mc, tc : ModelConfig, TrainConfig
        The configs to write. None values (e.g. ``threads``) are left out, so they keep their
        defaults; ``threads`` is a property of the machine, never written.
    header : str
        Comment lines put on top (each prefixed with ``# ``).

    Returns
    -------
    str
        The TOML document.
    """
    model = {k: v for k, v in mc.to_dict().items() if v is not None}
    train = {k: v for k, v in tc.to_dict().items() if v is not None and k != "threads"}
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + tomli_w.dumps({"model": model, "train": train})


def parse_fractions(text) -> tuple:
    """``"0.6,0.1,0.3"`` -> (train, val, test): three numbers >= 0 that sum to 1.

    Raises
    ------
    ValueError
        Anything else, in one line.
    """
    try:
        f = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        f = ()
    if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1) > 1e-6:
        raise ValueError(f"--fractions {text}: expected three numbers >= 0 that sum to 1, like 0.6,0.1,0.3")
    return f
