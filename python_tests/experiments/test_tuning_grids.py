"""The equal-tuning grids of scripts/tune_methods.py: within the budget, every method but the upper bound, every
configuration a valid config of its method, the default listed first (the rule's last tie-break)."""
import importlib.util
from pathlib import Path

import pytest

from dcfast.experiments.regimes import train_values
from dcfast.training.config import TrainConfig
from dcfast.training.methods import METHODS

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "tune_methods.py"


def _script():
    spec = importlib.util.spec_from_file_location("tune_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_equal_grids_give_every_method_the_same_budget_of_valid_configurations():
    tune = _script()
    grids = tune.EQUAL_GRIDS
    assert {m for grid in grids.values() for m, _ in grid} == set(METHODS) - {"joint"}
    for name, grid in grids.items():
        assert 1 <= len(grid) <= tune.EQUAL_BUDGET, name
        assert len({tune.variant_name(m, o) for m, o in grid}) == len(grid), f"{name} repeats a configuration"
    default = TrainConfig.from_dict({**train_values("ewc-dc", False, {}), "method": "ewc-dc"}, ignore_other_methods=True)
    assert grids["equal-ewc-dc"][0][1] == {"ewc_lambda": default.flat()["ewc_lambda"],
                                           "fisher_normalize": default.flat()["fisher_normalize"]}
    assert tune.PRESETS["equal"][1] == ["novel-same-class-val", "novel-distinct-class-val"]


def test_every_grid_configuration_is_a_valid_run_that_holds_its_settings():
    tune = _script()
    for name, grid in tune.GRIDS.items():
        for method, overrides in tune.with_prior(grid):
            config = TrainConfig.from_dict({**train_values(method, False, overrides), "method": method},
                                           ignore_other_methods=True)
            flat = config.flat()
            assert all(flat[key] == value for key, value in overrides.items()), (name, overrides)


def test_a_row_records_what_moved_in_every_task_in_task_order(tmp_path):
    import json

    from dcfast.io.runs import task_dir

    tune = _script()
    written = [{"lora_change": 30.0, "token_change": 0.1, "temperature": 3e-3, "final_loss": 0.07},
               {"lora_change": 8.0, "token_change": 0.6, "temperature": 1e-2, "fisher_raw_mean": 2e-34,
                "fisher_saturated_fraction": 1.0, "fisher_temperature": 0.4}]
    for index, metrics in enumerate(written, start=1):
        task_dir(tmp_path, index).mkdir(parents=True)
        (task_dir(tmp_path, index) / "metrics.json").write_text(json.dumps(metrics))
    records = tune.task_records(str(tmp_path))
    assert records == [{k: v for k, v in metrics.items() if k != "final_loss"} for metrics in written]


def test_rank_orders_by_mean_final_then_forgetting_within_one_sample_then_grid_order():
    tune = _script()
    grid = [("ewc", {"ewc_lambda": v}) for v in (1.0, 0.1, 0.01, 0.001)]

    def row(lam, final, forgetting, seed):
        return {"variant": tune.variant_name("ewc", {"ewc_lambda": lam}), "final_fidelity": final,
                "fidelity_forgetting": forgetting, "seed": seed}

    rows = [row(1.0, 0.50, 0.30, 0), row(1.0, 0.38, 0.10, 1),   # the best mean final 0.44, forgetting 0.20
            row(0.1, 0.42, 0.05, 0),                            # within 1/32 of the best, forgets least: first
            row(0.01, 0.44, 0.20, 0),                           # ties lambda 1 on both means: grid order decides
            row(0.5, 0.99, 0.00, 0)]                            # not in the grid: ignored
    ranked = tune.rank(rows, grid)
    assert [e["position"] for e in ranked] == [2, 1, 3]
    assert ranked[1]["runs"] == 2
    # means of two numbers, exact to a few ulps: a tolerance far below the rule's 1/32 and far above any rounding
    assert ranked[1]["final_fidelity"] == pytest.approx(0.44, abs=1e-6)
    assert ranked[1]["fidelity_forgetting"] == pytest.approx(0.20, abs=1e-6)


def test_with_prior_names_prior_preservation_in_every_method_that_trains_the_unet():
    tune = _script()
    grid = [("lora", {}), ("ti", {"token_learning_rate": 1e-3}), ("ewc-dc", {"ewc_lambda": 0.1})]
    assert tune.with_prior(grid) == [("lora", {"with_prior_preservation": True}), ("ti", {"token_learning_rate": 1e-3}),
                                     ("ewc-dc", {"ewc_lambda": 0.1, "with_prior_preservation": True})]
    off = tune.with_prior(grid, on=False)
    assert off[0] == ("lora", {"with_prior_preservation": False}) and off[1] == grid[1]
    # a row of the regime before the prior (its name without the setting) is never taken for a row with it
    assert tune.variant_name(*grid[0]) not in {tune.variant_name(m, o) for m, o in tune.with_prior(grid) + off}
    assert grid[0] == ("lora", {})  # the grid itself is left as it is


def test_the_world_regime_preserves_the_prior_for_every_method_that_trains_the_unet_and_not_for_ti():
    from dcfast.training.methods import get_method

    for method in METHODS:
        config = TrainConfig.from_dict({**train_values(method, False, {}), "method": method}, ignore_other_methods=True)
        assert config.with_prior_preservation == get_method(method).trains_lora, method
    assert not train_values("lora", True, {}).get("with_prior_preservation", False)  # the photo demo keeps it off
