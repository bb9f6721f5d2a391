"""`hydra/sweeper=bita_optuna`: an Optuna study driven through Hydra's sweeper interface.

Each trial is one job of Hydra's launcher (local, or `hydra/launcher=slurm`), so a trial is an
ordinary `bita.run` (its own run folder, an MLflow child run under the study's parent); the
value the job returns (`bita.run` returns the stage's selection score) is told to the study.
The search space uses Hydra's override grammar, as hydra-optuna-sweeper's does:
`interval(a, b)` (float), `tag(log, interval(a, b))` (log scale), `range(a, b[, step])`
(integers, b excluded) and `choice(x, y, ...)` or `x,y,...` (categorical), in
`hydra.sweeper.params` or on the command line.

Why not hydra-optuna-sweeper 1.3.0: it pins optuna<3 (2.10.1), whose SQL storage cannot open a
database under the SQLAlchemy 2 that MLflow installs (so a study could neither resume nor be
shared), and its `params` cannot be changed from the command line under OmegaConf 2.3. This
plugin drives the current Optuna through the same interface.
"""

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional  # noqa: UP035 - OmegaConf 2.3 reads these, not `X | None`

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


# Hydra executes plugin modules outside sys.modules, so no `from __future__ import annotations`
# here: dataclasses would fail to resolve string annotations.
@dataclass
class BitaOptunaSweeperConf:
    _target_: str = "hydra_plugins.bita_optuna_sweeper.optuna_sweeper.BitaOptunaSweeper"
    study_name: Optional[str] = None  # noqa: UP045
    direction: str = "maximize"  # or minimize
    n_trials: int = 20  # trials of the study in all, counting those a stored study already ran
    n_jobs: int = 1  # trials asked for and launched together
    storage: Optional[str] = None  # noqa: UP045 - an Optuna storage URL; None: in memory
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler"})
    params: Dict[str, str] = field(default_factory=dict)  # noqa: UP006


ConfigStore.instance().store(
    group="hydra/sweeper", name="bita_optuna", node=BitaOptunaSweeperConf, provider="bita"
)


def distribution(override: Override) -> Optional[optuna.distributions.BaseDistribution]:  # noqa: UP045
    """The Optuna distribution of one sweep override, or None for a fixed value."""
    value = override.value()
    if isinstance(value, IntervalSweep):
        return optuna.distributions.FloatDistribution(
            float(value.start), float(value.end), log="log" in value.tags
        )
    if isinstance(value, RangeSweep):
        step = int(value.step)
        return optuna.distributions.IntDistribution(
            int(value.start), int(value.stop) - step, step=step, log="log" in value.tags
        )
    if isinstance(value, ChoiceSweep):
        return optuna.distributions.CategoricalDistribution(list(value.list))
    if override.is_sweep_override():
        raise ValueError(
            f"{override.input_line}: the Optuna sweeper takes interval(), range() or choice()"
        )
    return None


class BitaOptunaSweeper(Sweeper):
    def __init__(
        self,
        study_name: Optional[str],  # noqa: UP045
        direction: str,
        n_trials: int,
        n_jobs: int,
        storage: Optional[str],  # noqa: UP045
        sampler: Any,
        params: Mapping[str, str],
    ) -> None:
        self.study_name, self.direction, self.storage = study_name, direction, storage
        self.n_trials, self.n_jobs = int(n_trials), max(1, int(n_jobs))
        self.sampler = sampler  # Hydra instantiates the sweeper's config recursively
        self.params = dict(params or {})

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _space(self, arguments: Sequence[str]) -> tuple[dict, list[str]]:
        """(search space, fixed overrides): config params first, the command line wins."""
        lines = [f"{key}={value}" for key, value in self.params.items()] + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space, fixed = {}, {}
        for override in parser.parse_overrides(lines):
            key = override.get_key_element()
            found = distribution(override)
            space.pop(key, None)
            fixed.pop(key, None)
            if found is None:
                fixed[key] = override.input_line
            else:
                space[key] = found
        return space, list(fixed.values())

    def sweep(self, arguments: list[str]) -> list:
        space, fixed = self._space(arguments)
        if not space:
            raise ValueError("hydra.sweeper.params is empty: nothing for Optuna to search")
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=self.sampler,
            direction=self.direction,
            load_if_exists=True,
        )
        returns = []
        while len(study.trials) < self.n_trials:
            count = min(self.n_jobs, self.n_trials - len(study.trials))
            first_job = len(study.trials)
            trials = [study.ask(space) for _ in range(count)]
            batch = [fixed + [f"{k}={v}" for k, v in trial.params.items()] for trial in trials]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=first_job)
            for trial, result in zip(trials, results, strict=True):
                self._tell(study, trial, result)
            returns.append(results)
        self._report(study, sweep_dir)
        return returns

    @staticmethod
    def _tell(study: optuna.Study, trial: optuna.Trial, result: Any) -> None:
        try:
            value = result.return_value  # re-raises the job's exception
        except Exception as err:  # a failed trial is the study's data, not the sweep's end
            log.warning("trial %d failed: %s", trial.number, err)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        if value is None:
            log.warning(
                "trial %d returned no objective (no stage of the run selects a checkpoint)",
                trial.number,
            )
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        study.tell(trial, float(value))

    def _report(self, study: optuna.Study, sweep_dir: Path) -> None:
        complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            log.warning("no trial of study %s completed", study.study_name)
            return
        best = study.best_trial
        summary = {
            "study_name": study.study_name,
            "direction": self.direction,
            "best_trial": best.number,
            "best_value": best.value,
            "best_params": best.params,
            "trials": len(study.trials),
            "completed": len(complete),
        }
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
        log.info("best trial %d: %s = %s", best.number, best.params, best.value)
