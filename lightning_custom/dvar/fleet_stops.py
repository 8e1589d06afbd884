"""Per-concept stops of a fleet (``TextualInversionFleet``): each concept stops by its own DVAR decision.

``DVAREarlyStopping`` hands a fleet's evaluations here: every concept still training gets its own verdict on its own
L_det series (``dvar_loss/<name>``) and its own trainable norm, with every stop reason (``dvar``, ``diverged``,
``non_finite``, ``not_training``, ``undertrained``); a concept that stops is frozen, the others go on, and the run
ends once the last concept has stopped. One concept going NaN or diverging stops that concept, never the others.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

FLEET_RUN_REASON = "every concept of the fleet has stopped"


def concept_norm(pl_module: L.LightningModule, name: str) -> float:
    """The L2 norm of concept ``name``'s trainable vectors."""
    return trainable_norm(pl_module, pl_module.concept_parameters(name))


class FleetStops:
    """Which concepts of a fleet have stopped, when and why; kept in ``DVAREarlyStopping``'s checkpoint state."""

    def __init__(self) -> None:
        self.stops: dict[str, dict[str, Any]] = {}
        self.initial_norms: dict[str, float] = {}

    def start(self, pl_module: L.LightningModule) -> None:
        """Record each concept's norm before its first step, and freeze the concepts a resumed run had stopped."""
        for spec in pl_module.concept_specs:
            self.initial_norms.setdefault(spec.name, concept_norm(pl_module, spec.name))
        for name in self.stops:
            pl_module.freeze_concept(name)

    def decide(self, callback: Any, trainer: L.Trainer, pl_module: L.LightningModule, step: int,
               values: dict[str, float], ratios: dict[str, float | None]) -> None:
        """Give every active concept its verdict at ``step`` (the same on every rank) and freeze those that stop."""
        from lightning_custom.dvar.callback import STOP_KINDS

        active = [name for name in pl_module.active_concepts if f"{callback.monitor}/{name}" in values]
        verdicts = {}
        for name in active:
            key = f"{callback.monitor}/{name}"
            verdicts[name] = callback._verdict(step, {key: values[key]}, {key: ratios[key]},
                                               concept_norm(pl_module, name), self.initial_norms.get(name), [key])
        codes = torch.tensor([0 if verdicts[n] is None else 1 + STOP_KINDS.index(verdicts[n][0]) for n in active],
                             device=pl_module.device)
        agreed = trainer.strategy.reduce(codes, reduce_op="max").tolist() if active else []
        for name, code in zip(active, agreed):
            if not code:
                continue
            kind = STOP_KINDS[int(code) - 1]
            verdict = verdicts[name]
            reason = verdict[1] if verdict is not None and verdict[0] == kind else (
                f"{kind}: decided on another rank at step {step}.")
            self.stop(trainer, pl_module, name, step, kind, reason, callback.verbose)
        if not pl_module.active_concepts:
            callback._stop(trainer, step, *self.run_verdict(step))

    def stop(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, step: int, kind: str, reason: str,
             verbose: bool = True) -> None:
        """Record concept ``name``'s stop and freeze it."""
        self.stops[name] = {"stop_step": step, "stopped_by": kind, "stop_reason": reason}
        pl_module.freeze_concept(name, failed=kind in ("diverged", "non_finite"))
        if verbose and trainer.is_global_zero:
            print(f"[{name}] {reason}")

    def finish(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """The concepts still training when the run ends stop there, at the run's step limit."""
        for name in list(pl_module.active_concepts):
            self.stop(trainer, pl_module, name, step, "max_steps",
                      f"Reached the run's end at step {step} without converging.", verbose=False)

    def run_verdict(self, step: int) -> tuple[str, str]:
        """The run's ``(stopped_by, reason)``: ``dvar`` if every concept stopped by DVAR, else the most severe."""
        from lightning_custom.dvar.callback import STOP_KINDS

        kinds = [stop["stopped_by"] for stop in self.stops.values()]
        kind = max(kinds, key=STOP_KINDS.index) if kinds else "max_steps"
        counts = ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds), key=STOP_KINDS.index))
        return kind, f"Every concept of the fleet has stopped by step {step} ({counts})."

    def summary(self) -> list[dict[str, Any]]:
        """One entry per stopped concept: its name, stop step, reason and words."""
        return [{"name": name, **stop} for name, stop in self.stops.items()]

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint."""
        return {"stops": self.stops, "initial_norms": self.initial_norms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From the checkpoint."""
        self.stops = {name: dict(stop) for name, stop in state.get("stops", {}).items()}
        self.initial_norms = {name: float(n) for name, n in state.get("initial_norms", {}).items()
                              if n is not None and math.isfinite(float(n))}


def concept_summary(run_summary: dict[str, Any], pl_module: L.LightningModule, dvar: Any, name: str,
                    artifacts: list[str]) -> dict[str, Any]:
    """Concept ``name``'s ``summary.json``, as its own run would have written it: its token, images, stop step,
    reason and L_det history; the run's settings, provenance and timing beside them."""
    spec = next(s for s in pl_module.concept_specs if s.name == name)
    stop = dvar.fleet.stops.get(name, {})
    key = f"{dvar.monitor}/{name}"
    summary = {key_: value for key_, value in run_summary.items()
               if key_ not in ("concepts", "dvar_histories", "files", "artifacts", "train_loss_history")}
    from lightning_custom.synthetic.embedded import resolve_instance_dir

    summary.update(
        placeholder_token=spec.placeholder_token, instance_data_dir=resolve_instance_dir(spec.instance_data_dir),
        initializer_token=spec.initializer_token or pl_module.initializer_token, concept=name,
        stop_step=stop.get("stop_step"), stopped_by=stop.get("stopped_by"), stop_reason=stop.get("stop_reason", ""),
        dvar_history=dvar.histories.get(key, []), artifacts=artifacts,
        fleet_note=f"Trained in a fleet of {len(pl_module.concept_specs)} concepts; the run's summary is one folder "
                   "up.",
    )
    max_steps = run_summary.get("max_steps")
    if max_steps and max_steps > 0 and summary["stop_step"] is not None:
        summary["steps_saved"] = max(0, max_steps - summary["stop_step"])
    # The fleet's time, shared out by the steps each concept trained (a step costs about the same per concept), so
    # that the concepts' wall times add up to the fleet's.
    steps = {n: (s.get("stop_step") or 0) for n, s in dvar.fleet.stops.items()}
    wall = run_summary.get("wall_seconds")
    if wall is not None and sum(steps.values()) > 0:
        summary["wall_seconds"] = round(wall * steps.get(name, 0) / sum(steps.values()), 3)
        summary["fleet_wall_seconds"] = wall
        summary["seconds_saved"] = None  # the fleet's pace is not this concept's alone
    return summary


def trainable_norm(pl_module: L.LightningModule, params: list[torch.Tensor] | None = None) -> float:
    """The L2 norm of ``params``, by default every parameter the optimizer trains (the module's
    ``trainable_parameters()`` if it has one)."""
    if params is None:
        params = (pl_module.trainable_parameters() if hasattr(pl_module, "trainable_parameters")
                  else [p for p in pl_module.parameters() if p.requires_grad])
    if not params:
        return 0.0
    with torch.no_grad():
        return float(torch.nn.utils.get_total_norm([p.detach().float() for p in params]))
