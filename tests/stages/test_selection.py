"""Which checkpoint a fine-tune hands on and scores: `best`, or `last` said out loud."""

import logging

from omegaconf import OmegaConf

from bita.engine.trainer import FitResult
from bita.stages.context import StageContext


class Tags:
    def __init__(self):
        self.tags = {}

    def set_tags(self, tags):
        self.tags.update(tags)


def _fit(tmp_path, best) -> FitResult:
    return FitResult(2, 0, tmp_path / "last", best, 1.5 if best else None, 0, {})


def test_a_fine_tune_that_validated_no_epoch_hands_on_last_and_says_so(tmp_path, caplog):
    """Fault: train.max_steps ends fine-tuning inside its first epoch, so no epoch is
    validated and there is no `best`; `best or last` then scored `last` without a word."""
    from bita.stages.finetune import selected_checkpoint

    cfg = OmegaConf.create({"stage": {"name": "finetune", "select_metric": "CIDEr+Bleu_4"}})
    tracker = Tags()
    ctx = StageContext(cfg, tmp_path, None, tracker)
    with caplog.at_level(logging.WARNING):
        chosen, selection = selected_checkpoint(ctx, _fit(tmp_path, None), 19)
    assert chosen == tmp_path / "last" and selection["checkpoint"] == "last"
    assert "stopped at step 2, before the first epoch ended at step 19" in selection["reason"]
    assert "checkpoints/last is scored and handed on" in caplog.text
    assert tracker.tags == {"finetune/selected_checkpoint": "last"}

    chosen, selection = selected_checkpoint(ctx, _fit(tmp_path, tmp_path / "best"), 1)
    assert chosen == tmp_path / "best"
    assert selection == {"checkpoint": "best", "select_metric": "CIDEr+Bleu_4", "score": 1.5}
