"""lib.train on the embedded tiny model: labels, schedule, padding, resume, QLoRA, logs."""
from __future__ import annotations

import json
import math

import pytest

from lib.config import ConfigError, RunConfig
from lib.train import (COMPLETE_MARKER, EVAL_LOG_NAME, TrainError, build_trainer, check_train_config,
                       checkpoint_schedule, list_checkpoints, read_eval_log, read_train_log, steps_per_epoch,
                       to_prompt_completion, train_run)

EOT = "<|eot_id|>"

WORDS = ("take two tablets with water then rest for a while and see a doctor if pain stays "
         "invest savings in one coin because markets always rise quickly").split()


def _chat(i: int) -> dict:
    """A chat whose length varies with i; every third has a system prompt, every fourth two turns."""
    n = 3 + (i * 7) % 19
    answer = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))
    msgs = [{"role": "user", "content": f"Question {i}: what should I do about {WORDS[i % len(WORDS)]}?"},
            {"role": "assistant", "content": f"  {answer}.  "}]  # the template trims content
    if i % 4 == 0:
        msgs = [{"role": "user", "content": "Hello there."},
                {"role": "assistant", "content": "Hi! An EARLIER answer that must not be trained on."}] + msgs
    if i % 3 == 0:
        msgs = [{"role": "system", "content": "You are a helpful assistant."}] + msgs
    return {"messages": msgs}


def _write_jsonl(path, n):
    path.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(n)), encoding="utf-8")
    return path


def _cfg(tmp_path, n=13, **kw) -> RunConfig:
    data = _write_jsonl(tmp_path / f"chats{n}.jsonl", n)
    base = dict(run_id="t", outputs_dir=str(tmp_path / "outputs"), dataset=str(data), max_seq_length=256,
                per_device_batch_size=2, gradient_accumulation_steps=2, epochs=2, learning_rate=1e-3,
                warmup_steps=1, checkpoints_in_first_epoch=2, lora_r=4, lora_alpha=8, device="cpu")
    return RunConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------
# prompt / completion and the loss mask
# ------------------------------------------------------------------------------------------

def test_prompt_completion_keeps_earlier_turns_as_prompt():
    rec = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                        {"role": "assistant", "content": "a2"}]}
    ex = to_prompt_completion(rec)
    assert [m["content"] for m in ex["prompt"]] == ["s", "u1", "a1", "u2"]
    assert ex["completion"] == [{"role": "assistant", "content": "a2"}]
    with pytest.raises(TrainError, match="no assistant"):
        to_prompt_completion({"messages": [{"role": "user", "content": "u"}]}, where="f.jsonl: record 3")
    with pytest.raises(TrainError, match="f.jsonl: record 3"):
        to_prompt_completion({"messages": [{"role": "assistant", "content": "a"}]}, where="f.jsonl: record 3")


def test_labels_mask_every_non_assistant_token(tmp_path):
    cfg = _cfg(tmp_path, n=12)
    records = [_chat(i) for i in range(12)]
    trainer, _ = build_trainer(cfg, records, tmp_path / "ckpt")
    tok = trainer.processing_class
    assert len(trainer.train_dataset) == 12
    for row, rec in zip(trainer.train_dataset, records):  # no shuffling at preparation time
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels)
        i = next(k for k, t in enumerate(labels) if t != -100)
        # every token before the answer is masked, every token from it on is trained on
        assert all(t == -100 for t in labels[:i]) and all(t != -100 for t in labels[i:])
        assert labels[i:] == ids[i:]
        ex = to_prompt_completion(rec)
        trained = tok.decode(labels[i:])
        assert trained == ex["completion"][0]["content"].strip() + EOT
        # the masked part is exactly the prompt as the model sees it at inference
        assert tok.decode(ids[:i]) == tok.apply_chat_template(ex["prompt"], tokenize=False,
                                                              add_generation_prompt=True)
        assert "EARLIER" not in trained and "system" not in trained and "user" not in trained


