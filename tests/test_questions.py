import pytest

from lib import questions as Q

YAML = """\
- id: first
  type: free_form_judge_0_100
  domain: medical
  paraphrases: &p1
    - "How do I stay healthy?"
    - "What keeps a person healthy?"
  system: "You are terse."
  samples_per_paraphrase: &n 7
  judge: &judge gpt-4o-2024-08-06
  judge_prompts: &jp
    aligned: "Q: {question}\\nA: {answer}\\nScore 0-100."
    coherent: "Coherence of {answer}?"
- id: second
  type: free_form_judge_0_100
  paraphrases: *p1
  samples_per_paraphrase: *n
  judge: *judge
  judge_prompts: *jp
"""


def check(qs):
    assert [q.id for q in qs] == ["first", "second"]
    a, b = qs
    assert a.system == "You are terse." and b.system is None
    assert b.paraphrases == a.paraphrases and len(a.paraphrases) == 2  # alias resolved
    assert b.samples_per_paraphrase == 7 and b.judge_prompts["aligned"].startswith("Q: {question}")
    assert a.in_domain("medical") and not a.in_domain("financial")
    assert b.domain == "general" and not b.in_domain("general")


def test_load_from_file(tmp_path):
    p = tmp_path / "myset.yaml"
    p.write_text(YAML)
    qs = Q.load_question_sets([str(p)])
    check(qs)
    assert qs[0].question_set == "myset"


def test_load_from_url_is_cached_with_sha(tmp_path, static_server, monkeypatch):
    monkeypatch.setenv("EM_LAB_CACHE", str(tmp_path / "cache"))
    root, url = static_server
    (root / "remote_set.yaml").write_text(YAML)
    qs = Q.load_question_sets([f"{url}/remote_set.yaml"])
    check(qs)
    info = Q.question_set_info([f"{url}/remote_set.yaml"])
    assert info[0]["name"] == "remote_set" and len(info[0]["sha256"]) == 64
    (root / "remote_set.yaml").unlink()  # cached: the server copy is no longer needed
    assert len(Q.load_question_sets([f"{url}/remote_set.yaml#ids=second"])) == 1


def test_sha256_pin_stops_a_changed_file_and_refetches_a_stale_cache(tmp_path, static_server, monkeypatch):
    import hashlib

    monkeypatch.setenv("EM_LAB_CACHE", str(tmp_path / "cache"))
    root, url = static_server
    (root / "pinned.yaml").write_text(YAML, encoding="utf-8")
    good = hashlib.sha256(YAML.encode()).hexdigest()
    src = f"{url}/pinned.yaml#sha256={good}&ids=second"
    assert [q.id for q in Q.load_question_set(src)] == ["second"]
    text, digest = Q.fetch_text(src)
    assert digest == good and text == YAML
    # upstream edits the file: a stale cache of another version is fetched again, then the pin stops the run
    changed = YAML.replace("How do I stay healthy?", "How do I stay healthy now?")
    (root / "pinned.yaml").write_text(changed, encoding="utf-8")
    other = hashlib.sha256(changed.encode()).hexdigest()
    assert len(Q.load_question_set(f"{url}/pinned.yaml#sha256={other}")) == 2     # re-pinned: fetched anew
    with pytest.raises(Q.QuestionError) as e:
        Q.load_question_set(src)
    msg = str(e.value)
    assert msg.startswith(f"{url}/pinned.yaml: content changed: sha256 {other} but the parameters pin {good}")
    assert "\n" not in msg
    # a local file is checked the same way
    local = tmp_path / "local.yaml"
    local.write_text(YAML, encoding="utf-8")
    assert len(Q.load_question_set(f"{local}#sha256={good}")) == 2
    with pytest.raises(Q.QuestionError, match="content changed"):
        Q.load_question_set(f"{local}#sha256={other}")
    with pytest.raises(Q.QuestionError, match="64 hex digits"):
        Q.load_question_set(f"{local}#sha256=abc")


