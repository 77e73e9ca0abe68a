"""The judge's backend registry (lib.judge_backends) and the protocol every backend satisfies
(lib.judge_protocol.JudgeBackend): each registered class has every member the stage uses, with the
protocol's signature, and the protocol holds exactly what lib/judge.py uses of a backend."""
import ast
import inspect
import typing
from pathlib import Path

import pytest

from lib import judge, judge_backends
from lib.config import RUN_FIELDS, RunConfig
from lib.judge_hf import HFBackend
from lib.judge_openai import OpenAIBackend, OpenAIBatchBackend
from lib.judge_protocol import JudgeBackend
from lib.judge_vllm import VllmBackend
from lib.scoring import JudgeError

CLASSES = {"openai": OpenAIBackend, "openai-batch": OpenAIBatchBackend, "hf": HFBackend, "vllm": VllmBackend}
JUDGE_PY = Path(judge.__file__)


def _configs(tmp_path) -> dict[str, RunConfig]:
    api = dict(judge_backend="openai", judge_model="gpt-4o-mini", judge_method="logprob", outputs_dir=str(tmp_path))
    return {"openai": RunConfig(**api), "openai-batch": RunConfig(**api, judge_use_batch_api=True),
            "hf": RunConfig(judge_model="embedded:tiny", judge_method="exact", outputs_dir=str(tmp_path)),
            "vllm": RunConfig(judge_backend="vllm", judge_model="embedded:tiny", judge_method="logprob",
                              outputs_dir=str(tmp_path))}


def _members() -> tuple[set[str], set[str]]:
    """(data members, methods) of the protocol."""
    data = set(JudgeBackend.__annotations__)
    methods = {n for n, v in vars(JudgeBackend).items() if not n.startswith("_") and inspect.isfunction(v)}
    return data, methods


def test_registry_builds_each_backend_by_name(tmp_path):
    assert set(judge_backends.BACKENDS) == set(CLASSES)
    for name, cfg in _configs(tmp_path).items():
        judge.cache_path(cfg).parent.mkdir(parents=True, exist_ok=True)  # as the stage does first
        assert judge_backends.backend_name(cfg) == name
        backend = judge_backends.make_backend(cfg, None if name in ("hf", "vllm") else "sk-test-0123",
                                              judge.cache_path(cfg))
        assert type(backend) is CLASSES[name] and isinstance(backend, JudgeBackend)
        assert isinstance(backend.max_output_tokens, int)
        assert backend.status == ([] if name == "openai-batch" else None)
    # every judge_backend a parameters file may name has a backend
    assert set(RUN_FIELDS["judge_backend"].metadata["choices"]) <= set(judge_backends.BACKENDS)


def test_unknown_backend_is_one_clear_line(tmp_path, monkeypatch):
    cfg = _configs(tmp_path)["hf"]
    monkeypatch.delitem(judge_backends.BACKENDS, "hf")
    with pytest.raises(JudgeError, match="key 'judge_backend': no judge backend 'hf' .known: openai, openai-batch"):
        judge_backends.make_backend(cfg, None, judge.cache_path(cfg))


def test_protocol_is_what_the_stage_uses_of_a_backend():
    """Every attribute lib/judge.py reads from a backend is a protocol member, and every member is read."""
    used = {n.attr for n in ast.walk(ast.parse(JUDGE_PY.read_text(encoding="utf-8")))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "backend"}
    data, methods = _members()
    assert used == data | methods == {"max_output_tokens", "status", "identity", "estimate_cost", "price_note", "run"}


def _shape(p: inspect.Parameter) -> tuple:
    return p.name, p.kind, p.annotation


def _mismatches(cls: type) -> list[str]:
    """How ``cls`` departs from the protocol: a data member annotated otherwise (or not at all), a
    method whose parameters (names, kinds, types, in order), return type or async-ness differ. An
    implementation may take more parameters than the protocol if they are optional."""
    data, methods = _members()
    out = []
    want_types, got_types = typing.get_type_hints(JudgeBackend), typing.get_type_hints(cls)
    for name in sorted(data):
        if got_types.get(name) != want_types[name]:
            out.append(f"{cls.__name__}.{name}: {got_types.get(name)}, protocol: {want_types[name]}")
    for name in sorted(methods):
        impl = getattr(cls, name, None)
        if not callable(impl):
            out.append(f"{cls.__name__}.{name}: missing")
            continue
        proto = getattr(JudgeBackend, name)
        want, got = inspect.signature(proto, eval_str=True), inspect.signature(impl, eval_str=True)
        wp, gp = list(want.parameters.values()), list(got.parameters.values())
        same_params = [_shape(p) for p in gp[:len(wp)]] == [_shape(p) for p in wp]
        extra_optional = all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                             for p in gp[len(wp):])
        if not (same_params and extra_optional and got.return_annotation == want.return_annotation
                and inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(proto)):
            out.append(f"{cls.__name__}.{name}{got}, protocol: {want}")
    return out


@pytest.mark.parametrize("cls", list(CLASSES.values()), ids=list(CLASSES))
def test_backend_members_match_the_protocol_signatures(cls):
    assert _mismatches(cls) == []


def test_checker_sees_a_missing_member_and_a_wrong_signature():
    """The checks are not vacuous: an object without ``status`` fails isinstance, and a backend whose
    methods take other arguments or return another type is named."""
    class Fake:
        max_output_tokens: int = 1
        status: list[dict[str, typing.Any]] | None = None

        def identity(self) -> dict[str, typing.Any]: ...
        def estimate_cost(self, input_tokens: int, output_tokens: int) -> float | None: ...
        def price_note(self) -> str: ...
        def run(self, jobs, sink, budget, progress) -> None: ...  # no types: a mismatch

    class NoStatus:
        max_output_tokens = 1
        identity, estimate_cost, price_note, run = Fake.identity, Fake.estimate_cost, Fake.price_note, Fake.run

    class Wrong(Fake):
        def identity(self) -> str: ...
        def price_note(self, verbose: bool) -> str: ...  # a required extra parameter

    assert isinstance(Fake(), JudgeBackend) and not isinstance(NoStatus(), JudgeBackend)
    names = lambda cls: [m.split("(")[0].split(":")[0] for m in _mismatches(cls)]  # noqa: E731
    assert names(Fake) == ["Fake.run"]
    assert names(Wrong) == ["Wrong.identity", "Wrong.price_note", "Wrong.run"]
    assert names(NoStatus) == ["NoStatus.max_output_tokens", "NoStatus.status", "NoStatus.run"]
