"""The one set of sampling settings, named the same from the CLI down to SegDiff."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SamplingSettings:
    """How hypotheses are drawn at inference.

    ``num_hypotheses``: K hypotheses per patch (and per fold); ``steps``: S flow-matching steps after
    the start distribution (0: the start's draws themselves);
    ``seed``: the sampling seed (same seed, same hypotheses and maps); ``probe``: run ProbeStep;
    ``hypotheses``: draw the hypotheses' whole-case readings (the masks ``--save-hypotheses`` writes; off, the
    returned hypotheses are their expectations, as the mean and maps use, and the drawing costs nothing).
    """

    num_hypotheses: int = 8
    #: 0: the start's draws; a flow step changed no calibration, Dice or hypothesis metric measurably and costs a
    #: head per hypothesis (docs/design.md, "S = 0 by default")
    steps: int = 0
    seed: int = 0
    probe: bool = True
    hypotheses: bool = True

    def __post_init__(self):
        if self.num_hypotheses < 1:
            raise ValueError(f"num_hypotheses must be >= 1, got {self.num_hypotheses}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    def with_(self, **changes) -> "SamplingSettings":
        """A copy with some fields changed (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


DEFAULT_SAMPLING = SamplingSettings()
