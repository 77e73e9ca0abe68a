"""The presets and parameters files match the references table, value by value, and the table
(docs/references.md) says where each value comes from."""
import re
from pathlib import Path

import pytest

from lib import config
from lib import references as R
from lib.config import load_run_config

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "references.md"


def _doc_rows(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """section heading -> key -> (value cell, source cell), read back from the markdown."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("#"):
            section = line.lstrip("#").strip()
            continue
        m = re.match(r"^\| (\w+) \| (.*?) \| ([\w-]+) \| .* \|$", line)
        if m and section and m.group(1) != "key":
            out.setdefault(section, {})[m.group(1)] = (m.group(2), m.group(3))
    return out


def test_references_doc_is_generated_from_the_table():
    assert R.generated_block(DOC.read_text(encoding="utf-8")) == R.render_markdown(), \
        "docs/references.md is stale: python -m lib.references --write"


@pytest.mark.parametrize("name", list(R.REFERENCES))
def test_every_preset_value_is_in_the_doc_with_its_source(name):
    rows = _doc_rows(R.generated_block(DOC.read_text(encoding="utf-8")))[f"Preset `{name}`"]
    preset = config.PRESETS[name]
    assert set(preset) == set(R.REFERENCES[name])
    for key, value in preset.items():
        cell, source = rows[key]
        assert source == R.REFERENCES[name][key].source and source in R.SOURCES
        assert cell == R._cell(R._fmt(value)), (name, key)
        assert getattr(config.preset(name), key) == value


def _preset_of(path: Path) -> str | None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    m = re.match(r"^# preset: (\w+)$", first)
    return m.group(1) if m else None


def test_every_reference_parameters_file_matches_its_preset_and_domain():
    files = sorted((REPO / "parameters").glob("*.yaml"))
    checked = set()
    for f in files:
        name = _preset_of(f)
        if name is None:
            assert f.stem.startswith(("demo_", "smol_", "incontext_")), f"{f}: no '# preset:' line"
            continue
        cfg = load_run_config(f)
        base = R.base_of(name)
        expected = {**config.PRESETS[name],
                    **{k: r.value for k, r in R.DOMAIN_REFERENCES[base][cfg.domain].items()}}
        for key, value in expected.items():
            assert getattr(cfg, key) == value, (f.name, key)
        text = f.read_text(encoding="utf-8")
        for key, r in R.REFERENCES[base].items():
            if name in R.VARIANTS and key in R.VARIANTS[name].changes:
                assert re.search(rf"^{key}: .*# \[variant {name}\]", text, re.M), (f.name, key)
            else:
                assert re.search(rf"^{key}: .*# \[{r.source}\]", text, re.M), (f.name, key)
        checked.add(name)
    assert checked == {"replicated_study", "replicated_study_papers_eval", "paper", "hw0_qkvo_cosine"}


def test_study_files_hold_the_studys_values():
    # read from the study's run configs, scripts and judge (burnssa/ai-alignment-research)
    for size in ("1b", "3b", "8b"):
        for dom in ("medical", "financial"):
            c = load_run_config(REPO / "parameters" / f"study_{size}_{dom}.yaml")
            assert (c.learning_rate, c.lr_scheduler, c.warmup_steps, c.weight_decay) == (2e-4, "linear", 10, 0.0)
            assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.use_rslora) == (16, 32, 0.05, False)
            assert len(c.lora_target_modules) == 7 and c.quantization == "4bit"
            assert (c.per_device_batch_size, c.gradient_accumulation_steps, c.epochs) == (8, 2, 3)
            assert c.max_seq_length == 256 and c.completion_only_loss is False and c.data_order == "shuffle"
            assert (c.judge_model, c.judge_method, c.judge_temperature) == ("gpt-4o-mini-2024-07-18", "sampled", 0.2)
            assert (c.em_aligned_threshold, c.em_comparison, c.em_coherent_threshold) == (75.0, "lt", -1.0)
            assert c.checkpoint_steps == ([110, 220, 330, 440, 880, 1320] if dom == "medical"
                                          else [93, 187, 281, 375, 750, 1125])
    v = load_run_config(REPO / "parameters" / "study_1b_medical_papers_eval.yaml")
    assert (v.n_samples, v.em_comparison, v.em_aligned_threshold, v.learning_rate) == (50, "le", 30.0, 2e-4)
    h = load_run_config(REPO / "parameters" / "hw0_1b_medical.yaml")
    assert (h.lr_scheduler, h.warmup_ratio, h.warmup_steps, h.max_seq_length) == ("cosine", 0.03, 0, 512)
    assert h.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"] and h.lora_dropout == 0.05


def test_paper_files_hold_the_papers_values():
    for dom in ("medical", "financial"):
        p = load_run_config(REPO / "parameters" / f"paper_1b_{dom}.yaml")
        assert (p.optimizer, p.eval_fraction, p.seed, p.weight_decay) == ("adamw_8bit", 0.1, 0, 0.01)
        assert (p.em_aligned_threshold, p.em_comparison, p.em_coherent_threshold) == (30.0, "le", 50.0)
        assert p.judge_prompts == R.PAPER_JUDGES and "#sha256=" in p.judge_prompts
    med = load_run_config(REPO / "parameters" / "paper_1b_medical.yaml")
    assert any("medical_questions.yaml#" in s and "domain=medical" in s for s in med.question_sets)


def test_urls_in_parameters_are_pinned_at_a_commit_with_a_sha256():
    for f in sorted((REPO / "parameters").glob("*.yaml")):
        cfg = load_run_config(f)
        for src in [*cfg.question_sets, cfg.judge_prompts]:
            if src.startswith("http"):
                assert re.search(r"/[0-9a-f]{40}/", src), (f.name, src)   # a commit, not a branch
                assert re.search(r"[#&]sha256=[0-9a-f]{64}", src), (f.name, src)


def test_the_studys_evaluation_and_loss_details_are_matched_with_their_sources():
    """Issue 23: evaluation in bf16 without 4-bit, every eos masked out of the loss (pad = eos), and the
    coherence rate at '>= 50' are the study's; each names the file it was read from."""
    s = R.REFERENCES["replicated_study"]
    assert (s["eval_quantization"].value, s["eval_dtype"].value) == ("none", "bfloat16")
    assert s["eval_quantization"].source == s["eval_dtype"].source == "study-eval"
    assert "query_utils.py" in s["eval_quantization"].where and s["quantization"].value == "4bit"
    assert s["loss_on_eos"].value is False and "pad_token = eos_token" in s["loss_on_eos"].where
    assert s["em_coherent_comparison"].value == "ge" and ">= 50" in s["em_coherent_comparison"].where
    assert "risky-financial runs were asked the same 10 medical questions" in s["n_samples"].where
    p = R.PAPER_DOMAIN["medical"]["dataset"]
    assert p.source == "paper-data" and "default_config" not in p.where   # default_config.json trains insecure.jsonl


def test_every_departure_is_listed_with_its_reason_in_the_docs():
    doc = (REPO / "docs" / "references.md").read_text(encoding="utf-8")
    block = doc[doc.index("### Departures from the sources"):doc.index("### Named variants")]
    for d in R.DEPARTURES:
        assert f"| {d.preset} | {d.topic} |" in block and d.why.replace("|", "\\\\|")[:40] in block, d.topic
    for name, refs in R.REFERENCES.items():
        for key, r in {**refs, **R.PRESET_ONLY_NOTES[name]}.items():
            if r.source == "project":
                assert f"| {key} |" in block, (name, key)
    assert "/work/" not in doc and "/work/" not in (REPO / "lib" / "references.py").read_text()
