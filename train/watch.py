"""The divergence watch.

EBM training with the paper's recipe is fragile: in a small independent run on real data the
energies grew without bound after about 750 and again after about 1,800 updates, and in another
the gradient norm rose 9x over 200 updates without ever jumping. The watch looks at every step's
metrics and fires when

* any metric is not finite (a NaN or inf loss, energy or gradient norm), at once;
* the training samples left [-1 - m, 1 + m] (``sample_abs_max`` over ``1 + sample_margin``: a
  diverged Langevin chain, DESIGN 2.4), at once;
* an absolute limit is crossed (``max_energy`` on the energy magnitude, ``max_grad_norm``),
* a watched magnitude exceeds ``factor`` times its running median over the last ``window``
  healthy steps (once ``warmup`` steps are in the window), or
* a slow blow-up: a trend-watched magnitude's median over its last ``trend_window // 4``
  healthy steps is more than ``trend_factor`` times its median over the ``trend_window // 4``
  steps that ended ``trend_window`` steps earlier (it grew that much within the window; medians,
  so single spikes and noise do not count),

the last three for ``patience`` consecutive steps. While such a streak is open the watch is
``pending`` and the loop postpones checkpoints. A model that produced a bad step is suspect, and
so is its checkpoint: ``suspect_from`` is the first checkpoint step not to roll back to (for the
trend rule, the end of the baseline, as the checkpoints of the rise are suspect too).

Step numbers: ``check(step, m)`` gets the metrics of update ``step - 1``, computed with the
weights after ``step - 1`` updates, i.e. those of checkpoint ``step - 1``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SAMPLE_KEY", "WatchConfig", "DivergenceWatch"]

SAMPLE_KEY = "sample_abs_max"  # max |x| of the step's training samples, over all ranks


@dataclass
class WatchConfig:
    enabled: bool = True
    factor: float = 100.0
    patience: int = 5
    window: int = 500
    warmup: int = 50
    max_energy: float | None = None
    max_grad_norm: float | None = None
    trend_window: int = 200  # 0: no trend rule
    trend_factor: float = 6.0
    sample_margin: float = 4.0

    @classmethod
    def from_config(cls, cfg: Any) -> WatchConfig:
        """From a training config: ``watch`` switches it on, ``watch_<field>`` sets the rest."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "enabled"]
        return cls(enabled=cfg.watch, **{n: getattr(cfg, f"watch_{n}") for n in names})

    def problems(self) -> list[str]:
        """What is wrong with these settings, as flag messages (empty: fine)."""
        out = []
        if self.trend_window < 0:
            out.append(f"--watch-trend-window must be >= 0 (0: off); got {self.trend_window}")
        if self.trend_window > 0 and not self.trend_factor > 1:
            out.append(f"--watch-trend-factor must be > 1; got {self.trend_factor}")
        if not self.sample_margin >= 0:
            out.append(f"--watch-sample-margin must be >= 0; got {self.sample_margin}")
        return out


