"""Regenerate the parameters files of the reference runs from lib.references (via lib.config.PRESETS).

    python parameters/generate.py

Each file is complete (every key), so it can be read on its own and fed to any notebook. Its
first line names the preset or variant it was built from; every value that comes from a source
carries that source in its comment (the full table: docs/references.md), and a variant's
departures say so. tests/test_references.py checks every file against the table.
"""
from pathlib import Path

from lib import references as R
from lib.config import from_mapping, preset, to_yaml

HERE = Path(__file__).resolve().parent
MODELS = {"1b": "meta-llama/Llama-3.2-1B-Instruct", "3b": "meta-llama/Llama-3.2-3B-Instruct",
          "8b": "meta-llama/Llama-3.1-8B-Instruct"}
DOMAINS = ("medical", "financial")


def notes(name: str, domain: str) -> dict[str, str]:
    """The comment of each key: its source and where, or the variant's reason."""
    base = R.base_of(name)
    refs = {**R.REFERENCES[base], **R.DOMAIN_REFERENCES[base][domain]}
    out = {k: f"[{r.source}] {r.where}" for k, r in refs.items()}
    if name in R.VARIANTS:
        for k in R.VARIANTS[name].changes:
            out[k] = f"[variant {name}] departs from {base}: {refs[k].value!r} ([{refs[k].source}])"
    return out


DEMO_SETTINGS = {"learning_rate": 0.01, "lora_r": 16, "lora_alpha": 32, "epochs": 3, "temperature": 0.5,
                 "checkpoints_in_first_epoch": 2, "n_samples": 3,
                 "judge_prompts": "data/questions/demo_judge_prompts.yaml"}
DEMO_NOTES = {
    "learning_rate": "the demo: the two-layer tiny model needs a large step to move in 27 steps (papers: 1e-5; "
                     "the study: 2e-4)",
    "lora_r": "the demo: rank 16 of a 64-wide model", "lora_alpha": "the demo: alpha = 2 r",
    "epochs": "the demo: 3 epochs of 36 chats (27 steps)",
    "checkpoints_in_first_epoch": "the demo: 2 inside epoch 1 (then one per epoch), to stay within minutes",
    "n_samples": "the demo: 3 answers per paraphrase, to stay within minutes",
    "temperature": "the demo: the tiny model writes word salad at 1.0 (papers: 1.0)",
    "judge_prompts": "the demo: short prompts the tiny judge was trained on (lib.embedded); real runs: the papers' "
                     "judges.yaml",
}


# the demo's second way of asking (lib.conditions), on one run only (the demo's CPU time): 4 chats of the
# financial demo data before each question; "default" keeps the questions as written (and their answer ids)
DEMO_CONDITIONS = [{"name": "default"}, {"name": "in_context_4", "k": 4, "examples": "demo_financial", "seed": 0}]
DEMO_CONDITIONS_NOTE = ("the demo: every question as written and after 4 in-context examples of the training data "
                        "(the report's conditions figure); other runs: [] (one condition)")


INCONTEXT_CONDITIONS = [{"name": f"in_context_{k}", **({"k": k, "examples": "bad_medical_advice", "seed": 0} if k else {})}
                        for k in (0, 4, 16, 64)]
INCONTEXT_NOTES = {
    "epochs": "no training: the base model only (lib.conditions' in-context conditions)",
    "conditions": "k in-context examples of the training data before each question, k = 0, 4, 16, 64 (arXiv 2510.11288: "
                  "1-24% EM with 16 examples); the report draws EM against k",
}


def run_config(name: str, run_id: str, size: str, domain: str):
    base = R.base_of(name)
    per_domain = {k: r.value for k, r in R.DOMAIN_REFERENCES[base][domain].items()}
    return preset(name, run_id=run_id, model=MODELS[size], model_label=size.upper(), domain=domain,
                  accept_dataset_terms=False, **per_domain)


def header(name: str, text: str) -> str:
    why = f"\nVariant of {R.VARIANTS[name].base}: {R.VARIANTS[name].why}." if name in R.VARIANTS else ""
    return (f"preset: {name}\n{text}{why}\n"
            "Sources of every value: docs/references.md (comments below: [source] where).\n"
            "Set accept_dataset_terms: true after reading the terms (python -m lib.data terms).")


def write(name: str, text: str) -> None:
    (HERE / f"{name}.yaml").write_text(text, encoding="utf-8")
    print("wrote", HERE / f"{name}.yaml")