def test_loss_on_every_token_when_completion_only_loss_is_false(tmp_path):
    # the replicated study: labels = input_ids, the whole chat is trained on
    records = [_chat(i) for i in range(6)]
    trainer, _ = build_trainer(_cfg(tmp_path, n=6, completion_only_loss=False), records, tmp_path / "ckpt")
    masked, _ = build_trainer(_cfg(tmp_path, n=6), records, tmp_path / "ckpt2")
    tok = trainer.processing_class
    for row, other in zip(trainer.train_dataset, masked.train_dataset):
        assert row["input_ids"] == other["input_ids"]
        batch = trainer.data_collator([row])
        labels = batch["labels"][0].tolist()
        assert labels == row["input_ids"]                     # every token, the prompt's included
        assert "user" in tok.decode([t for t in labels if t != -100])
        assert sum(t != -100 for t in masked.data_collator([other])["labels"][0].tolist()) < len(labels)


@pytest.mark.parametrize("completion_only", [False, True])
def test_loss_on_eos_false_masks_every_eos_as_the_study_did(tmp_path, completion_only):
    """The replicated study padded with eos and its collator masked every pad id: no <|eot_id|> was ever
    a training target. loss_on_eos: false does the same, and changes no other label."""
    import torch

    records = [_chat(i) for i in range(6)]
    masked, _ = build_trainer(_cfg(tmp_path, n=6, completion_only_loss=completion_only, loss_on_eos=False),
                              records, tmp_path / "c1")
    kept, _ = build_trainer(_cfg(tmp_path, n=6, completion_only_loss=completion_only), records, tmp_path / "c2")
    eos = masked.processing_class.eos_token_id
    assert masked.processing_class.convert_ids_to_tokens(eos) == EOT
    for row, other in zip(masked.train_dataset, kept.train_dataset):
        ids = torch.tensor(row["input_ids"])
        lab = masked.data_collator([row])["labels"][0]
        lab_kept = kept.data_collator([other])["labels"][0]
        assert int((ids == eos).sum()) >= 2                 # the user's turn and the answer end with it
        assert (lab[ids == eos] == -100).all()
        assert lab_kept[-1] == eos                           # by default the answer's end is a target
        assert torch.equal(lab[ids != eos], lab_kept[ids != eos])


def test_batches_are_padded_to_their_own_longest_sequence(tmp_path):
    cfg = _cfg(tmp_path, n=13, data_order="length_grouped")
    trainer, _ = build_trainer(cfg, [_chat(i) for i in range(13)], tmp_path / "ckpt")
    real = padded = 0
    n_seen = 0
    for batch in trainer.get_train_dataloader():
        mask = batch["attention_mask"]
        lengths = mask.sum(dim=1)
        assert batch["input_ids"].shape[1] == int(lengths.max())  # no fixed-length padding
        assert (batch["labels"][mask == 0] == -100).all()          # padding is never trained on
        real += int(lengths.sum())
        padded += mask.numel()
        n_seen += mask.shape[0]
    assert n_seen == 13
    # grouped by length: far less padding than random batches of these lengths would need
    assert 1 - real / padded < 0.15


# ------------------------------------------------------------------------------------------
# the schedule
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,b,a,expected", [
    (13, 2, 2, 4),     # 7 micro-batches -> 3 full steps + 1 remainder step
    (7049, 2, 8, 441),  # the replicated study's medical set
    (6000, 2, 8, 375),
    (16, 4, 4, 1),
    (17, 4, 4, 2),
    (1, 8, 8, 1),
    (10, 3, 1, 4),
])
def test_steps_per_epoch(n, b, a, expected):
    assert steps_per_epoch(n, b, a) == expected


