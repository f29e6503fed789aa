"""Per-row optimizers for embedding tables: SGD, Adagrad, FTRL-Proximal and Adam, batch at a time.

Each keeps its state as `state_width` float32 vectors of the row's dimension beside the row, and
updates the gathered rows of one push in place (numpy over the batch, float32 throughout). The
formulas are the ones of TensorFlow's sparse apply ops (Adam with per-row step counts, as a lazy
Adam: a row's step is its version, the number of updates it has had).
"""

from __future__ import annotations

from typing import ClassVar, Union

import msgspec
import numpy as np


class Sgd(msgspec.Struct, frozen=True, kw_only=True, tag="sgd"):
    """w -= lr * g"""

    lr: float = 0.01
    state_width: ClassVar[int] = 0

    def init_state(self, n: int, dim: int) -> np.ndarray:
        return np.zeros((n, 0), np.float32)

    def apply(self, w: np.ndarray, s: np.ndarray, g: np.ndarray, steps: np.ndarray) -> None:
        w -= np.float32(self.lr) * g


class Adagrad(msgspec.Struct, frozen=True, kw_only=True, tag="adagrad"):
    """acc += g**2; w -= lr * g / (sqrt(acc) + eps). State: acc, starting at `initial_accumulator`."""

    lr: float = 0.05
    initial_accumulator: float = 0.1
    eps: float = 1e-7
    state_width: ClassVar[int] = 1

    def init_state(self, n: int, dim: int) -> np.ndarray:
        return np.full((n, dim), self.initial_accumulator, np.float32)

    def apply(self, w: np.ndarray, s: np.ndarray, g: np.ndarray, steps: np.ndarray) -> None:
        d = np.multiply(g, g)
        s += d
        np.sqrt(s, out=d)
        d += np.float32(self.eps)
        np.divide(g, d, out=d)
        d *= np.float32(self.lr)
        w -= d


class Ftrl(msgspec.Struct, frozen=True, kw_only=True, tag="ftrl"):
    """FTRL-Proximal (McMahan et al. 2013), per coordinate. State: z, n (n starts at
    `initial_accumulator`).

        sigma = (sqrt(n + g**2) - sqrt(n)) / alpha;  z += g - sigma * w;  n += g**2
        w = 0 if |z| <= l1 else -(z - sign(z) * l1) / ((beta + sqrt(n)) / alpha + l2)
    """

    alpha: float = 0.05
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0
    initial_accumulator: float = 0.1
    state_width: ClassVar[int] = 2

    def init_state(self, n: int, dim: int) -> np.ndarray:
        s = np.zeros((n, 2 * dim), np.float32)
        s[:, dim:] = self.initial_accumulator
        return s

    def apply(self, w: np.ndarray, s: np.ndarray, g: np.ndarray, steps: np.ndarray) -> None:
        dim = w.shape[1]
        z, n = s[:, :dim], s[:, dim:]
        alpha = np.float32(self.alpha)
        sq_old = np.sqrt(n)
        n += g * g
        sq_new = np.sqrt(n)
        sigma = (sq_new - sq_old) / alpha
        z += g - sigma * w
        denom = (np.float32(self.beta) + sq_new) / alpha + np.float32(self.l2)
        l1 = np.float32(self.l1)
        w[...] = np.where(np.abs(z) <= l1, np.float32(0), -(z - np.sign(z) * l1) / denom)


class Adam(msgspec.Struct, frozen=True, kw_only=True, tag="adam"):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g**2;  w -= lr * m^ / (sqrt(v^) + eps), with the bias
    corrections m^ = m / (1 - b1**t), v^ = v / (1 - b2**t) at the row's own step t. State: m, v."""

    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    state_width: ClassVar[int] = 2

    def init_state(self, n: int, dim: int) -> np.ndarray:
        return np.zeros((n, 2 * dim), np.float32)

    def apply(self, w: np.ndarray, s: np.ndarray, g: np.ndarray, steps: np.ndarray) -> None:
        dim = w.shape[1]
        m, v = s[:, :dim], s[:, dim:]
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        m *= b1
        m += (np.float32(1) - b1) * g
        v *= b2
        v += (np.float32(1) - b2) * (g * g)
        t = steps.astype(np.float64)
        c1 = (1.0 - np.power(self.beta1, t)).astype(np.float32)[:, None]
        c2 = (1.0 - np.power(self.beta2, t)).astype(np.float32)[:, None]
        w -= np.float32(self.lr) * (m / c1) / (np.sqrt(v / c2) + np.float32(self.eps))


Optimizer = Union[Sgd, Adagrad, Ftrl, Adam]

BY_NAME: dict[str, type] = {"sgd": Sgd, "adagrad": Adagrad, "ftrl": Ftrl, "adam": Adam}


def optimizer(name: str, **hyper: float) -> Optimizer:
    """An optimizer by name ("sgd", "adagrad", "ftrl", "adam") with its hyperparameters."""
    try:
        return BY_NAME[name](**hyper)
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; one of {', '.join(BY_NAME)}") from None


__all__ = ["Adagrad", "Adam", "Ftrl", "Optimizer", "Sgd", "optimizer"]
