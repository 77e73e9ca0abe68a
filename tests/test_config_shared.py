"""The keys several configs carry (the EM definition, the interval settings) are declared once
(lib.config.SHARED_KEYS): every config rejects the same bad values with the same one line naming
its key, their defaults and docs agree, and the notebooks' parameters cells say what the configs say."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from lib import config
from lib.config import SHARED_KEYS, ConfigError, ReportConfig, RunConfig
from lib.direction import DirectionConfig
from lib.phase import PhaseConfig

REPO = Path(__file__).resolve().parent.parent

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
