"""`fada ablate` and `fada evaluate`: every ablation YAML loads and its rows resolve as `fada fit` configs,
bad specs are clear errors, NFE-D is counted, and a quick ablation runs end to end and resumes."""
import json

import pytest
import yaml

from fada_lightning import ablate, evaluate
from fada_lightning.cli import main as fada
from fada_lightning.presets import bundled_config_dir

ABLATION_SPECS = sorted(p.name for p in (bundled_config_dir() / "tables").glob("*.yaml"))


def test_the_issue_s_ablations_are_bundled():
    assert ABLATION_SPECS == ["cfg.yaml", "cfg_sweep.yaml", "distillers.yaml", "mixed.yaml"]


@pytest.mark.parametrize("name", ABLATION_SPECS)
def test_every_ablation_yaml_loads_and_each_row_resolves_as_a_fit_config(name, capsys):
    spec = ablate.load_ablation(f"tables/{name}")
    ablation = ablate.Ablation(spec)
    for row in spec["rows"]:
        if "fit" not in row:
            assert row["checkpoint_of"] in {r["name"] for r in spec["rows"]}
            continue
        with pytest.raises(SystemExit) as done:  # the very command line `fada ablate` runs, printed instead
            fada([*ablation.fit_args(row), "--print_config"])
        assert done.value.code in (0, None), row["name"]
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["trainer"]["logger"]["init_args"]["save_dir"] == str(ablation.run_dir(row))
        for key, value in row["overrides"].items():  # each override lands where its dotted key says
            found = printed
            for part in key.split("."):
                found = found[part]
            assert found == value, (row["name"], key, found)


def test_the_sweep_expands_into_evaluation_rows_of_one_checkpoint():
    spec = ablate.load_ablation("tables/cfg_sweep.yaml")
    sweep = [row for row in spec["rows"] if "sweep" in row]
    assert len(sweep) == 7 + 5 and all(row["checkpoint_of"] == "FADA-Fast" for row in sweep)
    assert {(r["evaluate"]["ref_scale"], r["evaluate"]["audio_scale"]) for r in sweep if r["sweep"] == "ref_scale"} == \
        {(s, 6.5) for s in (1.0, 1.5, 2.0, 2.5, 3.0)}


@pytest.mark.parametrize("rows, message", [
    ([{"name": "a", "fit": ["teacher.yaml"], "checkpoint_of": "a"}], "exactly one of"),
    ([{"name": "s", "fit": ["distill_perflow.yaml"], "teacher": "t"}], "is not a row above it"),
    ([{"name": "t", "fit": ["teacher.yaml"]}, {"name": "s", "fit": ["distill_turbo.yaml"], "teacher": "t", "student": "d"}],
     "student .d. is not a row above it"),
    ([{"name": "a", "fit": ["teacher.yaml"]}, {"name": "a", "fit": ["teacher.yaml"]}], "repeat"),
    ([{"name": "a", "fit": ["no_such_config.yaml"]}], "no_such_config"),
    ([{"name": "A + B", "Fixed-0": None, "fit": ["teacher.yaml"]}], r"unknown keys \['Fixed-0'\]"),
])
def test_a_bad_ablation_is_one_clear_error(tmp_path, rows, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"rows": rows}))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ablate.load_ablation(path)


