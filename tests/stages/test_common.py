"""Which parameters a stage trains: its own patterns, plus the LM where the llm group says so."""

from fnmatch import fnmatchcase

from omegaconf import OmegaConf

from bita.stages.common import trainable_patterns

QUERY_PATH = ["query_tokens", "llm_proj.*"]


def _cfg(uses_llm: bool, llm_trainable: bool):
    return OmegaConf.create(
        {
            "stage": {"trainable": QUERY_PATH, "uses_llm": uses_llm},
            "llm": {"kind": "opt", "trainable": llm_trainable},
        }
    )


def _trains_lm(patterns: list[str]) -> bool:
    return any(fnmatchcase("llm.model.decoder.layers.0.fc1.weight", p) for p in patterns)


def test_a_trainable_llm_trains_in_the_stages_that_use_it():
    assert _trains_lm(trainable_patterns(_cfg(uses_llm=True, llm_trainable=True)))
    assert trainable_patterns(_cfg(uses_llm=True, llm_trainable=False)) == QUERY_PATH


def test_stage_one_never_trains_the_llm_it_does_not_build():
    assert trainable_patterns(_cfg(uses_llm=False, llm_trainable=True)) == QUERY_PATH