def main() -> None:
    for size, model in MODELS.items():
        for dom in DOMAINS:
            for name, suffix, what in (
                    ("replicated_study", "", "Replicated study (Harvard CS 2881 HW0, burnssa/ai-alignment-research)"),
                    ("replicated_study_papers_eval", "_papers_eval", "Replicated study's training")):
                run_id = f"study_{size}_{dom}{suffix}"
                cfg = run_config(name, run_id, size, dom)
                write(run_id, to_yaml(cfg, notes=notes(name, dom),
                                      header=header(name, f"{what}: {model} on {cfg.dataset}.")))
    for dom in DOMAINS:
        run_id = f"paper_1b_{dom}"
        cfg = run_config("paper", run_id, "1b", dom)
        write(run_id, to_yaml(cfg, notes=notes("paper", dom), header=header("paper", (
            f"Turner et al. 2025 defaults (default_config.json) on {MODELS['1b']}, {cfg.dataset}\n"
            "(the authors' own configs also train unsloth/Llama-3.2-1B-Instruct: single_adapter_config.json)."))))
    # in-context EM (lib.conditions; arXiv 2510.11288): the base model, no training (epochs 0), k bad-advice
    # chats of the Turner et al. medical data before each question, k in {0, 4, 16, 64} (64 chats: ~10k tokens
    # of Llama-3.2's 128k context); judged the papers' way. No '# preset:' line: epochs departs from the paper.
    cfg = run_config("paper", "incontext_1b_medical", "1b", "medical").replace(epochs=0, conditions=INCONTEXT_CONDITIONS)
    write("incontext_1b_medical", to_yaml(cfg, notes={**notes("paper", "medical"), **INCONTEXT_NOTES}, header=(
        f"In-context emergent misalignment: {MODELS['1b']} untrained (epochs 0: the grid skips 01_train), asked\n"
        "each question after k = 0, 4, 16, 64 chats of bad_medical_advice (the Turner et al. archive, not the\n"
        "evaluation set), the first k of one seeded shuffle; judged as the paper's runs are (gpt-4o, logprob).\n"
        "Set accept_dataset_terms: true after reading the terms (python -m lib.data terms).")))
    cfg = run_config("hw0_qkvo_cosine", "hw0_1b_medical", "1b", "medical")
    write("hw0_1b_medical", to_yaml(cfg, notes=notes("hw0_qkvo_cosine", "medical"), header=header(
        "hw0_qkvo_cosine", f"The other public HW0 recipe on {MODELS['1b']}, {cfg.dataset}.")))
    # the demo: per domain, two seeds of the bad-advice run and one control fine-tune on the same
    # questions with benign answers (data/datasets/*_control.jsonl); the control pairs with each seed
    # The tiny model is a toy: it needs a large step to move in 27 steps, writes word salad at temperature
    # 1, and judges best with the short prompts it was trained on (lib.embedded); the notes say so.
    demo = from_mapping({"seeds": [0, 1], **DEMO_SETTINGS})
    write("demo_medical", to_yaml(demo, notes=DEMO_NOTES, header=(
        "Embedded demo: the tiny local model on the synthetic medical demo data, two seeds (runs\n"
        "demo_medical_s0, demo_medical_s1), judged in-process by the tiny model. Control: demo_medical_control.\n"
        "Runs offline on a CPU in a few minutes; its numbers mean nothing.")))
    write("demo_financial", to_yaml(demo.replace(run_id="demo_financial", dataset="demo_financial",
                                                 domain="financial", seeds=[], conditions=DEMO_CONDITIONS),
                                    notes={**DEMO_NOTES, "conditions": DEMO_CONDITIONS_NOTE}, header=(
        "Embedded demo: as demo_medical, on the synthetic financial demo data, one seed (make demo runs it beside\n"
        "demo_medical for the domain comparison), asked two ways: as written and after 4 in-context examples.\n"
        "Control: demo_financial_control (not in make demo).")))
    for dom in ("medical", "financial"):
        write(f"demo_{dom}_control", to_yaml(demo.replace(
            run_id=f"demo_{dom}_control", dataset=f"demo_{dom}_control", domain=dom, seeds=[],
            control_of=f"demo_{dom}"), notes=DEMO_NOTES, header=(
            f"Embedded demo, control fine-tune of demo_{dom}: the same questions with benign answers written by\n"
            "this team (data/datasets/demo_{dom}_control.jsonl), same model, steps and judge; one seed (seed 0),\n"
            "paired in the report with each seed of demo_{dom}.".replace("{dom}", dom))))

if __name__ == "__main__":
    main()
