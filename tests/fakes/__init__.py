"""Fakes that tests and benchmarks share (import as ``tests.fakes.<module>``; the repository root
is on the path under pytest, ``pyproject.toml`` [tool.pytest.ini_options] pythonpath, and for
``python -m bench.<name>`` run from the root).

* :mod:`~tests.fakes.chat_server`: a real chat-completions HTTP server on 127.0.0.1 (logprobs,
  faults, latency) standing in for the OpenAI API;
* :mod:`~tests.fakes.judge_inputs`: a hand-made generations.parquet, judge prompts and a judge config;
* :mod:`~tests.fakes.synthetic_runs`: a small outputs/ folder of synthetic runs for the report.
* :mod:`~tests.fakes.bench`: a bench/ or scripts/ file loaded as a module (``load_bench``, ``load_script``);
* :mod:`~tests.fakes.floats`: the float one step above or below a threshold (``up``, ``down``).
"""