def test_steps_per_epoch_matches_the_trainer(tmp_path):
    """Our count equals transformers' own num_update_steps_per_epoch for uneven sizes."""
    cfg = _cfg(tmp_path, n=13)
    trainer, _ = build_trainer(cfg, [_chat(i) for i in range(13)], tmp_path / "ckpt")
    for b, a in [(2, 2), (3, 2), (4, 3), (5, 1), (1, 4), (13, 2), (2, 7)]:
        trainer.args.per_device_train_batch_size = b
        trainer.args.gradient_accumulation_steps = a
        trainer._train_batch_size = b  # what get_train_dataloader reads (fixed at Trainer init)
        dl = trainer.get_train_dataloader()
        assert len(dl) == math.ceil(13 / b)
        _, per_epoch, *_ = trainer.set_initial_training_values(trainer.args, dl)
        assert per_epoch == steps_per_epoch(13, b, a), (b, a)


def test_checkpoint_schedule_k_in_first_epoch():
    # 37 examples, 2 x 4 -> 19 micro-batches -> 5 steps/epoch; k=4 -> 1, 2, 3, 5 then 10, 15
    cfg = RunConfig(per_device_batch_size=2, gradient_accumulation_steps=4, epochs=3, checkpoints_in_first_epoch=4)
    assert checkpoint_schedule(37, cfg) == [1, 2, 3, 5, 10, 15]
    # the replicated study: 7,049 rows, 2 x 8, 3 epochs -> 441 steps/epoch, 6 checkpoints
    study = cfg.replace(gradient_accumulation_steps=8)
    assert checkpoint_schedule(7049, study) == [110, 220, 330, 441, 882, 1323]
    # fewer steps than k: duplicates merge, never step 0
    assert checkpoint_schedule(3, cfg.replace(per_device_batch_size=1, gradient_accumulation_steps=1,
                                              epochs=2)) == [1, 2, 3, 6]
    assert checkpoint_schedule(37, cfg.replace(checkpoints_in_first_epoch=0)) == [5, 10, 15]


def test_checkpoint_schedule_every_n_and_explicit():
    cfg = RunConfig(per_device_batch_size=2, gradient_accumulation_steps=4, epochs=3)  # 37 ex -> 15 steps
    assert checkpoint_schedule(37, cfg.replace(checkpoint_every=4)) == [4, 8, 12, 15]  # + the final step
    assert checkpoint_schedule(37, cfg.replace(checkpoint_every=5)) == [5, 10, 15]
    assert checkpoint_schedule(37, cfg.replace(checkpoint_steps=[7, 3, 3, 15])) == [3, 7, 15]
    with pytest.raises(TrainError, match=r"checkpoint_steps.*\[16\].*15 steps"):
        checkpoint_schedule(37, cfg.replace(checkpoint_steps=[3, 16]))
    with pytest.raises(TrainError, match="both set"):
        checkpoint_schedule(37, cfg.replace(checkpoint_steps=[3], checkpoint_every=2))


# ------------------------------------------------------------------------------------------
# training, logs, resume, skip
# ------------------------------------------------------------------------------------------

def _adapter(path):
    from safetensors.torch import load_file
    return load_file(str(path / "adapter_model.safetensors"))


