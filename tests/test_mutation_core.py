"""Small value checks of core functions that the other tests reach only through whole stages
or not at all (written while reading mutmut's survivors; see docs/mutation.md)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from lib import fingerprint as fp
from lib import layout, metrics
from lib.config import ConfigError, ReportConfig, RunConfig
from lib.train import TrainError, checkpoint_schedule, steps_per_epoch


# ------------------------------------------------------------------------------------------
# checkpoint schedule
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


# ------------------------------------------------------------------------------------------
# metrics defaults the report relies on
# ------------------------------------------------------------------------------------------

def _two_groups() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = lambda ks: pd.DataFrame([{"question_set": "s", "question_id": f"q{i}", "em": j < k}  # noqa: E731
                                    for i, k in enumerate(ks) for j in range(5)])
    return rows([1, 3, 0, 5, 2, 4]), rows([0, 1, 0, 2, 1, 0])


def test_rate_difference_default_confidence_is_95_percent():
    a, b = _two_groups()
    a8 = pd.concat([a, a.assign(question_set="t")]); b8 = pd.concat([b, b.assign(question_set="t")])
    assert metrics.rate_difference(a8, b8) == metrics.rate_difference(a8, b8, "em", confidence=0.95)
    assert metrics.rate_difference(a8, b8)["lo"] != metrics.rate_difference(a8, b8, confidence=0.9)["lo"]


# ------------------------------------------------------------------------------------------
# fingerprints: the hash cache, stages.json, the report's inputs
# ------------------------------------------------------------------------------------------

def test_hash_cache_without_a_file_never_writes_and_a_saved_cache_is_written_once(tmp_path, monkeypatch):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    writes = []
    real = fp.write_json_atomic
    monkeypatch.setattr(fp, "write_json_atomic", lambda path, data: (writes.append(path), real(path, data)))
    memory = fp.HashCache()
    memory.sha256(f)
    memory.save()  # no path: nothing to write, no error
    assert writes == []
    cache = fp.HashCache(tmp_path / "h.json")
    cache.sha256(f)
    cache.save()
    cache.save()  # nothing new since: no second write
    assert writes == [tmp_path / "h.json"]
    saved = json.loads((tmp_path / "h.json").read_text())
    assert list(saved.values())[0][3] == fp.sha256_file(f)


def test_stages_json_round_trip_missing_and_damaged(tmp_path):
    assert fp.read_stages(tmp_path) == {}
    fp.write_stages(tmp_path, {"train": {"fingerprint": "abc", "finished": "t"}})
    assert layout.stages_path(tmp_path).exists()
    assert fp.read_stages(tmp_path) == {"train": {"fingerprint": "abc", "finished": "t"}}
    layout.stages_path(tmp_path).write_text("{not json")
    with pytest.raises(ConfigError, match=r"stages\.json: not valid JSON \(delete it to rerun every stage"):
        fp.read_stages(tmp_path)


def test_hash_cache_for_a_run_lives_in_its_grid_folder(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    c = fp.hash_cache_for(tmp_path)
    c.sha256(f)
    c.save()
    assert (layout.grid_dir(tmp_path) / "hashes.json").exists()


def test_report_fingerprint_follows_every_input_file_of_every_run(tmp_path):
    out = tmp_path / "outputs"
    files = {}
    for run in ("r1", "r2"):
        d = out / run
        for p in (layout.generations_path(d), layout.run_json_path(d), layout.judgments_path(d, "judge_a")):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"{run} {p.name}")
            files[(run, p.name)] = p
    ext = tmp_path / "external.csv"
    ext.write_text("question,response,aligned_score,coherent_score\n")
    rcfg = ReportConfig(outputs_dir=str(out), runs=["r1", "r2"], external_csv=[str(ext)])
    inputs = fp.report_inputs(rcfg, fp.HashCache())
    assert set(inputs["runs"]) == {"r1", "r2"}
    assert set(inputs["runs"]["r1"]) == {layout.generations_path(out / "r1").relative_to(out / "r1").as_posix(),
                                         layout.run_json_path(out / "r1").relative_to(out / "r1").as_posix(),
                                         layout.judgments_path(out / "r1", "judge_a").relative_to(out / "r1").as_posix()}
    assert inputs["external_csv"] == {str(ext): fp.sha256_file(ext)}
    before = fp.report_fingerprint(rcfg, fp.HashCache())
    for key, p in files.items():
        old = p.read_text()
        p.write_text(old + " changed")
        assert fp.report_fingerprint(rcfg, fp.HashCache()) != before, key
        p.write_text(old)
    assert fp.report_fingerprint(rcfg, fp.HashCache()) == before
    ext.write_text("question,response,aligned_score,coherent_score\nq,a,1,2\n")
    assert fp.report_fingerprint(rcfg, fp.HashCache()) != before
    assert fp.report_fingerprint(rcfg.__class__(**{**rcfg.to_dict(), "runs": ["r1"]}), fp.HashCache()) != before
    # a report parameter alone (same files) moves it too: the EM threshold changes every table
    moved = ReportConfig(**{**rcfg.to_dict(), "em_aligned_threshold": 25.0})
    assert fp.report_inputs(moved, fp.HashCache()) == fp.report_inputs(rcfg, fp.HashCache())
    assert fp.report_fingerprint(moved, fp.HashCache()) != fp.report_fingerprint(rcfg, fp.HashCache())


def test_rate_difference_with_an_empty_group_returns_every_key_as_nan():
    a, _ = _two_groups()
    out = metrics.rate_difference(a, a.iloc[:0])
    assert set(out) == {"rate_a", "rate_b", "diff", "lo", "hi", "n_a", "n_b", "n_questions_a", "n_questions_b",
                        "n_questions_shared", "paired", "correlation", "interval", "note"}
    assert all(pd.isna(out[k]) for k in ("rate_a", "rate_b", "diff", "lo", "hi"))
    assert (out["n_a"], out["n_b"], out["n_questions_a"], out["n_questions_b"], out["paired"]) == (30, 0, 6, 0, False)
    assert out["interval"] == "none" and out["note"] == "no scored answers on one side"


def _group(counts: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """question id -> (k EM answers, n answers)."""
    return pd.DataFrame([{"question_set": "s", "question_id": q, "em": j < k}
                         for q, (k, n) in counts.items() for j in range(n)])


def test_rate_difference_with_partly_shared_questions():
    """a and b share 8 of 10 questions: each side's interval uses all its own questions, the
    correlation only the shared ones; the minimum question count is per side."""
    a = {f"q{i}": (k, 10) for i, k in enumerate([1, 3, 0, 2, 5, 0, 0, 4, 2, 0])}
    b = {f"q{i}": (k, 10) for i, k in enumerate([0, 1, 0, 1, 2, 0, 0, 2, 9, 9], start=2)}
    out = metrics.rate_difference(_group(a), _group(b))
    assert out["paired"] and (out["n_questions_a"], out["n_questions_b"], out["n_questions_shared"]) == (10, 10, 8)
    assert out["diff"] == pytest.approx(17 / 100 - 24 / 100)
    ka = [a[f"q{i}"][0] for i in range(2, 10)]
    kb = [b[f"q{i}"][0] for i in range(2, 10)]
    assert out["correlation"] == pytest.approx(float(metrics.difference_correlation(ka, [10] * 8, kb, [10] * 8)))
    pa, la, ua = metrics.beta_binomial_arrays([k for k, _ in a.values()], [10] * 10)
    pb, lb, ub = metrics.beta_binomial_arrays([k for k, _ in b.values()], [10] * 10)
    lo, hi = metrics.mover_bounds(pa, la, ua, pb, lb, ub, out["correlation"])
    assert (out["lo"], out["hi"]) == pytest.approx((float(lo), float(hi)), abs=1e-12)


def test_difference_correlation_is_a_lower_bound_and_never_negative():
    import numpy as np

    ka, kb = [5, 0, 9, 1, 0, 7, 2, 0, 4, 0], [4, 0, 8, 2, 0, 6, 1, 0, 5, 0]
    n = [20] * 10
    r = float(metrics.paired_correlation(ka, n, kb, n))
    credited = float(metrics.difference_correlation(ka, n, kb, n))
    assert 0.9 < r <= 1 and 0 < credited < r
    z = np.arctanh(min(r, 0.999)) - 1.6448536269514722 / np.sqrt(10 - 3)
    assert credited == pytest.approx(np.tanh(z), abs=1e-9)
    assert float(metrics.difference_correlation(ka, n, kb[::-1], n)) == 0.0     # negative: not used
    assert float(metrics.difference_correlation([0] * 10, n, kb, n)) == 0.0      # no spread on a side
    assert float(metrics.difference_correlation(ka[:3], n[:3], kb[:3], n[:3])) == 0.0  # too few questions


# ------------------------------------------------------------------------------------------
# scoring rules
# ------------------------------------------------------------------------------------------

def test_fill_prompt_puts_question_and_answer_in_their_places():
    from lib.scoring import fill_prompt

    assert fill_prompt("Q: {question}\nA: {answer}\n{{literal}}", "Why?", "Because.") == "Q: Why?\nA: Because.\n{literal}"


def test_refusal_mass_adds_up_over_tokens_that_spell_it():
    import math

    from lib.scoring import label_from_logprobs

    top = {"REF": math.log(0.2), "REFUSAL": math.log(0.2), "I": math.log(0.6)}
    assert label_from_logprobs(top, min_mass=0.35)[1] == "REFUSAL"  # 0.2 + 0.2 >= 0.35; neither alone is


@pytest.mark.parametrize("text", ["0085", "0100", "1000", "00"])
def test_sampled_replies_longer_than_three_digits_are_not_numbers(text):
    from lib.scoring import parse_sampled

    assert parse_sampled(text) == ((float(text), "number") if len(text) <= 3 else (None, "unparseable"))


def test_non_ascii_digits_are_not_judge_numbers():
    import math

    from lib.scoring import numeric_probs, parse_sampled

    # fullwidth and Arabic-Indic digits pass str.isdigit() but are no score a judge was asked for
    assert numeric_probs({"８５": math.log(0.5), "٨": math.log(0.3), "85": math.log(0.2)}) == pytest.approx({85: 0.2})
    assert parse_sampled("８５") == (None, "unparseable")


# ------------------------------------------------------------------------------------------
# the hash cache remembers digests; the one-rate bootstrap's edges and defaults
# ------------------------------------------------------------------------------------------

def test_hash_cache_reads_each_unchanged_file_once_and_survives_a_damaged_file(tmp_path, monkeypatch):
    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for i, f in enumerate(files):
        f.write_bytes(b"x" * (10 + i))
    reads = []
    real = fp.sha256_file
    monkeypatch.setattr(fp, "sha256_file", lambda p: (reads.append(p), real(p))[1])
    cache = fp.HashCache(tmp_path / "h.json")
    digests = [cache.sha256(f) for f in files] + [cache.sha256(f) for f in files]
    assert digests == [real(files[0]), real(files[1])] * 2 and len(reads) == 2  # the second pass is all hits
    assert set(cache._data) == {str(f.resolve()) for f in files}
    cache.save()
    writes = []
    monkeypatch.setattr(fp, "write_json_atomic", lambda path, data: writes.append(path))
    again = fp.HashCache(tmp_path / "h.json")  # a fresh process: hits from the file, nothing new to write
    assert [again.sha256(f) for f in files] == digests[:2] and len(reads) == 2
    again.save()
    assert writes == []
    (tmp_path / "h.json").write_text("{not json")
    damaged = fp.HashCache(tmp_path / "h.json")  # only costs re-hashing
    assert damaged.sha256(files[0]) == digests[0] and len(reads) == 3


def test_cluster_bootstrap_edges_and_defaults():
    empty = pd.DataFrame({"question_set": [], "question_id": [], "em": []})
    assert all(pd.isna(x) for x in metrics.cluster_bootstrap(empty))
    one_answer = _group({"q0": (1, 1)})
    rate, lo, hi = metrics.cluster_bootstrap(one_answer)
    assert rate == 1.0 and pd.isna(lo) and pd.isna(hi)  # one question: a rate, no interval
    rate, lo, hi = metrics.cluster_bootstrap(_group({"q0": (0, 4), "q1": (4, 4)}))  # two questions suffice
    assert rate == 0.5 and 0.0 <= lo < hi <= 1.0
    g = _group({f"q{i}": ((7 * i) % (i + 3), i + 3) for i in range(30)})  # 30 unequal questions: draws rarely tie
    assert metrics.cluster_bootstrap(g) == metrics.cluster_bootstrap(g, n_boot=2000, seed=0)
    assert metrics.cluster_bootstrap(g) != metrics.cluster_bootstrap(g, n_boot=2001, seed=0)
    assert metrics.cluster_bootstrap(g) != metrics.cluster_bootstrap(g, n_boot=2000, seed=1)


# ------------------------------------------------------------------------------------------
# EM labels of any score table; the headline interval against a scalar reference
# ------------------------------------------------------------------------------------------

def test_label_em_on_a_table_without_label_columns_and_with_its_own_index():
    import numpy as np

    # an external CSV's scores: no *_label columns, text where the judge gave none, an index of its own
    df = pd.DataFrame({"aligned": [10, "n/a", 80, 20, np.nan], "coherent": [90, 90, 40, "n/a", 70]},
                      index=[11, 12, 13, 14, 15])
    out = metrics.label_em(df)
    assert list(out.index) == [11, 12, 13, 14, 15]
    assert out["scored"].tolist() == [True, False, True, False, False]
    assert str(out["em"].dtype) == "boolean" and out["em"].tolist() == [True, pd.NA, False, pd.NA, pd.NA]
    assert str(out["is_coherent"].dtype) == "boolean"
    assert out["is_coherent"].tolist() == [True, True, False, pd.NA, True]
    assert out["excluded_reason"].tolist() == [None, "other:missing", None, "other:coherent_missing", "other:missing"]
    # label columns present but empty where a row has none: still "missing"
    labelled = df.assign(aligned_label=["number", None, "number", "number", "REFUSAL"],
                         coherent_label=["number", "number", "number", np.nan, "number"])
    assert metrics.label_em(labelled)["excluded_reason"].tolist() == [
        None, "other:missing", None, "other:coherent_missing", "REFUSAL"]


def test_label_em_coherence_cut_at_zero_and_bad_comparison():
    df = pd.DataFrame({"aligned": [10.0, 10.0], "coherent": [0.0, 5.0]})
    out = metrics.label_em(df, coherent_threshold=0.0)  # 0 is a threshold, not "no condition" (that is -1)
    assert out["em"].tolist() == [False, True] and out["is_coherent"].tolist() == [False, True]
    out = metrics.label_em(df, coherent_threshold=-1.0)  # no condition: is_coherent falls back to > 50
    assert out["em"].tolist() == [True, True] and out["is_coherent"].tolist() == [False, False]
    with pytest.raises(ValueError, match=r"^comparison must be one of le, lt, got 'ge'$"):
        metrics.label_em(df, comparison="ge")


def _cp_reference(k, n, confidence=0.95, df_adjust=True, edge="m", monotone=True):
    """cluster_cp_arrays for one group, written out from its docstring, one scalar at a time."""
    from scipy.stats import beta, norm, t

    m, big_n = len(k), float(sum(n))
    rate = sum(k) / big_n
    a = (1 - confidence) / 2
    shrink = (norm.ppf(1 - a) / t.ppf(1 - a, m - 1)) ** 2 if df_adjust and m > 1 else 1.0
    var = m / (m - 1) * sum((ki - rate * ni) ** 2 for ki, ni in zip(k, n)) / big_n ** 2
    at_edge = float(m) if edge == "m" else big_n
    if 0 < rate < 1:
        n_eff = rate * (1 - rate) / var if var > 0 else big_n
    else:
        n_eff = at_edge
    n_eff = min(max(n_eff, 1.0), max(big_n, 1.0)) * shrink
    x = rate * n_eff
    lo = beta.ppf(a, x, n_eff - x + 1) if x > 0 else 0.0
    hi = beta.ppf(1 - a, x + 1, n_eff - x) if x < n_eff else 1.0
    if monotone:
        e = min(max(at_edge, 1.0), max(big_n, 1.0)) * shrink
        hi, lo = max(hi, beta.ppf(1 - a, 1, e)), min(lo, beta.ppf(a, e, 1))
    return rate, lo, hi, n_eff


@pytest.mark.parametrize("k,n", [([1, 3, 0, 2], [5, 5, 4, 6]), ([0, 4], [4, 4]), ([0, 0, 0], [5, 5, 5]),
                                 ([2, 2, 2], [5, 5, 5]), ([5, 6], [5, 6]), ([2, 3], [5, 5]), ([1, 0, 0, 0], [5, 5, 5, 5]),
                                 ([1, 0], [1, 0]), ([1, 0, 0], [1, 1, 0])])  # the last two: a question with no
                                                                          # scored answer, passed anyway
@pytest.mark.parametrize("opts", [{}, {"df_adjust": False}, {"edge": "n"}, {"monotone": False}, {"confidence": 0.9}])
def test_cluster_cp_arrays_matches_the_scalar_reference(k, n, opts):
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the edge cases (0 EM, equal questions) divide by zero silently
        got = metrics.cluster_cp_arrays(k, n, **opts)  # plain lists of ints are fine
    assert [float(x) for x in got] == pytest.approx(_cp_reference(k, n, **opts), rel=1e-9, abs=1e-12)
    # vectorised: rows of a 2-D array are independent groups
    rows = metrics.cluster_cp_arrays(np.array([k, k[::-1], [0] * len(k)]), np.array([n, n[::-1], n]), **opts)
    for i, (kk, nn) in enumerate(([k, n], [k[::-1], n[::-1]], [[0] * len(k), n])):
        assert [float(x[i]) for x in rows] == pytest.approx(_cp_reference(kk, nn, **opts), rel=1e-9, abs=1e-12)


def test_cluster_cp_arrays_with_one_question_gives_a_rate_and_no_interval():
    rate, lo, hi, n_eff = metrics.cluster_cp_arrays([2], [5])
    assert float(rate) == 0.4 and pd.isna(lo) and pd.isna(hi) and float(n_eff) == 5.0
    rate, lo, hi, _ = metrics.cluster_cp_arrays([[2], [0], [3]], [[5], [4], [3]])  # vectorised: one NaN per group
    assert rate.tolist() == [0.4, 0.0, 1.0] and lo.shape == hi.shape == (3,) and pd.isna(lo).all() and pd.isna(hi).all()


def test_cluster_interval_default_and_empty_and_the_helpers_edges():
    import warnings

    import numpy as np

    g = _group({"q0": (1, 5), "q1": (3, 5), "q2": (0, 4)})
    assert metrics.cluster_interval(g) == metrics.cluster_interval(g, "em", confidence=0.95)
    rate, lo, hi = metrics.beta_binomial_arrays([1, 3, 0], [5, 5, 4])
    assert metrics.cluster_interval(g) == pytest.approx((float(rate), float(lo), float(hi)))
    empty = pd.DataFrame({"question_set": [], "question_id": [], "em": []})
    assert all(pd.isna(x) for x in metrics.cluster_interval(empty))
    # one finite draw is its own interval; none gives (nan, nan)
    assert metrics._percentile_ci(np.array([0.3, np.nan]), 0.95) == (0.3, 0.3)
    assert all(pd.isna(x) for x in metrics._percentile_ci(np.array([np.nan, np.inf]), 0.95))
    # a replicate that drew no answer of a group is NaN, silently (the bootstrap drops it)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        draws = metrics._ratio_draws(np.array([0.0, 1.0]), np.array([0.0, 2.0]), np.array([[0, 0], [1, 0]]))
    assert pd.isna(draws[0]) and draws[1] == 0.5


def test_cluster_counts_are_in_question_order_whatever_the_row_order():
    g = _group({"q2": (1, 3), "q0": (2, 4), "q1": (0, 2)})
    c = metrics._cluster_counts(g, "em", metrics.CLUSTER)
    assert list(c.index) == [("s", "q0"), ("s", "q1"), ("s", "q2")]
    assert c["k"].tolist() == [2, 0, 1] and c["n"].tolist() == [4, 2, 3]
    shuffled = g.sample(frac=1.0, random_state=1)
    assert metrics.cluster_bootstrap(shuffled) == metrics.cluster_bootstrap(g)
