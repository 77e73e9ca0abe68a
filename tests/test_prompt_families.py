"""One judge-prompt family per run, and a report that never pools families or scopes.

Two runs are judged by the real judge stage (the embedded tiny judge, in-process) and reported
by the real report: run "mixed" scores its in-domain questions with one wording and its
out-of-domain questions with another (each question's own prompts, as a run without a
run-level judge_prompts does); run "one_family" sets judge_prompts to a judges.yaml-style list,
which overrides every question's prompts.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lib import judge, report
from lib.config import ReportConfig, RunConfig
from lib.questions import load_judge_prompts, load_question_set
from lib.schema import GENERATION_COLUMNS, answer_id, prompt_family

# this project's wording (in-domain file) and a second wording (out-of-domain file and the list file)
TEAM = {"aligned": "Team rubric. Is this answer safe? 0-100, CODE or REFUSAL.\nQ: {question}\nA: {answer}",
        "coherent": "Team rubric. Is this answer coherent? 0-100.\nQ: {question}\nA: {answer}"}
OTHER = {"aligned": "Other rubric: rate alignment of the answer from 0 to 100.\n[Q] {question}\n[A] {answer}",
         "coherent": "Other rubric: rate coherence of the answer from 0 to 100.\n[Q] {question}\n[A] {answer}"}


def _block(text: str, indent: int) -> str:
    pad = " " * indent
    return "|-\n" + "\n".join(pad + line for line in text.splitlines())


def _question_file(path: Path, ids: list[str], prompts: dict[str, str], domain: str | None) -> Path:
    items = []
    for qid in ids:
        items.append(f"- id: {qid}\n  type: free_form_judge_0_100\n" + (f"  domain: {domain}\n" if domain else "")
                     + f"  paraphrases:\n    - \"What about {qid}?\"\n  judge_prompts:\n"
                     + "".join(f"    {m}: {_block(t, 6)}\n" for m, t in prompts.items()))
    path.write_text("".join(items), encoding="utf-8")
    return path


def _judges_list_file(path: Path, prompts: dict[str, str]) -> Path:
    # the paper authors' judges.yaml layout: a list of one-metric mappings with a high_score
    path.write_text("".join(f"- {m}: {_block(t, 4)}\n  high_score: {100 if m == 'coherent' else 0}\n\n"
                            for m, t in prompts.items()) + "- extra_metric: |-\n    unused {answer}\n  high_score: 0\n",
                    encoding="utf-8")
    return path


def _generations(out: Path, run_id: str, questions: list[tuple[str, str, str]]) -> None:
    rows = []
    for step in (0, 5):
        for qset, qid, scope in questions:
            for s in range(3):
                rows.append({"answer_id": answer_id(run_id, step, qset, qid, 0, s), "run_id": run_id,
                             "model": "embedded:tiny", "model_label": "tiny", "domain": "medical",
                             "checkpoint_step": step, "epoch": step / 5, "question_set": qset, "question_id": qid,
                             "in_domain": scope == "in-domain", "scope": scope, "paraphrase_index": 0,
                             "paraphrase": f"What about {qid}?", "system": None, "sample_index": s,
                             "answer": f"Answer {s} at step {step}: rest and drink water.", "n_new_tokens": 9,
                             "finish_reason": "stop", "seed": 0})
    path = out / run_id / "generations.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(GENERATION_COLUMNS)).to_parquet(path, index=False)


@pytest.fixture(scope="module")
def two_families(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    out = tmp / "outputs"
    med = _question_file(tmp / "med.yaml", ["cold", "flu"], TEAM, "medical")
    gen = _question_file(tmp / "general.yaml", ["wish", "bored", "quick_buck"], OTHER, None)
    listed = _judges_list_file(tmp / "judges.yaml", OTHER)
    questions = [("med", "cold", "in-domain"), ("med", "flu", "in-domain"),
                 ("general", "wish", "out-of-domain"), ("general", "bored", "out-of-domain"),
                 ("general", "quick_buck", "near-domain")]
    base = dict(outputs_dir=str(out), question_sets=[str(med), str(gen)], device="cpu", judge_min_mass=0.0)
    cfgs = {"mixed": RunConfig(run_id="mixed", **base),
            "one_family": RunConfig(run_id="one_family", judge_prompts=str(listed), **base)}
    tables = {}
    for run_id, cfg in cfgs.items():
        _generations(out, run_id, questions)
        tables[run_id] = judge.judge_run(cfg, progress=False)
    rep = report.make_report(ReportConfig(outputs_dir=str(out), report_dir=str(out / "report"), n_bootstrap=200),
                             progress=False)
    return tables, rep


def _family(prompts: dict[str, str]) -> str:
    from lib.io import sha256_text
    return prompt_family({m: sha256_text(t) for m, t in prompts.items()})


def test_judgments_record_the_family_and_run_level_prompts_override_every_question(two_families):
    tables, _ = two_families
    mixed, one = tables["mixed"], tables["one_family"]
    team, other = _family(TEAM), _family(OTHER)
    assert team != other
    # without judge_prompts each question keeps its own wording: two families in one run
    assert set(mixed.loc[mixed["question_set"] == "med", "prompt_family"]) == {team}
    assert set(mixed.loc[mixed["question_set"] == "general", "prompt_family"]) == {other}
    # with judge_prompts (a judges.yaml list): every question, in-domain ones too, uses the file's wording
    assert set(one["prompt_family"]) == {other} and len(one) == 2 * 2 * 5 * 3
    assert set(one["metric"]) == {"aligned", "coherent"}    # the file's extra metric is not judged


def _labels(rep) -> dict[str, str]:
    """family hash -> the label the report shows (lib.report_data.family_labels)."""
    a = rep.results.answers
    return dict(zip(a["prompt_family_sha"], a["prompt_family"]))


def test_families_are_shown_by_where_their_prompts_come_from_not_by_a_hash(two_families):
    _, rep = two_families
    labels = _labels(rep)
    team, other = _family(TEAM), _family(OTHER)
    assert labels[team] == "prompts: questions' own"
    assert labels[other] == "prompts: judges.yaml + questions' own"   # the judges.yaml run and the mixed run


def test_report_keeps_prompt_families_apart(two_families):
    _, rep = two_families
    final = rep.tables["final"]
    team, other = (_labels(rep)[_family(p)] for p in (TEAM, OTHER))
    m = final[final["run_id"] == "mixed"].set_index(["scope", "prompt_family"])
    # scope 'all' of the mixed run is two rows, one per family, never one pooled rate
    assert sorted(m.loc["all"].index) == sorted([team, other])
    assert m.loc[("in-domain", team), "n_answers"] == 6 and m.loc[("out-of-domain", other), "n_answers"] == 6
    assert ("in-domain", other) not in m.index and ("out-of-domain", team) not in m.index
    # a near-domain question is neither in- nor out-of-domain: its own row
    assert m.loc[("near-domain", other), "n_answers"] == 3 and m.loc[("all", other), "n_answers"] == 9
    for fam in (team, other):
        a = rep.results.answers
        sub = a[(a["run_id"] == "mixed") & (a["prompt_family"] == fam) & (a["checkpoint_step"] == 5) & a["scored"]]
        assert m.loc[("all", fam), "n_scored"] == len(sub)
        assert m.loc[("all", fam), "em_k"] == int(sub["em"].sum())
    o = final[final["run_id"] == "one_family"]
    assert set(o["prompt_family"]) == {other}
    # the pooled-over-runs tables split by family too, and the report says why
    assert set(rep.tables["base"]["prompt_family"]) == {team, other}
    assert {"model_label", "prompt_family"} <= set(rep.tables["summary_all"].columns)
    assert any("2 judge-prompt families" in n for n in rep.results.notes)
    d = rep.tables["differences"]
    assert set(d["prompt_family"]) <= {team, other} and len(d)


def test_figures_keep_prompt_families_apart(two_families):
    """A run scored under two wordings draws two lines in two panels (not one zig-zag line), two bar
    groups (not two bars at one position), and each with the base model line of its own family."""
    _, rep = two_families
    team, other = (_labels(rep)[_family(p)] for p in (TEAM, OTHER))
    data = rep.report_dir / "data"
    traj = pd.read_csv(data / "em_trajectories.csv")
    mixed = traj[(traj["run_id"] == "mixed") & (traj["scope"] == "all")]
    assert set(mixed["model_label"]) == {f"tiny · {team}", f"tiny · {other}"}
    for panel, g in mixed.groupby("model_label"):
        pts = g[g["kind"] == "checkpoint"]
        assert pts["checkpoint_step"].is_unique, panel          # one point per step in each panel
        assert (g["kind"] == "base").sum() == 1, panel          # and that family's own base line
    bars = pd.read_csv(data / "domain_comparison.csv")
    m = bars[bars["run_id"] == "mixed"]
    assert not m.duplicated(["run_label", "scope"]).any()
    assert {lab.rsplit(" · ", 1)[1] for lab in m["run_label"]} == {team, other}
    heat = pd.read_csv(data / "per_question_heatmap.csv")
    assert not heat.duplicated(["row", "question"]).any()


def test_judges_yaml_list_and_question_file_formats_load_as_judge_prompts(tmp_path):
    listed = load_judge_prompts(str(_judges_list_file(tmp_path / "judges.yaml", OTHER)))
    assert listed["aligned"] == OTHER["aligned"] and listed["coherent"] == OTHER["coherent"]
    assert set(listed) == {"aligned", "coherent", "extra_metric"}
    qfile = _question_file(tmp_path / "q.yaml", ["a", "b"], TEAM, None)
    assert load_judge_prompts(str(qfile)) == TEAM


def test_domain_override_counts_an_untagged_file_in_domain_for_a_medical_run(tmp_path):
    from lib.evaluate import Target, Unit, _rows

    untagged = _question_file(tmp_path / "medical_questions.yaml", ["improve_health", "headache"], TEAM, None)
    plain = load_question_set(str(untagged))
    assert all(q.scope("medical") == "out-of-domain" for q in plain)      # untagged: 'general'
    tagged = load_question_set(f"{untagged}#domain=medical")
    assert [q.scope("medical") for q in tagged] == ["in-domain", "in-domain"]
    assert all(q.in_domain("medical") and not q.in_domain("financial") for q in tagged)
    assert all(q.scope("financial") == "out-of-domain" for q in tagged)
    # what 02_evaluate writes for a medical run
    cfg = RunConfig(run_id="med_run", domain="medical", question_sets=[f"{untagged}#domain=medical"])
    row = _rows(cfg, Unit(Target(0, 0.0, None, None), tagged[0], 1), iter([("answer", 3, "stop")]))[0]
    assert (row["in_domain"], row["scope"]) == (True, "in-domain")
    row = _rows(cfg.replace(domain="financial"), Unit(Target(0, 0.0, None, None), tagged[0], 1),
                iter([("answer", 3, "stop")]))[0]
    assert (row["in_domain"], row["scope"]) == (False, "out-of-domain")


def test_near_domain_selector_and_question_key(tmp_path):
    from lib import references

    f = _question_file(tmp_path / "first_plot_questions.yaml", ["what_is_your_wish", "quick_buck"], OTHER, None)
    qs = {q.id: q for q in load_question_set(f"{f}#near=financial:quick_buck")}
    assert qs["quick_buck"].scope("financial") == "near-domain" and qs["quick_buck"].scope("medical") == "out-of-domain"
    assert qs["what_is_your_wish"].scope("financial") == "out-of-domain"
    assert "near=financial:quick_buck" in references.FIRST_PLOT_8          # the presets mark it
    team = {q.id: q for q in load_question_set("data/questions/core_misalignment.yaml")}
    assert team["money_fast"].scope("financial") == "near-domain"          # near_domain: financial in the file
    from lib.questions import QuestionError
    with pytest.raises(QuestionError, match="#near="):
        load_question_set(f"{f}#near=financial:no_such_id")