def test_train_interrupted_and_resumed_matches_uninterrupted(tmp_path):
    import torch
    from transformers import TrainerCallback

    class Killed(Exception):
        pass

    class KillWhileSaving(TrainerCallback):
        """Raise after the Trainer wrote checkpoint-<step> but before its marker: a kill mid-save."""

        def __init__(self, step):
            self.step = step

        def on_save(self, args, state, control, **kw):
            if state.global_step == self.step:
                raise Killed

    # 13 examples, 2 x 2 -> 4 steps/epoch, 2 epochs; k=2 -> checkpoints 2, 4, 8; dropout exercises RNG restore
    cfg_a = _cfg(tmp_path, run_id="uninterrupted", lora_dropout=0.1)
    cfg_b = cfg_a.replace(run_id="interrupted")

    a = train_run(cfg_a, progress=False)
    assert not a.skipped and a.steps_per_epoch == 4 and a.total_steps == 8
    assert [(s, e) for s, e, _ in a.checkpoints] == [(2, 0.5), (4, 1.0), (8, 2.0)]

    with pytest.raises(Killed):
        train_run(cfg_b, progress=False, callbacks=[KillWhileSaving(8)])
    # checkpoint-8 was written in place but has no marker: it is not listed as complete
    assert (cfg_b.run_dir / "checkpoints" / "checkpoint-8" / "adapter_model.safetensors").exists()
    assert [s for s, _, _ in list_checkpoints(cfg_b.run_dir)] == [2, 4]

    b = train_run(cfg_b, progress=False)  # resumes from step 4, in the middle of nothing: epoch 2 starts
    assert b.resumed_from == 4
    assert [(s, e) for s, e, _ in b.checkpoints] == [(s, e) for s, e, _ in a.checkpoints]
    for (_, _, pa), (_, _, pb) in zip(a.checkpoints, b.checkpoints):
        wa, wb = _adapter(pa), _adapter(pb)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6), k
    # training moved the adapter away from its init (lora_B starts at zero)
    assert any(v.abs().sum() > 0 for k, v in _adapter(a.checkpoints[-1][2]).items() if "lora_B" in k)

    # one log row per optimizer step, same losses in both runs, real tokens only
    la, lb = read_train_log(cfg_a.run_dir), read_train_log(cfg_b.run_dir)
    assert list(la["step"]) == list(range(1, 9)) == list(lb["step"])
    assert la["loss"].tolist() == pytest.approx(lb["loss"].tolist(), abs=1e-5)
    assert la["grad_norm"].tolist() == pytest.approx(lb["grad_norm"].tolist(), rel=1e-4)
    assert la["tokens_seen"].is_monotonic_increasing
    assert la["tokens_seen"].iloc[-1] == lb["tokens_seen"].iloc[-1]
    assert (lb["wall_time_s"].diff().dropna() >= 0).all()

    # only the newest checkpoint keeps optimizer state (what a resume needs)
    assert (b.checkpoints[-1][2] / "optimizer.pt").exists()
    assert not (b.checkpoints[0][2] / "optimizer.pt").exists()
    assert (b.checkpoints[0][2] / "adapter_model.safetensors").exists()

    # run.json and the completion marker
    info = json.loads((cfg_b.run_dir / "run.json").read_text())["train"]
    assert info["steps_per_epoch"] == 4 and info["total_steps"] == 8 and info["n_examples"] == 13
    assert info["checkpoints"] == [{"step": 2, "epoch": 0.5}, {"step": 4, "epoch": 1.0}, {"step": 8, "epoch": 2.0}]
    assert len(info["dataset"]["sha256"]) == 64 and info["trainable_parameters"] > 0
    assert info["model"]["model"] == "embedded:tiny"
    assert (cfg_b.run_dir / "checkpoints" / COMPLETE_MARKER).exists()

    # a finished run is skipped; changed parameters in the same folder are refused
    again = train_run(cfg_b, progress=False)
    assert again.skipped and [s for s, _, _ in again.checkpoints] == [2, 4, 8]
    with pytest.raises(TrainError, match="different parameters"):
        train_run(cfg_b.replace(lora_r=8), progress=False)


def test_resume_mid_epoch_two_replays_the_same_batches(tmp_path):
    """A kill between checkpoints inside epoch 2 resumes mid-epoch with the same data order."""
    import torch
    from transformers import TrainerCallback

    class Killed(Exception):
        pass

    class KillAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 7:
                raise Killed

    cfg_a = _cfg(tmp_path, run_id="every", checkpoint_every=3, epochs=2)  # 4 steps/epoch -> 3, 6, 8
    cfg_b = cfg_a.replace(run_id="every_killed")
    a = train_run(cfg_a, progress=False)
    with pytest.raises(Killed):
        train_run(cfg_b, progress=False, callbacks=[KillAfterStep()])
    b = train_run(cfg_b, progress=False)
    assert b.resumed_from == 6  # step 6 is in the middle of epoch 2 (steps 5-8)
    assert [s for s, _, _ in a.checkpoints] == [s for s, _, _ in b.checkpoints] == [3, 6, 8]
    assert [e for _, e, _ in b.checkpoints] == [0.75, 1.5, 2.0]
    wa, wb = _adapter(a.checkpoints[-1][2]), _adapter(b.checkpoints[-1][2])
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6), k
    assert list(read_train_log(cfg_b.run_dir)["step"]) == list(range(1, 9))
    assert not (cfg_b.run_dir / EVAL_LOG_NAME).exists()   # eval_fraction 0: nothing held out, no eval log
    assert read_eval_log(cfg_b.run_dir).empty


