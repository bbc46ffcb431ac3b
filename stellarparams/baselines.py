"""The paper's baselines (docs/method.md, section "Reported results"), on the same prepared flux.

- :class:`OLS` and :class:`RidgeVal`: scikit-learn linear models with the estimator
  surface ``fit(X, Y) -> self``, ``predict(X) -> (N, L)``; Ridge picks its penalty on the
  validation split. Labels are in physical units; a NaN label is left out of that
  label's fit only.
- :class:`CNN` (StarNet-like, Fabbro et al. 2017) and :class:`DNN` (one fully connected
  net per label, Li et al. 2017): ``nn.Module`` s mapping (B, n_in) standardized flux to
  (B, L) scaled targets. They are trained by the same loop as the proposed model:
  ``stellarparams.train.train(dataset, net=CNN(n_in, L))``.

Parameter counts for 4000 inputs and 3 labels: CNN 4,130,103 (paper "4.13M"),
DNN 3 x 4,551,701 = 13,655,103 (paper "13.66M").
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.linalg import LinAlgWarning
from sklearn.linear_model import LinearRegression, Ridge
from torch import nn
from torch.nn import functional as F

# The one Ridge grid (benchmark and `run`'s PASS check): penalties tried on the validation split
# (flux is standardized per spectrum, so X^T X grows with the number of training rows; the
# grid spans that).
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 8))


def _check_xy(X, Y=None):
    X = np.asarray(X, np.float32)
    if X.ndim != 2:
        raise ValueError(f"flux must be 2-D (n_spectra, n_pixels), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("flux contains NaN or inf; prepare the dataset again (prepared flux is always finite)")
    if Y is None:
        return X
    Y = np.asarray(Y, np.float64)
    Y = Y.reshape(len(Y), -1)
    if len(Y) != len(X):
        raise ValueError(f"flux has {len(X)} rows but labels have {len(Y)}")
    return X, Y


class _Linear:
    """Shared fit/predict for OLS and Ridge: one scikit-learn estimator per label mask.

    When no label is missing, one estimator fits all labels at once (the usual case);
    otherwise each label gets its own estimator on the rows where it is known.
    """

    def _make(self, alpha):
        raise NotImplementedError

    def _fit_one(self, X, Y, alpha):
        with warnings.catch_warnings():
            # the smallest alphas of the grid make X'X + alpha I ill-conditioned; the solve is still
            # exact enough, and validation MAE (not the warning) decides which alpha is kept
            warnings.simplefilter("ignore", LinAlgWarning)
            return self._fit_parts(X, Y, alpha)

    def _fit_parts(self, X, Y, alpha):
        if np.isfinite(Y).all():
            return [(slice(None), self._make(alpha).fit(X, Y))]
        out = []
        for j in range(Y.shape[1]):
            ok = np.isfinite(Y[:, j])
            if ok.sum() < 2:
                raise ValueError(f"label {j} has fewer than 2 known values in the training rows")
            a = alpha[j] if np.ndim(alpha) else alpha
            out.append((j, self._make(a).fit(X[ok], Y[ok, j])))
        return out

    @staticmethod
    def _predict(parts, X, n_labels):
        out = np.empty((len(X), n_labels), np.float64)
        for cols, est in parts:
            p = est.predict(X)
            if isinstance(cols, slice):
                out[:] = p.reshape(len(X), -1)
            else:
                out[:, cols] = p
        return out

    def predict(self, X) -> np.ndarray:
        """(N, P) standardized flux -> (N, L) labels in physical units."""
        X = _check_xy(X)
        return self._predict(self.estimators_, X, self.n_labels_)

    @property
    def n_params(self) -> int:
        """Number of fitted coefficients (weights + intercepts)."""
        return int(sum(np.size(e.coef_) + np.size(e.intercept_) for _, e in self.estimators_))


class OLS(_Linear):
    """Ordinary least squares (scikit-learn LinearRegression) on the prepared flux."""

    name = "OLS"

    def _make(self, alpha):
        return LinearRegression()

    def fit(self, X, Y, X_val=None, Y_val=None):
        X, Y = _check_xy(X, Y)
        self.n_labels_ = Y.shape[1]
        self.estimators_ = self._fit_one(X, Y, None)
        return self


class RidgeVal(_Linear):
    """Ridge regression (scikit-learn) with alpha chosen per label on a validation split.

    ``alphas``: the grid tried. After ``fit``: ``alpha_`` (L,) the chosen penalties and
    ``val_mae_`` (n_alphas, L) the validation MAE of every candidate, physical units.
    """

    name = "Ridge"

    def __init__(self, alphas=RIDGE_ALPHAS):
        self.alphas = tuple(alphas)

    def _make(self, alpha):
        return Ridge(alpha=alpha)

    def fit(self, X, Y, X_val, Y_val):
        X, Y = _check_xy(X, Y)
        X_val, Y_val = _check_xy(X_val, Y_val)
        self.n_labels_ = L = Y.shape[1]
        self.val_mae_ = np.full((len(self.alphas), L), np.nan)
        for i, a in enumerate(self.alphas):
            parts = self._fit_one(X, Y, np.full(L, a))
            err = np.abs(self._predict(parts, X_val, L) - Y_val)
            self.val_mae_[i] = np.nanmean(np.where(np.isfinite(Y_val), err, np.nan), axis=0)
        best = np.nanargmin(self.val_mae_, axis=0)
        self.alpha_ = np.array([self.alphas[b] for b in best])
        # sklearn's Ridge takes one alpha per target, so the joint fit keeps per-label penalties
        self.estimators_ = self._fit_one(X, Y, self.alpha_)
        return self

    @property
    def alpha_at_edge(self) -> list[bool]:
        """True for a label whose best alpha is the first or last of the grid (widen it)."""
        return [a in (self.alphas[0], self.alphas[-1]) for a in self.alpha_]


class CNN(nn.Module):
    """StarNet-like 1-D CNN (Fabbro et al. 2017), as the paper's parameter count pins it (docs/method.md, section "Reported results").

    (B, n_in) -> conv1d 4 filters k8 -> conv1d 16 filters k8 ("same" padding, ReLU)
    -> max-pool 4 -> dense 256 -> dense 128 (ReLU) -> (B, n_out).
    """

    def __init__(self, n_in: int = 4000, n_out: int = 3):
        super().__init__()
        self.n_in, self.n_out = int(n_in), int(n_out)
        self.conv1 = nn.Conv1d(1, 4, 8)
        self.conv2 = nn.Conv1d(4, 16, 8)
        self.pool = nn.MaxPool1d(4)
        self.fc1 = nn.Linear(16 * (n_in // 4), 256)
        self.fc2 = nn.Linear(256, 128)
        self.out = nn.Linear(128, n_out)
        self.act = nn.ReLU()

    def to_dict(self) -> dict:  # saved by model_io so load_model can rebuild it
        return {"n_in": self.n_in, "n_out": self.n_out}

    @classmethod
    def from_dict(cls, d: dict) -> "CNN":
        return cls(int(d["n_in"]), int(d["n_out"]))

    @staticmethod
    def _same(h):
        # Keras-style "same" padding for an even kernel of 8: 3 zeros left, 4 right
        return F.pad(h, (3, 4))

    def forward(self, x):
        h = self.act(self.conv1(self._same(x.unsqueeze(1))))  # (B, 4, n_in)
        h = self.act(self.conv2(self._same(h)))  # (B, 16, n_in)
        h = self.pool(h).flatten(1)  # (B, 16 * n_in // 4)
        h = self.act(self.fc1(h))
        h = self.act(self.fc2(h))
        return self.out(h)  # (B, n_out)


class DNN(nn.Module):
    """One fully connected net per label (Li et al. 2017): n_in-1000-500-100-1, ReLU.

    (B, n_in) -> (B, n_out), output j from its own network.
    """

    def __init__(self, n_in: int = 4000, n_out: int = 3, hidden=(1000, 500, 100)):
        super().__init__()
        self.n_in, self.n_out, self.hidden = int(n_in), int(n_out), tuple(int(h) for h in hidden)

        def one():
            layers, d = [], n_in
            for h in hidden:
                layers += [nn.Linear(d, h), nn.ReLU()]
                d = h
            return nn.Sequential(*layers, nn.Linear(d, 1))

        self.nets = nn.ModuleList(one() for _ in range(n_out))

    def to_dict(self) -> dict:
        return {"n_in": self.n_in, "n_out": self.n_out, "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, d: dict) -> "DNN":
        return cls(int(d["n_in"]), int(d["n_out"]), tuple(d["hidden"]))

    def forward(self, x):
        return torch.cat([net(x) for net in self.nets], dim=1)

