"""config/rules.py: one list of rules, run in order by one entry."""

import pytest

from megatron_dualpipe.config import load_recipe
from megatron_dualpipe.config import validate as V
from megatron_dualpipe.config.rules import RECIPE_RULES, RULES, TRAIN_RULES, Rule, check_recipe
from megatron_dualpipe.errors import UserError

TINY = "recipes/tiny_moe_cpu.yaml"


def test_every_rule_is_listed_once_and_load_runs_the_recipe_rules():
    checks = [rule.check for rule in RULES]
    assert len(set(checks)) == len(checks) == len(RECIPE_RULES) + len(TRAIN_RULES)
    assert V.check_stage_split in checks and V.check_fusions in checks
    assert check_recipe(load_recipe(TINY)) == []


def test_rules_run_in_order_and_pass_the_source_to_rules_that_need_it():
    seen = []
    rules = [Rule(lambda recipe: seen.append("first")),
             Rule(lambda recipe, source: seen.append(source) or [f"warn {source}"],
                  needs_source=True),
             Rule(lambda recipe: (_ for _ in ()).throw(UserError("data.path: no such file"))),
             Rule(lambda recipe: seen.append("never"))]
    with pytest.raises(UserError, match="data.path"):
        check_recipe(load_recipe(TINY), "r.yaml", rules)
    assert seen == ["first", "r.yaml"]
    assert check_recipe(load_recipe(TINY), "r.yaml", rules[:2]) == ["warn r.yaml"]


def test_router_skew_without_eplb_is_refused():
    with pytest.raises(UserError, match=r"moe.router_bias_init=0.3 needs eplb.enabled=true"):
        load_recipe(TINY, ["moe.router_bias_init=0.3"])
    assert load_recipe("recipes/tiny_moe_cpu_eplb.yaml").moe.router_bias_init == 0.3