def test_evaluate_counts_nfe_as_the_samplers_do_and_records_what_the_numbers_depend_on(teacher_ckpt, tmp_path):
    from fada_lightning.metrics import synthetic

    evaluator = evaluate.VideoEvaluator(*(getattr(synthetic, role)() for role in
                                          ("WorldFrames", "WorldVideo", "WorldExpression", "WorldQuality", "WorldSync")))
    # held-out clips only: the world's training tiers as small as they go (the defaults render 768 clips)
    data = {"synthetic": {"root": str(tmp_path / "data"), "strict_clips": 4, "lenient_clips": 0, "clips_per_shard": 4,
                          "size": 32, "progress": False}}
    common = dict(clips=3, frames=8, batch_size=3, data=data, videos=1, progress=False)
    full = evaluate.evaluate(teacher_ckpt, evaluator, steps=2, out=str(tmp_path / "full.json"), **common)
    one_pass = evaluate.evaluate(teacher_ckpt, evaluator, steps=2, ref_scale=1.0, audio_scale=1.0,
                                 out=str(tmp_path / "s1.json"), **common)
    assert full["metrics"]["NFE-D"] == 2 * 3 and one_pass["metrics"]["NFE-D"] == 2 * 3  # Eq 9: three passes a step
    saved = json.loads((tmp_path / "full.json").read_text())
    assert set(saved["metrics"]) >= set(evaluate.COLUMNS)
    depends = saved["depends_on"]
    assert (depends["clips"], depends["frames_per_clip"], depends["resolution"]) == (3, 8, 32)
    assert depends["sampler"]["steps"] == 2 and depends["sampler"]["ref_scale"] == 2.5
    assert set(depends["extractors"]) == {"frame_features", "video_features", "expression", "quality", "sync"}
    assert len(saved["per_clip"]) == 3 and list((tmp_path).glob("full-*.mp4"))


def quick_spec(tmp_path) -> dict:
    data = {"root": str(tmp_path / "data"), "strict_clips": 8, "lenient_clips": 0, "clips_per_shard": 4,
            "frames": 20, "size": 32, "progress": False}
    tiny = {"data.init_args.synthetic": data, "data.init_args.val_samples": 2, "trainer.limit_val_batches": 1,
            "model.init_args.clip_frames": 4}
    return {"name": "tiny", "out": str(tmp_path / "ablation"), "eval_overrides": {"data": {"synthetic": {"root": str(tmp_path / "data")}}},
            "rows": [{"name": "Teacher", "fit": ["teacher.yaml"], "overrides": {**tiny, "model.init_args.sample_steps": 2},
                      "reference": True},
                     {"name": "Student", "fit": ["distill_perflow.yaml"], "teacher": "Teacher",
                      "overrides": {**{k: v for k, v in tiny.items() if k != "model.init_args.clip_frames"},
                                    "model.init_args.distiller.init_args.solver_steps": 1}}],
            "sweep": {"model": "Student", "fixed": {"ref_scale": 2.0, "audio_scale": 6.5}, "audio_scale": [1.0, 6.5]},
            "quick": ["Teacher", "Student", "Student s_a=1", "Student s_a=6.5"]}


@pytest.mark.slow
def test_ablate_quick_runs_end_to_end_and_resumes_after_its_first_row(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(quick_spec(tmp_path)))
    ablate.main(["--config", str(path), "--quick", "--row", "Teacher"])
    out = tmp_path / "ablation-quick"
    first = out / "Teacher" / "result.json"
    stamp = first.stat().st_mtime_ns
    assert "Not finished yet: Student" in (out / "table.md").read_text()

    ablate.main(["--config", str(path), "--quick"])  # picks up where the first call stopped
    assert "Teacher: finished earlier" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == stamp
    table = (out / "table.md").read_text()
    assert all(name in table for name in ("Teacher", "Student", "Student s_a=1", "Student s_a=6.5"))
    header, *lines = (out / "table.csv").read_text().strip().splitlines()
    assert header.startswith("Method,NFE-D,IQA,Sync-D,Sync-C,FVD,FID,E-FID") and len(lines) == 4
    assert json.loads((out / "Student_s_a_1" / "result.json").read_text())["depends_on"]["sampler"]["audio_scale"] == 1.0
    assert (out / "sweep_audio_scale.png").read_bytes()[:4] == b"\x89PNG"

    ablate.main(["--config", str(path), "--quick", "--collect"])  # the table alone, from finished runs
    assert "finished earlier" not in capsys.readouterr().out
