"""The FADA configs: distill_mixed.yaml and distill_fada_fast.yaml against their bases, and the Table 3 / 4
ablation rows, each an override that changes its base only where the row differs (checked on the config
jsonargparse resolves, not on the YAML text)."""
import pytest
import yaml

from fada_lightning.cli import main
from fada_lightning.presets import bundled_config_dir

ROWS = {"table3": ("distill_mixed.yaml", "model.init_args.distiller.init_args.gt_weight"),
        "table4": ("distill_fada_fast.yaml", "model.init_args.cfg_conditioning")}
ABLATIONS = sorted(f"{p.parent.name}/{p.stem}" for p in (bundled_config_dir() / "table_rows").rglob("*.yaml"))


def resolved(capsys, *configs) -> dict:
    return resolved_args(capsys, ["fit", *[arg for c in configs for arg in ("--config", c)]])


def resolved_args(capsys, args: list[str]) -> dict:
    """The config `fada` resolves from a command line (its --print_config)."""
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def differences(a, b, prefix="") -> dict[str, tuple]:
    """{dotted key: (a's value, b's value)} where two nested configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: v for key in a.keys() | b.keys()
                for k, v in differences(a.get(key), b.get(key), f"{prefix}{key}.").items()}
    return {} if a == b else {prefix.rstrip("."): (a, b)}


def test_the_paper_rows_are_all_there():
    assert ABLATIONS == sorted(
        [f"table3/{r}" for r in ("fixed_0", "fixed_0.2", "fixed_1.0", "adaptive_unlimited_0.5",
                                 "adaptive_unlimited_0.25", "adaptive_0.5", "adaptive_0.25")]
        + [f"table4/{r}" for r in ("no_cfg", "time_embedding", "cfg_layer", "cfg_layer_tokens")])


@pytest.mark.parametrize("row", ABLATIONS)
def test_an_ablation_row_differs_from_its_base_only_where_the_row_does(row, capsys):
    table, name = row.split("/")
    base_name, row_key = ROWS[table]
    base = resolved(capsys, base_name)
    mine = resolved(capsys, base_name, f"table_rows/{row}.yaml")
    changed = differences(base, mine)
    run_dirs = {k: v for k, v in changed.items() if k in ("trainer.default_root_dir", "trainer.logger.init_args.save_dir")}
    assert {v[1] for v in run_dirs.values()} == {f"runs/{row}"} and len(run_dirs) == 2  # its own run folder
    assert all(k.startswith(row_key) for k in changed.keys() - run_dirs.keys()), changed


def test_each_row_is_a_different_setting(capsys):
    settings = {}
    for row in ABLATIONS:
        table = row.split("/")[0]
        config = resolved(capsys, ROWS[table][0], f"table_rows/{row}.yaml")
        value = config
        for key in ROWS[table][1].split("."):
            value = value[key]
        settings[row] = yaml.safe_dump(value)
    assert len(set(settings.values())) == len(settings)
    table4 = {r: yaml.safe_load(settings[r]) for r in settings if r.startswith("table4")}
    assert table4 == {"table4/no_cfg": "none", "table4/time_embedding": "time_embedding", "table4/cfg_layer": "layer",
                      "table4/cfg_layer_tokens": "layer_tokens"}


def test_fada_configs_differ_from_their_bases_only_where_fada_does(capsys):
    perflow, mixed, fast = (resolved(capsys, f"distill_{n}.yaml") for n in ("perflow", "mixed", "fada_fast"))
    distiller = "model.init_args.distiller"
    assert differences(perflow, mixed) == {
        f"{distiller}.class_path": ("distillers.perflow.PeRFlow", "distillers.mixed.MixedPeRFlow"),
        f"{distiller}.init_args.gt_weight": (None, {"class_path": "distillers.mixed.Adaptive",  # SPEC's defaults
                                                    "init_args": {"alpha": 0.25, "beta": 0.2, "r_peak": 30.0,
                                                                  "r_dead": 100.0}}),
        "data.init_args.tier_weights": (None, {"strict": 0.5, "lenient": 0.5}),
        "trainer.default_root_dir": ("runs/perflow", "runs/mixed"),
        "trainer.logger.init_args.save_dir": ("runs/perflow", "runs/mixed")}

    changed = differences(mixed, fast)
    expected = {"model.init_args.cfg_conditioning": ("none", "layer_tokens"), "model.init_args.ref_scale": (None, 2.0),
                "model.init_args.audio_scale": (None, 6.5), f"{distiller}.init_args.mode": ("balanced", "guided"),
                f"{distiller}.init_args.ref_scale": (2.5, [1.0, 3.0]),
                f"{distiller}.init_args.audio_scale": (6.5, [1.0, 9.0]),
                "trainer.default_root_dir": ("runs/mixed", "runs/fada_fast"),
                "trainer.logger.init_args.save_dir": ("runs/mixed", "runs/fada_fast")}
    assert changed == expected


def test_an_ablation_row_alone_says_to_give_its_base_first():
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "table_rows/table4/cfg_layer.yaml", "--print_config"])
    message = str(done.value.code)
    assert "overrides a base config" in message
    assert "fada fit --config distill_fada_fast.yaml --config table_rows/table4/cfg_layer.yaml" in message


@pytest.mark.parametrize("name", ["ddp", "fsdp", "fsdp2"])
def test_a_strategy_preset_changes_only_how_training_is_distributed(name, capsys):
    base = resolved(capsys, "distill_fada_fast.yaml")
    mine = resolved(capsys, "distill_fada_fast.yaml", f"strategies/{name}.yaml")
    changed = differences(base, mine)
    allowed = {"trainer.strategy", "trainer.precision", "trainer.accelerator", "trainer.devices"}
    assert {k.split(".init_args")[0] if k.startswith("trainer.strategy") else k for k in changed} <= allowed, changed
    assert changed["trainer.precision"] == ("32-true", "bf16-mixed")
    strategy = mine["trainer"]["strategy"]["class_path"]
    assert strategy == {"ddp": "lightning.pytorch.strategies.DDPStrategy", "fsdp": "fada_lightning.strategies.FSDP",
                        "fsdp2": "fada_lightning.strategies.FSDP2"}[name]


def test_the_plateau_budget_adds_its_stop_rule_to_a_distillation_config(capsys):
    base = resolved(capsys, "distill_perflow.yaml")
    budget = resolved(capsys, "distill_perflow.yaml", "budgets/plateau.yaml")
    callbacks = [c["class_path"] for c in budget["trainer"]["callbacks"]]
    assert callbacks == [c["class_path"] for c in base["trainer"]["callbacks"]] + [
        "fada_lightning.callbacks.Plateau", "lightning.pytorch.callbacks.ModelCheckpoint"]  # the stop, the best model
    assert [c["init_args"]["monitor"] for c in budget["trainer"]["callbacks"][-2:]] == ["val/loss", "val/loss"]
    assert budget["data"]["init_args"]["val_samples"] == 64 == 8 * budget["data"]["init_args"]["batch_size"]
    changed = differences(base, budget).keys() - {"trainer.callbacks"}
    assert changed == {"trainer.max_steps", "trainer.val_check_interval", "trainer.limit_val_batches",
                       "data.init_args.val_samples"}


TABLES = sorted(p.name for p in (bundled_config_dir() / "tables").glob("*.yaml"))


@pytest.mark.parametrize("table", TABLES)
def test_every_table_row_on_the_plateau_budget_counts_its_students_updates(table, capsys):
    """plateau.yaml validates every 25 steps and caps at 3000, steps of a student that updates every step.
    A row whose student updates every k-th step (DMD's G) must scale both by k, or the rule stops it
    after a few of the student's updates (DMD at step 150: 30 of G's updates)."""
    from jsonargparse import ArgumentParser

    from distillers.base import Distiller
    from fada_lightning.ablate import Ablation, load_ablation

    budget = yaml.safe_load((bundled_config_dir() / "budgets" / "plateau.yaml").read_text())["trainer"]
    spec = load_ablation(f"tables/{table}")
    rows = [row for row in spec["rows"] if "budgets/plateau.yaml" in row.get("fit", [])]
    assert rows, f"{table} trains no row on the plateau budget"
    parser = ArgumentParser()
    parser.add_subclass_arguments(Distiller, "distiller")
    for row in rows:
        config = resolved_args(capsys, Ablation(spec).fit_args(row, 0))
        distiller = parser.instantiate_classes(parser.parse_object(
            {"distiller": config["model"]["init_args"]["distiller"]})).distiller
        every = distiller.student_every
        assert (config["trainer"]["val_check_interval"], config["trainer"]["max_steps"]) == (
            budget["val_check_interval"] * every, budget["max_steps"] * every), (row["name"], every)
    assert table != "distillers.yaml" or {row["name"] for row in rows} >= {"DMD (4 NFE)", "TurboTalk (1 NFE)"}