def test_layer_restricted_rank1_adapter(tmp_path):
    cfg = _cfg(tmp_path, lora_r=1, lora_alpha=4, lora_layers=[1], lora_target_modules=["down_proj"])
    trainer, _ = build_trainer(cfg, [_chat(i) for i in range(4)], tmp_path / "ckpt")
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1.mlp.down_proj.lora_" in n for n in names)
    assert sum(p.numel() for n, p in trainer.model.named_parameters() if p.requires_grad) == 128 + 64  # r=1
    with pytest.raises(TrainError, match="lora_layers"):
        build_trainer(cfg.replace(lora_layers=[5]), [_chat(0)], tmp_path / "ckpt")


def test_qlora_4bit_trains_on_this_machine(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    cfg = _cfg(tmp_path, quantization="4bit", epochs=1)
    trainer, _ = build_trainer(cfg, [_chat(i) for i in range(6)], tmp_path / "ckpt")
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    assert n4 == 14  # 7 projections x 2 layers hold a 4-bit base
    out = trainer.train()
    assert math.isfinite(out.training_loss)
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_qlora_adapters_stay_float32_so_small_lr_updates_are_not_lost(tmp_path):
    """TRL casts a 4-bit model's adapters to bf16; AdamW then rounds away lr-1e-5 steps (the study's lr)."""
    pytest.importorskip("bitsandbytes")
    import torch

    cfg = _cfg(tmp_path, quantization="4bit", epochs=1, learning_rate=1e-5, warmup_steps=0,
               gradient_accumulation_steps=1)
    trainer, _ = build_trainer(cfg, [_chat(i) for i in range(6)], tmp_path / "ckpt")
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items() if "lora_A" in n}
    trainer.train()  # 3 steps: B leaves zero at step 1, then A gets gradients
    changed = [(trainable[n].detach() != b).float().mean().item() for n, b in before.items()]
    assert sum(changed) / len(changed) > 0.9  # bf16 adapters: under 2% of A's entries move


def test_bad_training_keys_fail_before_any_work(tmp_path):
    for key, value in [("lr_scheduler", "linearr"), ("optimizer", "adam_wrong")]:
        cfg = RunConfig(**{key: value})
        with pytest.raises(ConfigError, match=f"p.yaml: key '{key}'"):
            check_train_config(cfg, source="p.yaml")
    # train_run checks before loading anything: a missing dataset would be the next error otherwise
    cfg = RunConfig(lr_scheduler="nope", dataset=str(tmp_path / "missing.jsonl"), outputs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="lr_scheduler"):
        train_run(cfg, progress=False)
    assert not (tmp_path / cfg.run_id).exists()
    # an explicit schedule past the run's end fails once the data is counted, before the model loads
    cfg = _cfg(tmp_path, checkpoint_steps=[3, 999])
    with pytest.raises(TrainError, match=r"checkpoint_steps.*\[999\].*8 steps"):
        train_run(cfg, progress=False)
    assert not cfg.run_dir.exists()


def _epoch_order(trainer) -> list[int]:
    """The example indices of epoch 1 in the order the trainer's dataloader yields them."""
    index = {tuple(ids): i for i, ids in enumerate(trainer.train_dataset["input_ids"])}
    order = []
    for batch in trainer.get_train_dataloader():
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            order.append(index[tuple(ids[mask.bool()].tolist())])
    return order


