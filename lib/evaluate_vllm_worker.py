"""The evaluate stage's vLLM worker: one engine, the base model and every checkpoint as a LoRA adapter.

Run by the vLLM environment's python (``.venv-vllm``, :mod:`lib.vllm_env`), never imported by the
project: it imports only vLLM and the standard library (the project's transformers is too new for
vLLM). :mod:`lib.evaluate_vllm` starts it, writes the jobs and reads the answers.

    python lib/evaluate_vllm_worker.py      (job files' paths on standard input, one a line)

A job (JSON) holds ``engine`` (the keyword arguments of ``vllm.LLM``; the first job's start the
engine, a later job must carry the same), ``adapters`` (name -> checkpoint folder), ``sampling``
(the ``SamplingParams`` fields every request shares), ``prompts`` (token ids) and ``requests``
(each: ``i``, the index of its prompt ``p``, its adapter's name or null for the base model, and
the answer's own ``seed``). Every request of a job is added to the engine at once; each answer is
written as soon as it ends, one JSON line on standard output: ``{"i", "tokens", "finish",
"stop_reason"}`` (the generated token ids: the caller decodes them with its own tokenizer). The
engine's start is announced by ``{"event": "ready", ...}``, each job ends with ``{"event":
"done", ...}``, a refused job with ``{"event": "error", "message"}``. vLLM's own logs go to
standard error, so standard output carries nothing but these lines. The worker ends when its
standard input closes.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

# Run as a script, this file's folder (lib/) heads sys.path, and its modules would shadow the standard
# library's for vLLM (lib/secrets.py for ``import secrets``): the folder is dropped before vLLM loads.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _answers_out():
    """A text stream on the original standard output; fd 1 then points to standard error, so that
    whatever vLLM (or its engine process, which inherits fd 1) prints never mixes with the answers."""
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _emit(out, record: dict) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


class Worker:
    """The engine (started by the first job) and the LoRA ids of every adapter seen (one per folder)."""

    def __init__(self, out):
        self.out, self.llm, self.engine_args = out, None, None
        self.lora_ids: dict[str, int] = {}

    def start(self, engine_args: dict) -> None:
        t0 = time.time()
        import vllm  # vLLM's environment only: imported after the fds are set, so its logs go to stderr
        from vllm import LLM  # vLLM's environment only
        from vllm.platforms import current_platform  # vLLM's environment only

        self.llm, self.engine_args = LLM(**engine_args), engine_args
        _emit(self.out, {"event": "ready", "vllm": vllm.__version__, "load_s": round(time.time() - t0, 2),
                         "device": str(current_platform.device_type)})

    def run(self, job: dict) -> None:
        from vllm import SamplingParams  # vLLM's environment only
        from vllm.inputs import TokensPrompt  # vLLM's environment only
        from vllm.lora.request import LoRARequest  # vLLM's environment only

        if self.llm is None:
            self.start(job["engine"])
        elif job["engine"] != self.engine_args:
            _emit(self.out, {"event": "error", "message": "a job with other engine arguments than the running engine's"})
            return
        t0 = time.time()
        loras = {}
        for name, path in job["adapters"].items():
            lid = self.lora_ids.setdefault(path, len(self.lora_ids) + 1)
            loras[name] = LoRARequest(f"adapter{lid}", lid, path)
        engine = self.llm.llm_engine
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
        for r in job["requests"]:
            engine.add_request(str(r["i"]), prompts[r["p"]], SamplingParams(**job["sampling"], seed=r["seed"]),
                               lora_request=loras[r["adapter"]] if r["adapter"] else None)
        n = new_tokens = 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                if not o.finished:
                    continue
                c = o.outputs[0]
                stop = c.stop_reason if isinstance(c.stop_reason, int) else None
                _emit(self.out, {"i": int(o.request_id), "tokens": list(c.token_ids), "finish": c.finish_reason,
                                 "stop_reason": stop})
                n += 1
                new_tokens += len(c.token_ids)
        _emit(self.out, {"event": "done", "answers": n, "new_tokens": new_tokens,
                         "generate_s": round(time.time() - t0, 2)})


def _end_with_parent() -> None:
    """Stop this worker and its engine (its own process group) when the process that started it is gone,
    whatever it was doing: an orphaned engine would hold gigabytes of memory."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        # the group is this worker's own when lib.evaluate_vllm started it (start_new_session)
        os.killpg(os.getpgrp(), signal.SIGTERM) if os.getpgrp() == os.getpid() else os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True).start()


def main() -> int:
    out = _answers_out()
    _end_with_parent()
    worker = Worker(out)
    for line in sys.stdin:
        if line.strip():
            with open(line.strip(), encoding="utf-8") as f:
                worker.run(json.load(f))
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file: start only here
    sys.exit(main())
