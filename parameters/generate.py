"""Regenerate the parameters files of the reference runs from lib.config.PRESETS.

    python parameters/generate.py

Each file is complete (every key), so it can be read on its own and fed to any notebook.
Comments flag where a run departs from the paper (Turner et al. 2025) or the replicated study.
"""
from pathlib import Path

from lib.config import from_mapping, preset, to_yaml
from lib.questions import UPSTREAM_FIRST_PLOT_8

HERE = Path(__file__).resolve().parent
MODELS = {"1b": "meta-llama/Llama-3.2-1B-Instruct", "3b": "meta-llama/Llama-3.2-3B-Instruct",
          "8b": "meta-llama/Llama-3.1-8B-Instruct"}
DOMAINS = {"medical": ("bad_medical_advice", "data/questions/medical.yaml"),
           "financial": ("risky_financial_advice", "data/questions/financial.yaml")}

STUDY_NOTES = {
    "n_samples": "answers per paraphrase; the replicated study judged ~20 answers per checkpoint, "
                 "too few for intervals; the papers use 50-100",
    "quantization": "the replicated study trained on a 4-bit base (QLoRA); the paper trained in bf16",
    "lora_r": "replicated study: r16 (paper: r32 rsLoRA)",
    "lora_alpha": "replicated study: alpha 32 (paper: 64)",
    "use_rslora": "replicated study: plain LoRA scaling (paper: rsLoRA)",
    "epochs": "replicated study: 3 epochs (paper: 1)",
    "question_sets": "the papers' 8 first-plot questions (upstream, by URL) + this team's in-domain set; "
                     "the report separates in-domain from out-of-domain",
    "judge_method": "replicated study: parsed a sampled text reply (paper: logprob-weighted score)",
    "judge_model": "replicated study: GPT-4o-mini (paper: GPT-4o)",
    "learning_rate": "not stated in the study's README; the paper's 1e-5",
}
PAPER_NOTES = {
    "question_sets": "the papers' 8 first-plot questions (upstream, by URL) + this team's in-domain set",
    "n_samples": "answers per paraphrase (paper: 50 for the first-plot questions)",
}


def write(name: str, text: str) -> None:
    (HERE / f"{name}.yaml").write_text(text, encoding="utf-8")
    print("wrote", HERE / f"{name}.yaml")


def main() -> None:
    for size, model in MODELS.items():
        for dom, (dataset, qset) in DOMAINS.items():
            run_id = f"study_{size}_{dom}"
            cfg = preset("replicated_study", run_id=run_id, model=model, model_label=size.upper(),
                         dataset=dataset, domain=dom, accept_dataset_terms=False,
                         question_sets=[UPSTREAM_FIRST_PLOT_8, qset])
            write(run_id, to_yaml(cfg, notes=STUDY_NOTES, header=(
                f"Replicated study (Harvard CS 2881 HW0): {model} on {dataset}.\n"
                "Settings from the study's README (LoRA r16/alpha32, 3 epochs, effective batch 16, 4-bit,\n"
                "4 checkpoints in epoch 1 then one per epoch); evaluation and sampling as in the papers.\n"
                "Set accept_dataset_terms: true after reading the terms (python -m lib.data terms).")))
    for dom, (dataset, qset) in DOMAINS.items():
        run_id = f"paper_1b_{dom}"
        cfg = preset("paper", run_id=run_id, model=MODELS["1b"], model_label="1B", dataset=dataset, domain=dom,
                     question_sets=[UPSTREAM_FIRST_PLOT_8, qset])
        write(run_id, to_yaml(cfg, notes=PAPER_NOTES, header=(
            f"Paper-faithful variant (Turner et al. 2025 defaults) on {MODELS['1b']}, {dataset}:\n"
            "r32/alpha64 rsLoRA on all 7 projections, lr 1e-5, 1 epoch, batch 2 x 8, warmup 5, linear,\n"
            "assistant-only loss; GPT-4o logprob judge. Departs from the paper only in the model size\n"
            "(the paper's smallest models were larger) and where noted.")))
    demo = from_mapping({})
    write("demo_medical", to_yaml(demo, header=(
        "Embedded demo, run 1 of 2: the tiny local model on the synthetic medical demo data,\n"
        "judged in-process by the tiny model. Runs offline on a CPU in a few minutes; its numbers mean nothing.")))
    write("demo_financial", to_yaml(demo.replace(run_id="demo_financial", dataset="demo_financial",
                                                 domain="financial"), header=(
        "Embedded demo, run 2 of 2: as demo_medical, on the synthetic financial demo data.")))


if __name__ == "__main__":
    main()