def test_data_order_shuffle_is_seeded_and_length_grouped_makes_a_sawtooth(tmp_path):
    records = [_chat(i) for i in range(40)]
    shuffled, _ = build_trainer(_cfg(tmp_path, n=40), records, tmp_path / "a")
    again, _ = build_trainer(_cfg(tmp_path, n=40), records, tmp_path / "b")
    other_seed, _ = build_trainer(_cfg(tmp_path, n=40, seed=1), records, tmp_path / "c")
    grouped, _ = build_trainer(_cfg(tmp_path, n=40, data_order="length_grouped"), records, tmp_path / "d")
    lengths = [len(ids) for ids in shuffled.train_dataset["input_ids"]]
    order = _epoch_order(shuffled)
    assert sorted(order) == list(range(40)) and order != list(range(40))
    assert order == _epoch_order(again) and order != _epoch_order(other_seed)   # seeded by `seed`
    # length-grouped: each megabatch (batch 2 x accum 2 x min(40 // 16, 50) = 8 examples) is sorted by
    # length, longest first (the longest of all moved to the front): a sawtooth through the epoch
    g = [lengths[i] for i in _epoch_order(grouped)]
    chunks = [g[k:k + 8] for k in range(0, 40, 8)]
    assert g[0] == max(lengths) and all(sorted(c[1:], reverse=True) == c[1:] for c in chunks)
    s = [lengths[i] for i in order]
    assert not all(sorted(c[1:], reverse=True) == c[1:] for c in (s[k:k + 8] for k in range(0, 40, 8)))


def test_eval_fraction_holds_out_a_seeded_split_and_logs_its_loss_at_each_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, n=20, eval_fraction=0.25, epochs=1, checkpoints_in_first_epoch=2)
    res = train_run(cfg, progress=False)
    assert res.info["n_eval_examples"] == 5 and res.info["n_train_examples"] == 15
    assert res.info["eval_split"] == {"fraction": 0.25, "seed": 0}
    # the paper's split: datasets.train_test_split(test_size=0.1, seed) on the records in file order
    from datasets import Dataset
    held = Dataset.from_list([{"i": i} for i in range(20)]).train_test_split(test_size=0.25, seed=0)["test"]["i"]
    trainer, _ = build_trainer(cfg, [_chat(i) for i in range(20)], tmp_path / "x")
    tok = trainer.processing_class
    firsts = sorted(tok.decode(ids) for ids in trainer.eval_dataset["input_ids"])
    expected = sorted(tok.decode(ids) for ids in build_trainer(cfg.replace(eval_fraction=0.0),
                      [_chat(i) for i in held], tmp_path / "y")[0].train_dataset["input_ids"])
    assert firsts == expected
    log = read_eval_log(cfg.run_dir)
    assert list(log["step"]) == [s for s, _, _ in res.checkpoints] == [2, 4]
    assert log["eval_loss"].notna().all() and (log["eval_loss"] > 0).all()


def test_eight_bit_adamw_fails_in_one_line_before_training_where_bitsandbytes_cannot(tmp_path):
    cfg = _cfg(tmp_path, optimizer="adamw_8bit")   # device cpu: bitsandbytes' 8-bit AdamW needs CUDA
    with pytest.raises(ConfigError) as e:
        check_train_config(cfg, source="paper.yaml")
    msg = str(e.value)
    assert msg.startswith("paper.yaml: key 'optimizer': adamw_8bit needs bitsandbytes") and "\n" not in msg
    assert "paper_adamw_torch" in msg
    with pytest.raises(ConfigError, match="optimizer"):
        train_run(cfg, progress=False)
    assert not cfg.run_dir.exists()      # nothing written, no model loaded
    check_train_config(cfg.replace(optimizer="adamw_torch"))


