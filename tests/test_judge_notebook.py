"""notebooks/03_judge.ipynb runs under papermill on a hand-made generations.parquet."""
import json

import pandas as pd
import pytest

from lib import judge, judge_health
from lib.config import RunConfig
from tests.fakes.judge_inputs import write_generations, write_prompts

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_judge_notebook_runs_with_papermill(tmp_path):
    import papermill as pm

    out = tmp_path / "outputs"
    write_generations(out, run_id="nb_run", n=3)
    params = {"run_id": "nb_run", "outputs_dir": str(out), "judge_prompts": str(write_prompts(tmp_path)),
              "judge_min_mass": 0.0, "device": "cpu"}
    rendered = tmp_path / "03_judge.ipynb"
    pm.execute_notebook(str(REPO / "notebooks" / "03_judge.ipynb"), str(rendered), parameters=params,
                        kernel_name="python3", progress_bar=False, cwd=str(REPO))
    cfg = RunConfig(**params)
    table = pd.read_parquet(judge.judgments_path(cfg))
    assert len(table) == 6 and (table["label"] == "number").all()
    text = rendered.read_text()
    assert "Demo judge" in text and "figure: judge_scores_hf-embedded_tiny-exact" in text
    assert (cfg.run_dir / "figures" / "judge_scores_hf-embedded_tiny-exact.png").exists()
    # the judge health verdict of this table is shown (lib.judge_health, whatever judge_min_mass is)
    verdict, _ = judge_health.overall_verdict(judge_health.health_table(table))
    assert f"Judge health: {verdict}." in text


def test_notebook_parameters_are_the_judge_fields():
    nb = json.loads((REPO / "notebooks" / "03_judge.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    names = {line.split(":")[0] for line in "".join(cell["source"]).splitlines() if line.strip()}
    assert {"run_id", "outputs_dir", "seed", "question_sets", "domain", "judge_backend", "judge_model",
            "judge_method", "judge_min_mass", "judge_budget_usd"} <= names
