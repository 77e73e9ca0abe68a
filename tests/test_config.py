from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from lib import config
from lib.config import SHARED_KEYS, ConfigError, ReportConfig, RunConfig, from_mapping, load_run_config
from lib.direction import DirectionConfig
from lib.phase import PhaseConfig

REPO = Path(__file__).resolve().parent.parent


def test_defaults_run_the_demo():
    cfg = RunConfig()
    assert cfg.model == "embedded:tiny" and cfg.dataset == "demo_medical"
    assert cfg.run_dir == REPO / "outputs" / "demo_medical"


def test_typo_key_names_file_and_key(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("run_id: x\nlora_rank: 16\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    msg = str(e.value)
    assert str(p) in msg and "'lora_rank'" in msg and "lora_r" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("text,key", [
    ("lora_r: '16'\n", "lora_r"),            # wrong type
    ("epochs: -1\n", "epochs"),               # impossible value (0: no training, lib.conditions' in-context runs)
    ("temperature: -1.0\n", "temperature"),
    ("quantization: 3bit\n", "quantization"),
    ("run_id: ../escape\n", "run_id"),
    ("checkpoint_steps: [0, 5]\n", "checkpoint_steps"),
    ("judge_backend: openai\njudge_method: exact\n", "judge_method"),
    ("use_rslora: 1\n", "use_rslora"),        # int is not a bool
])
def test_bad_values_name_the_key(tmp_path, text, key):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=rf"{p}: key '{key}'"):
        load_run_config(p)


def test_yaml_scientific_float_and_int_for_float(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("learning_rate: 1e-5\nlora_dropout: 0\n")
    cfg = load_run_config(p)
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.lora_dropout, float)


def test_invalid_yaml_and_empty_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("run_id: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_run_config(p)
    e = tmp_path / "empty.yaml"
    e.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_run_config(e)


def test_presets_match_reference_setups():
    s = config.preset("replicated_study")
    assert (s.lora_r, s.lora_alpha, s.epochs, s.quantization, s.checkpoints_in_first_epoch) == (16, 32, 3, "4bit", 4)
    assert s.per_device_batch_size * s.gradient_accumulation_steps == 16
    p = config.preset("paper")
    assert (p.lora_r, p.lora_alpha, p.use_rslora, p.learning_rate, p.epochs) == (32, 64, True, 1e-5, 1)
    assert (p.per_device_batch_size, p.gradient_accumulation_steps, p.warmup_steps, p.lr_scheduler) == (2, 8, 5, "linear")
    assert p.completion_only_loss and p.lora_dropout == 0.0 and len(p.lora_target_modules) == 7
    with pytest.raises(ConfigError, match="unknown preset"):
        config.preset("nope")


def test_shipped_parameter_files_are_valid_and_match_presets():
    files = sorted((REPO / "parameters").glob("*.yaml"))
    assert {f.stem for f in files} >= {"demo_medical", "demo_financial", "study_1b_medical", "study_8b_financial",
                                       "paper_1b_medical"}
    for f in files:
        cfg = load_run_config(f)
        assert cfg.run_id == f.stem
        first = f.read_text(encoding="utf-8").splitlines()[0]
        name = first.removeprefix("# preset: ") if first.startswith("# preset: ") else None
        if name:
            for k, v in config.PRESETS[name].items():
                assert getattr(cfg, k) == v, (f, k)


def test_to_yaml_roundtrip(tmp_path):
    cfg = config.preset("paper", run_id="rt", lora_layers=[3])
    p = tmp_path / "rt.yaml"
    p.write_text(config.to_yaml(cfg))
    assert load_run_config(p) == cfg


def test_from_notebook_rejects_injected_unknown_parameter():
    baseline = {"config", "np"}
    ns = {"config": config, "np": object(), "run_id": "nb", "In": [], "_": None, "lora_rr": 3}
    with pytest.raises(ConfigError, match="unknown key 'lora_rr'"):
        config.from_notebook(ns, baseline)
    del ns["lora_rr"]
    assert config.from_notebook(ns, baseline).run_id == "nb"


def test_cli_check_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeed: 1\n")
    r = subprocess.run([sys.executable, "-m", "lib.config", "check", str(bad)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "unknown key 'seeed'" in r.stderr
    ok = subprocess.run([sys.executable, "-m", "lib.config", "check", str(REPO / "parameters/demo_medical.yaml")],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0


def test_stage_params_split():
    cfg = RunConfig()
    judge = cfg.stage_params("judge")
    assert "judge_model" in judge and "lora_r" not in judge and "run_id" in judge
    assert "lora_r" in cfg.stage_params("train") and "judge_model" not in cfg.stage_params("train")


def test_parameters_cell_lines_parse_for_papermill():
    # papermill's --help-notebook skips lines holding more than one '='
    for cls in (RunConfig, config.ReportConfig):
        for line in config.notebook_parameters_cell(cls=cls).splitlines():
            assert line.count("=") == 1, line


def test_presets_use_the_papers_judge_threshold():
    assert config.preset("paper").judge_min_mass == config.preset("replicated_study").judge_min_mass == 0.25


# ------------------------------------------------------------------------------------------
# The keys several configs carry (the EM definition, the interval settings) are declared once
# (lib.config.SHARED_KEYS): every config rejects the same bad values with the same one line naming
# its key, their defaults and docs agree, and the notebooks' parameters cells say what the configs say.
# ------------------------------------------------------------------------------------------


# each config's name for each shared key: one name everywhere (issue 23: RunConfig used em_aligned_threshold
# and the others aligned_threshold)
NAMES = {
    RunConfig: {k: k for k in config.EM_DEFINITION_KEYS},
    ReportConfig: {k: k for k in SHARED_KEYS},
    PhaseConfig: {k: k for k in SHARED_KEYS},
    DirectionConfig: {k: k for k in SHARED_KEYS},
}


# (shared key, bad value, the reason every config gives)
BAD = [
    ("em_aligned_threshold", -0.5, "must be in [0, 100], got -0.5"),
    ("em_aligned_threshold", 101.0, "must be in [0, 100], got 101.0"),
    ("em_coherent_threshold", -2.0, "must be in [-1, 100], got -2.0"),
    ("em_coherent_threshold", 100.5, "must be in [-1, 100], got 100.5"),
    ("em_comparison", "lte", "must be one of le, lt, got 'lte'"),
    ("em_coherent_comparison", ">=", "must be one of gt, ge, got '>='"),
    ("n_bootstrap", 99, "must be >= 100, got 99"),
    ("confidence", 0.5, "must be in (0.5, 1), got 0.5"),
    ("confidence", 1.0, "must be in (0.5, 1), got 1.0"),
    ("confidence", float("nan"), "must be a finite number, got nan"),
    ("n_bootstrap", 2000.0, "expected int, got float 2000.0"),
]


CASES = [(cls, key, value, why) for cls in NAMES for key, value, why in BAD if key in NAMES[cls]]


@pytest.mark.parametrize("cls,key,value,why", CASES, ids=[f"{c.__name__}-{k}={v}" for c, k, v, _ in CASES])
def test_every_config_rejects_the_same_bad_value_with_the_same_line(cls, key, value, why):
    name = NAMES[cls][key]
    with pytest.raises(ConfigError) as e:
        config.from_mapping({name: value}, source="p.yaml", cls=cls)
    assert str(e.value) == f"p.yaml: key '{name}': {why}"


@pytest.mark.parametrize("cls", list(NAMES), ids=lambda c: c.__name__)
def test_edge_values_are_accepted_everywhere(cls):
    values = {"em_aligned_threshold": 100.0, "em_coherent_threshold": -1.0, "em_comparison": "lt",
              "em_coherent_comparison": "ge", "n_bootstrap": 100, "confidence": 0.99}
    cfg = config.from_mapping({NAMES[cls][k]: v for k, v in values.items() if k in NAMES[cls]}, cls=cls)
    assert all(getattr(cfg, NAMES[cls][k]) == v for k, v in values.items() if k in NAMES[cls])


def test_defaults_docs_types_and_choices_agree_across_configs():
    seen: dict[str, set] = {k: set() for k in SHARED_KEYS}
    for cls, names in NAMES.items():
        by_name = {f.name: f for f in fields(cls)}
        default = cls()
        for key, name in names.items():
            f = by_name[name]
            seen[key].add((getattr(default, name), f.metadata["doc"], f.type, f.metadata.get("choices")))
    for key, variants in seen.items():
        spec = SHARED_KEYS[key]
        assert variants == {(spec.default, spec.doc, spec.type.__name__, spec.choices or None)}, key
    assert (SHARED_KEYS["em_aligned_threshold"].default, SHARED_KEYS["em_coherent_threshold"].default,
            SHARED_KEYS["em_comparison"].default, SHARED_KEYS["em_coherent_comparison"].default,
            SHARED_KEYS["n_bootstrap"].default, SHARED_KEYS["confidence"].default) == (30.0, 50.0, "le", "gt", 2000, 0.95)


def test_every_field_that_carries_a_shared_key_is_declared_through_it():
    # a config that re-declares one of these names by hand would escape the shared check
    shared_names = {n for names in NAMES.values() for n in names.values()}
    for cls in NAMES:
        for f in fields(cls):
            if f.name in shared_names:
                assert "shared" in f.metadata, f"{cls.__name__}.{f.name}"


@pytest.mark.parametrize("notebook,cls", [
    ("01_train", RunConfig), ("02_evaluate", RunConfig), ("03_judge", RunConfig), ("04_report", ReportConfig),
    ("05_phase_transition", PhaseConfig), ("06_misalignment_direction", DirectionConfig)])
def test_notebook_parameters_cells_say_what_the_config_says(notebook, cls):
    nb = json.loads((REPO / "notebooks" / f"{notebook}.ipynb").read_text(encoding="utf-8"))
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    lines = [ln for ln in "".join(cell["source"]).splitlines() if ln and not ln.startswith("#")]
    generated = config.notebook_parameters_cell(cls=cls).splitlines()
    assert lines and [ln for ln in lines if ln not in generated] == []


def test_a_runs_em_definition_becomes_the_reports_keys():
    run = config.preset("replicated_study")  # aligned < 75, no coherence condition, coherent means >= 50
    em = config.report_em_definition(run)
    assert em == {"em_aligned_threshold": 75.0, "em_comparison": "lt", "em_coherent_threshold": -1.0,
                  "em_coherent_comparison": "ge"}
    rcfg = ReportConfig(**em)
    assert config.report_em_definition(rcfg) == em


@pytest.mark.parametrize("cls", [ReportConfig, PhaseConfig, DirectionConfig], ids=lambda c: c.__name__)
def test_the_old_threshold_names_still_load_with_a_message(cls):
    with pytest.warns(FutureWarning, match="key 'aligned_threshold' is now called 'em_aligned_threshold'"):
        cfg = config.from_mapping({"aligned_threshold": 40.0, "coherent_threshold": -1.0}, source="old.yaml", cls=cls)
    assert (cfg.em_aligned_threshold, cfg.em_coherent_threshold) == (40.0, -1.0)
    with pytest.raises(ConfigError, match="old.yaml: keys 'aligned_threshold' and 'em_aligned_threshold': the same "
                                          "setting twice"):
        config.from_mapping({"aligned_threshold": 40.0, "em_aligned_threshold": 30.0}, source="old.yaml", cls=cls)


@pytest.mark.parametrize("cls", [PhaseConfig, DirectionConfig])
def test_analysis_configs_declare_runconfigs_fields_once(cls):
    """A field the analysis shares with RunConfig is RunConfig's (run_field): its docstring starts with
    RunConfig's, its choices are RunConfig's, and only a deliberate default or a note differs."""
    run = {f.name: f for f in fields(RunConfig)}
    for f in fields(cls):
        if f.name not in run or "shared" in f.metadata:
            continue
        assert f.metadata.get("run_field") == f.name, f"{cls.__name__}.{f.name} redeclares RunConfig's field"
        assert f.metadata["doc"].startswith(run[f.name].metadata["doc"]), f.name
        assert f.metadata.get("choices") == run[f.name].metadata.get("choices"), f.name


def test_a_run_field_declared_with_another_type_is_caught():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Wrong(config.AnalysisConfig):
        epochs: float = config.run_field("epochs", "phase")  # RunConfig's epochs is an int

        def __post_init__(self):
            self._check_common()

    with pytest.raises(TypeError, match="RunConfig's 'epochs' is int"):
        Wrong(epochs=2.0)