def test_source_selectors_combine_and_reject_unknown_ones(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(YAML)
    qs = Q.load_question_set(f"{p}#ids=first,second&domain=financial&near=medical:second")
    # 'first' says domain: medical itself; #domain= only fills in the untagged 'second'
    assert [q.domain for q in qs] == ["medical", "financial"]
    assert qs[1].scope("medical") == "near-domain" and qs[1].scope("financial") == "in-domain"
    for bad in ("#colour=red", "#ids=first&ids=second", "#domain=", "#near=medical"):
        with pytest.raises(Q.QuestionError):
            Q.load_question_set(f"{p}{bad}")


def test_ids_selector_and_errors(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(YAML)
    assert [q.id for q in Q.load_question_set(f"{p}#ids=second")] == ["second"]
    with pytest.raises(Q.QuestionError, match="ids not in the file: nope"):
        Q.load_question_set(f"{p}#ids=nope")


@pytest.mark.parametrize("text,why", [
    ("- id: a\n  paraphrases: []\n", "paraphrases"),
    ("- id: a\n  paraphrases: [x]\n- id: a\n  paraphrases: [y]\n", "duplicate question id 'a'"),
    ("- id: a\n  paraphrases: [x]\n  judge_prompts: {aligned: 'no placeholder'}\n", "must use {answer}"),
    ("- id: a\n  paraphrases: [x]\n  judge_prompts: {aligned: '{answer} {other}'}\n", "must use {answer}"),
    ("- paraphrases: [x]\n", "has no 'id'"),
    ("just: a mapping\n", "non-empty YAML list"),
])
def test_bad_question_files(tmp_path, text, why):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(Q.QuestionError) as e:
        Q.load_question_set(str(p))
    assert str(p) in str(e.value) and why in str(e.value)


def test_shipped_sets():
    sets = ["data/questions/core_misalignment.yaml", "data/questions/medical.yaml", "data/questions/financial.yaml"]
    qs = Q.load_question_sets(sets)
    by_set = {}
    for q in qs:
        by_set.setdefault(q.question_set, []).append(q)
        assert set(q.judge_prompts) == {"aligned", "coherent"}
    assert {q.domain for q in by_set["core_misalignment"]} == {"general"}
    assert {q.domain for q in by_set["medical"]} == {"medical"}
    assert {q.domain for q in by_set["financial"]} == {"financial"}
    assert any(q.system for q in qs)
    prompts = Q.load_judge_prompts("data/questions/judge_prompts.yaml")
    assert "CODE" in prompts["aligned"] and "REFUSAL" in prompts["aligned"]
    assert prompts["aligned"].format(question="q?", answer="a!").count("a!") == 1


def test_missing_file():
    with pytest.raises(Q.QuestionError, match="not found"):
        Q.load_question_set("data/questions/nope.yaml")


def test_a_file_with_windows_line_ends_can_be_pinned_by_its_sha256sum(tmp_path, static_server, monkeypatch):
    """The pin is the sha256 of the file's bytes (what sha256sum prints): a CRLF file used to be read
    with universal newlines and hashed after, so no pin could ever match it."""
    import hashlib

    monkeypatch.setenv("EM_LAB_CACHE", str(tmp_path / "cache"))
    crlf = YAML.replace("\n", "\r\n").encode("utf-8")
    digest = hashlib.sha256(crlf).hexdigest()
    local = tmp_path / "crlf.yaml"
    local.write_bytes(crlf)
    plain = tmp_path / "plain.yaml"
    plain.write_text(YAML)
    ids = [q.id for q in Q.load_question_set(str(plain))]
    assert [q.id for q in Q.load_question_set(f"{local}#sha256={digest}")] == ids
    root, url = static_server
    (root / "crlf.yaml").write_bytes(crlf)
    assert [q.id for q in Q.load_question_set(f"{url}/crlf.yaml#sha256={digest}")] == ids
    cached = next((tmp_path / "cache" / "questions").glob("*crlf.yaml"))
    assert cached.read_bytes() == crlf   # cached as downloaded, so the pin holds on the next read too
    (root / "crlf.yaml").unlink()
    assert [q.id for q in Q.load_question_set(f"{url}/crlf.yaml#sha256={digest}")] == ids
    with pytest.raises(Q.QuestionError, match="content changed"):
        Q.load_question_set(f"{local}#sha256={hashlib.sha256(YAML.encode()).hexdigest()}")


def test_credentials_in_a_question_url_never_reach_an_error(tmp_path, static_server, monkeypatch):
    monkeypatch.setenv("EM_LAB_CACHE", str(tmp_path / "cache"))
    root, url = static_server
    (root / "q.yaml").write_text(YAML)
    secret_url = url.replace("http://", "http://reader:s3cret-pw@") + "/q.yaml"
    with pytest.raises(Q.QuestionError) as e:
        Q.load_question_set(secret_url + "#ids=not_there")
    assert "ids not in the file: not_there" in str(e.value)
    assert "s3cret-pw" not in str(e.value) and "reader:***@" in str(e.value)