class DivergenceWatch:
    """``check(step, metrics)`` returns None while healthy, else the reason it fired.

    ``relative``: the metric names compared against their running medians; ``trend``: those the
    trend rule watches (default: ``relative``); every metric passed is checked for finiteness.
    ``energy_abs`` and ``grad_norm`` carry the absolute limits, ``sample_abs_max`` the samples'.
    """

    def __init__(
        self, cfg: WatchConfig, relative: Iterable[str], trend: Iterable[str] | None = None
    ) -> None:
        self.cfg = cfg
        self.relative = tuple(relative)
        self.trend_keys = self.relative if trend is None else tuple(trend)
        self.history: dict[str, deque[float]] = {
            k: deque(maxlen=max(cfg.window, 1)) for k in self.relative
        }
        self.recent_n = max(cfg.trend_window // 4, 1)
        # (step, value) of healthy steps: the baseline and the recent medians of the trend rule
        self.trend: dict[str, deque[tuple[int, float]]] = {
            k: deque(maxlen=cfg.trend_window + self.recent_n) for k in self.trend_keys
        }
        self.streak: list[tuple[int, str, int]] = []  # (step, reason, suspect_from)
        self.fired: tuple[int, str] | None = None
        self.suspect_from: int | None = None

    @property
    def pending(self) -> bool:
        return bool(self.streak)

    @property
    def streak_start(self) -> int | None:
        return self.streak[0][0] if self.streak else None

    def _violation(self, m: Mapping[str, float]) -> str | None:
        c = self.cfg
        e = m.get("energy_abs")
        if c.max_energy is not None and e is not None and e > c.max_energy:
            return f"|E| = {e:.4g} > --watch-max-energy {c.max_energy:g}"
        g = m.get("grad_norm")
        if c.max_grad_norm is not None and g is not None and g > c.max_grad_norm:
            return f"grad norm {g:.4g} > --watch-max-grad-norm {c.max_grad_norm:g}"
        for k in self.relative:
            h = self.history[k]
            if k in m and len(h) >= max(c.warmup, 1):
                med = statistics.median(h)
                if med > 0 and m[k] > c.factor * med:
                    return f"{k} = {m[k]:.4g} is {m[k] / med:.3g}x its running median {med:.4g}"
        return None

    def trend_ratio(self, key: str) -> tuple[float, int] | None:
        """(recent median / baseline median, the baseline's last step), once the window is full."""
        h = self.trend[key]
        if self.cfg.trend_window <= 0 or len(h) < (h.maxlen or 0):
            return None
        n, vals = self.recent_n, list(h)
        base = statistics.median(v for _, v in vals[:n])
        recent = statistics.median(v for _, v in vals[-n:])
        if base <= 0:
            return None
        return recent / base, vals[n - 1][0]

    def _trend_violation(self) -> tuple[str, int] | None:
        for k in self.trend_keys:
            r = self.trend_ratio(k)
            if r is not None and r[0] > self.cfg.trend_factor:
                return (
                    f"{k} grew {r[0]:.3g}x within {self.cfg.trend_window} steps (median of the "
                    f"last {self.recent_n} vs the {self.recent_n} up to step {r[1]}; "
                    f"--watch-trend-factor {self.cfg.trend_factor:g})"
                ), r[1]
        return None

    def _fire(self, step: int, reason: str, suspect_from: int) -> str:
        self.fired = (step, reason)
        self.suspect_from = suspect_from
        return reason

    def check(self, step: int, metrics: Mapping[str, float]) -> str | None:
        if not self.cfg.enabled:
            return None
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:
            why = "non-finite " + ", ".join(f"{k} = {metrics[k]}" for k in bad)
            return self._fire(step, why, self._suspect(step - 1))
        lim = 1 + self.cfg.sample_margin
        x = metrics.get(SAMPLE_KEY)
        if x is not None and x > lim:
            why = (
                f"training samples left [-{lim:g}, {lim:g}] (max |x| = {x:.4g}; "
                f"--watch-sample-margin {self.cfg.sample_margin:g})"
            )
            return self._fire(step, why, self._suspect(step - 1))
        spike = self._violation(metrics)
        if spike is None:
            for k in self.relative:
                if k in metrics:
                    self.history[k].append(float(abs(metrics[k])))
            for k in self.trend_keys:
                if k in metrics:
                    self.trend[k].append((step, float(abs(metrics[k]))))
            trend = self._trend_violation()
            if trend is None:
                self.streak.clear()
                return None
            why, suspect = trend
        else:
            why, suspect = spike, step - 1
        self.streak.append((step, why, suspect))
        if len(self.streak) >= max(self.cfg.patience, 1):
            first = self.streak[0][0]
            suspect = min(s for _, _, s in self.streak)
            return self._fire(step, f"{why} (over the limit since step {first})", suspect)
        return None

    def _suspect(self, model_step: int) -> int:
        """The first suspect checkpoint step: this model's, or an open streak's earlier one."""
        return min([model_step, *(s for _, _, s in self.streak)])

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {k: list(v) for k, v in self.history.items()},
            "trend": {k: [[s, v] for s, v in h] for k, h in self.trend.items()},
            "streak": [[s, r, f] for s, r, f in self.streak],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, vals in state.get("history", {}).items():
            if k in self.history:
                self.history[k].clear()
                self.history[k].extend(float(v) for v in vals)
        for k, h in self.trend.items():
            h.clear()
            h.extend((int(s), float(v)) for s, v in state.get("trend", {}).get(k, []))
        self.streak = [
            (int(s[0]), str(s[1]), int(s[2]) if len(s) > 2 else int(s[0]) - 1)
            for s in state.get("streak", [])
        ]
