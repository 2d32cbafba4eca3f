"""The regression gate: a new adapter version becomes current only if it is not worse than its parent.

Both losses are taken on the same held-out set in the same run: the parent's when the
version began (its adapter is where the version starts), the version's own after its
last round.  A version that is worse by more than ``versions.gate_tolerance``, that
completed no round, or that could not be evaluated (no held-out set) is kept on disk but
not promoted, and the reason is logged and written to its version.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reason: str


def decide(loss: Optional[float], parent_loss: Optional[float], tolerance: float, has_parent: bool,
           rounds_completed: int) -> GateDecision:
    """Promote or keep; ``reason`` says why in a sentence for the operator's log."""
    if rounds_completed == 0:
        return GateDecision(False, "no round completed in this version; the adapter is its parent's")
    if not has_parent:
        return GateDecision(True, "the first version of the federation")
    if loss is None or parent_loss is None:
        return GateDecision(False, "no held-out evaluation to compare with the parent's (set data.eval_path)")
    if not math.isfinite(loss):
        return GateDecision(False, f"the held-out loss is {loss}")
    if loss <= parent_loss + tolerance:
        return GateDecision(True, f"held-out loss {loss:.4f} is within {tolerance:g} of the parent's "
                            f"{parent_loss:.4f}")
    return GateDecision(False, f"held-out loss {loss:.4f} is worse than the parent's {parent_loss:.4f} by "
                        f"{loss - parent_loss:.4f}, more than versions.gate_tolerance={tolerance:g}")