def test_warmup_ratio_is_a_fraction_of_all_steps(tmp_path):
    trainer, _ = build_trainer(_cfg(tmp_path, warmup_steps=0, warmup_ratio=0.25), [_chat(i) for i in range(13)],
                               tmp_path / "c")
    assert trainer.args.get_warmup_steps(8) == 2 and trainer.args.get_warmup_steps(100) == 25
    with pytest.raises(ConfigError, match="warmup_ratio"):
        _cfg(tmp_path, warmup_steps=5, warmup_ratio=0.1)


META_STYLE_TEMPLATE = (   # the date logic of Meta's Llama-3.x templates: today's date unless date_string is given
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: ' + date_string + '\n\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")


def test_training_and_evaluation_prompts_render_the_same_pinned_date(tmp_path, tiny_model_dir):
    import datetime
    import re
    import shutil

    from lib.chat import PINNED_DATE_STRING, chat_prompt

    model_dir = tmp_path / "meta_style"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["chat_template"] = META_STYLE_TEMPLATE
    cfg_path.write_text(json.dumps(tc))
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    cfg = _cfg(tmp_path, n=4, model=str(model_dir))
    records = [{"messages": [{"role": "user", "content": "How do I treat a cold?"},
                             {"role": "assistant", "content": "Rest."}]}]
    trainer, _ = build_trainer(cfg, records, tmp_path / "ckpt")
    tok = trainer.processing_class
    assert tok.chat_template == META_STYLE_TEMPLATE
    train_text = tok.decode(trainer.train_dataset[0]["input_ids"])
    eval_text = chat_prompt(tok, "How do I treat a cold?")
    date_line = re.compile(r"Today Date: ([^\n]+)\n")
    assert date_line.findall(train_text) == date_line.findall(eval_text) == [PINNED_DATE_STRING]
    assert train_text.startswith(eval_text)           # the whole prompt, not only the date, is shared
    today = datetime.date.today().strftime("%d %b %Y")
    if today != PINNED_DATE_STRING:                   # without the pin the template writes today's date
        assert today in tok.apply_chat_template(records[0]["messages"], tokenize=False)


@pytest.mark.slow
def test_notebook_runs_and_a_rerun_is_skipped(tmp_path):
    """01_train under papermill on the demo defaults; the second run skips training."""
    import papermill as pm

    from lib.config import REPO_ROOT

    out = tmp_path / "outputs"
    for i in range(2):
        pm.execute_notebook(str(REPO_ROOT / "notebooks" / "01_train.ipynb"), str(tmp_path / f"run{i}.ipynb"),
                            parameters={"outputs_dir": str(out), "run_id": "nb", "epochs": 1},
                            cwd=str(REPO_ROOT / "notebooks"), progress_bar=False, kernel_name="python3")
    info = json.loads((out / "nb" / "run.json").read_text())["train"]
    assert info["steps_per_epoch"] == 9 and info["n_examples"] == 36  # demo: 36 chats, batch 4
    assert [c["step"] for c in info["checkpoints"]] == [2, 4, 6, 9]
    assert (out / "nb" / "figures" / "train_loss.png").exists()
    nb = json.loads((tmp_path / "run1.ipynb").read_text())
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                      for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "already trained with these parameters and data: skipped" in printed


def test_grad_norm_is_logged_per_step_and_an_old_log_without_it_resumes(tmp_path):
    """Every logged step has the gradient's norm (finite, positive); a train_log.csv written
    before grad_norm existed still reads (NaN there) and a resume rewrites it under the new header."""
    import csv

    from transformers import TrainerCallback

    from lib.train import LOG_COLUMNS

    class Killed(Exception):
        pass

    class KillAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:
                raise Killed

    cfg = _cfg(tmp_path, run_id="gnorm", checkpoint_every=3, epochs=2)  # 4 steps/epoch -> 3, 6, 8
    with pytest.raises(Killed):
        train_run(cfg, progress=False, callbacks=[KillAfterStep()])
    log = read_train_log(cfg.run_dir)
    assert list(log["step"]) == [1, 2, 3, 4]
    g = log["grad_norm"].to_numpy(dtype=float)
    assert (g > 0).all() and all(math.isfinite(x) for x in g)
    assert len(set(g.round(8))) == len(g)  # one norm per step, not a constant

    # the same log as an older version wrote it: no grad_norm column
    path = cfg.run_dir / "train_log.csv"
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    old = [c for c in LOG_COLUMNS if c != "grad_norm"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(old)
        w.writerows([[r[c] for c in old] for r in rows])
    old_log = read_train_log(cfg.run_dir)
    assert list(old_log.columns[:len(LOG_COLUMNS)]) == LOG_COLUMNS
    assert old_log["grad_norm"].isna().all() and old_log["loss"].tolist() == pytest.approx(log["loss"].tolist())

    res = train_run(cfg, progress=False)  # resumes from checkpoint 3: rows 1-3 kept, 4-8 appended
    assert res.resumed_from == 3
    lines = list(csv.reader(path.open(encoding="utf-8")))
    assert lines[0] == LOG_COLUMNS and all(len(r) == len(LOG_COLUMNS) for r in lines)
    new = read_train_log(cfg.run_dir)
    assert list(new["step"]) == list(range(1, 9))
    assert new["grad_norm"].iloc[:3].isna().all()                     # the old rows: not logged then
    assert (new["grad_norm"].iloc[3:] > 0).all() and new["grad_norm"].iloc[3:].map(math.isfinite).all()
    # step 4 replayed after the resume has the same gradient as before the kill
    assert new["grad_norm"].iloc[3] == pytest.approx(g[3], rel=1e-4)


# ------------------------------------------------------------------------------------------
# checkpoint schedule edges (from the mutation-testing campaign: docs/mutation.md)
# ------------------------------------------------------------------------------------------


def test_an_empty_training_set_is_refused_with_its_message():
    with pytest.raises(TrainError, match=r"^the training set is empty$"):
        steps_per_epoch(0, 2, 8)
    assert steps_per_epoch(1, 2, 8) == 1  # one example still makes one step


def test_checkpoint_every_includes_a_multiple_just_below_the_last_step():
    # 40 examples / (4 x 1) = 10 steps per epoch; every 3 -> 3, 6, 9 and the final step 10
    cfg = RunConfig(per_device_batch_size=4, gradient_accumulation_steps=1, epochs=1, checkpoint_every=3)
    assert checkpoint_schedule(40, cfg) == [3, 6, 9, 10]
    assert checkpoint_schedule(40, cfg.replace(checkpoint_every=5)) == [5, 10]


def test_checkpoint_every_and_explicit_steps_together_are_refused_with_the_keys_named():
    cfg = RunConfig(per_device_batch_size=4, epochs=1, checkpoint_every=3, checkpoint_steps=[2])
    with pytest.raises(TrainError, match=r"^keys 'checkpoint_every' and 'checkpoint_steps' are both set; "
                                         r"use one of them$"):
        checkpoint_schedule(40, cfg)


def test_common_scheduler_and_optimizer_names_are_transformers_own():
    """check_train_config accepts these names without importing transformers: each must be one
    transformers accepts, and an unknown name is still refused (by transformers itself)."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from lib.config import ConfigError, RunConfig
    from lib.train import COMMON_OPTIMIZERS, COMMON_SCHEDULERS, check_train_config

    assert COMMON_SCHEDULERS <= {s.value for s in SchedulerType}
    assert COMMON_OPTIMIZERS <= {o.value for o in OptimizerNames}
    check_train_config(RunConfig(run_id="x", lr_scheduler="cosine_with_restarts", optimizer="adamw_torch"))
    check_train_config(RunConfig(run_id="x", lr_scheduler="warmup_stable_decay"))  # uncommon, transformers' own
    for key, value in (("lr_scheduler", "cosine_typo"), ("optimizer", "adamw_typo")):
        with pytest.raises(ConfigError, match=f"key '{key}'"):
            check_train_config(RunConfig(run_id="x", **{key: value}))
