"""When to stop: everything about DVAR in one folder.

- :mod:`.rule`: the stopping rule as pure functions (``lightning_custom.dvar`` before issue 26; its names are
  re-exported here, so ``from lightning_custom.dvar import variance_ratio`` keeps working).
- :mod:`.eval_batch`: the fixed evaluation batch that the deterministic loss is computed on.
- :mod:`.callback`: :class:`~lightning_custom.dvar.callback.DVAREarlyStopping`, the decision during training.
- :mod:`.replay`, :mod:`.calibrate`, :mod:`.calibrate_across`: the rule replayed on saved runs, and its settings.
- :mod:`.report`: the loss / variance-ratio figure (``report.png``).
"""

from lightning_custom.dvar.rule import *  # noqa: F403 - the rule's names, as `lightning_custom.dvar` offered them
