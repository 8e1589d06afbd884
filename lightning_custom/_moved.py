"""Old module paths that issue 26 moved into layer folders, still importable.

Configs, saved runs and user code name modules by their dotted paths (``lightning_custom.toy_models``,
``lightning_custom.callbacks.dvar.DVAREarlyStopping``). Rather than a re-export file at every old path, which would
put the old flat layout back in the folder listing, a finder at the front of ``sys.meta_path`` answers an old name with
the module at its new path: the same module object, so ``mock.patch("lightning_custom.sampling.x")`` patches what
the package calls. It holds strings only, so it adds no edge to the import graph (tests/test_import_layers.py).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

# old dotted path -> new dotted path
MOVED: dict[str, str] = {
    f"lightning_custom.{old}": f"lightning_custom.{new}"
    for old, new in {
        "diffusion": "objectives.diffusion",
        "flow_matching": "objectives.flow_matching",
        "sdxl": "objectives.sdxl",
        "replay": "dvar.replay",
        "calibrate": "dvar.calibrate",
        "calibrate_across": "dvar.calibrate_across",
        "report": "dvar.report",
        "callbacks.dvar": "dvar.callback",
        "callbacks.fleet_stops": "dvar.fleet_stops",
        "callbacks.final_files": "runs.final_files",
        "run_folder": "runs.run_folder",
        "provenance": "runs.provenance",
        "gather": "runs.gather",
        "summary_file": "runs.summary",
        "io": "runtime.io",
        "quiet": "runtime.quiet",
        "interrupts": "runtime.interrupts",
        "strategies": "runtime.strategies",
        "ranges": "runtime.ranges",
        "sampling": "inference.sampling",
        "evaluate": "inference.evaluate",
        "metrics": "inference.metrics",
        "offline_tokenizers": "synthetic.offline_tokenizers",
        "architectures": "synthetic.architectures",
        "toy_models": "synthetic.toy_models",
        "toy_flow": "synthetic.toy_flow",
        "components": "families.components",
        "world.render": "synthetic.world_render",
        "world.concepts": "synthetic.world_concepts",
        "world.encoder": "synthetic.world_encoder",
        "world.identity": "synthetic.world_identity",
    }.items()
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads it as the module at its new path."""

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        """A spec for an old module path; ``None`` (not ours) for every other name."""
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        """The module at the new path (imported if it is not yet)."""
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already imported."""


def install() -> None:
    """Answer the old paths (once per interpreter). First in line, so that a stale copy of the package elsewhere on
    the path (an editable install of another checkout) cannot answer them; other names cost one dict lookup."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
