"""Aggregation numbers against hand-checkable answers, and a small report written end to end."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from evalkit.reporting import bootstrap_ci, failures, paired_difference, relative_overhead, summarize, write_report
from evalkit.reporting.render import PaperTable

VANILLA = "vanilla@aaaa000000"
EXCITE = "attend_and_excite@3fa2c1d0e9"
SCRIPT_PROMPT = "<script>alert(1)</script> a cat"


def score_rows(variant: str, metric: str, values: list[float], scorer: str = "test-scorer") -> list[dict]:
    """One row per value, for prompt p0 and seeds 0, 1, ...; the method is the variant's name before the @."""
    return [
        {
            "model": "tiny",
            "method": variant.split("@")[0],
            "variant": variant,
            "dataset": "toy",
            "prompt_id": "p0",
            "seed": seed,
            "metric": metric,
            "value": value,
            "scorer": scorer,
        }
        for seed, value in enumerate(values)
    ]


def test_bootstrap_ci_of_constant_values_has_zero_width():
    assert bootstrap_ci(np.full(10, 2.0)) == (2.0, 2.0, 2.0)


def test_bootstrap_ci_mean_ignores_nan_and_is_deterministic_for_a_seed():
    values = np.append(np.arange(1.0, 21.0), np.nan)
    mean, low, high = bootstrap_ci(values, seed=3)
    assert mean == pytest.approx(10.5)
    assert 1.0 <= low < mean < high <= 20.0
    assert bootstrap_ci(values, seed=3) == (mean, low, high)
    assert bootstrap_ci(values, seed=4) != (mean, low, high)


def test_bootstrap_ci_of_one_value_is_a_point_and_of_none_is_nan():
    assert bootstrap_ci(np.array([5.0, np.nan])) == (5.0, 5.0, 5.0)
    assert all(np.isnan(bootstrap_ci(np.array([np.nan]))))


def test_summarize_groups_per_variant_and_metric():
    scores = pd.DataFrame(score_rows(VANILLA, "clip", [1.0, 3.0]) + score_rows(EXCITE, "clip", [4.0, 4.0, np.nan]))
    summary = summarize(scores).set_index("variant")
    assert summary.loc[VANILLA, "mean"] == pytest.approx(2.0)
    assert summary.loc[EXCITE, ["n", "mean", "ci_low", "ci_high"]].tolist() == [2, 4.0, 4.0, 4.0]


def test_paired_difference_uses_only_pairs_present_in_both():
    baseline = score_rows(VANILLA, "clip", [1.0, 2.0, 3.0, 10.0])
    # Seed 3 has no score for the method, so the baseline's 10.0 must not enter the difference.
    method = score_rows(EXCITE, "clip", [1.5, 2.5, 3.5])
    differences = paired_difference(pd.DataFrame(baseline + method))
    assert len(differences) == 1
    row = differences.iloc[0]
    assert (row.variant, row.n_pairs) == (EXCITE, 3)
    # Every pair differs by exactly 0.5, so every resample of pairs does too.
    assert (row.mean_difference, row.ci_low, row.ci_high) == pytest.approx((0.5, 0.5, 0.5))


def test_relative_overhead_of_half_again_the_baseline_time():
    scores = pd.DataFrame(
        score_rows(VANILLA, "seconds_per_image", [1.0, 1.0]) + score_rows(EXCITE, "seconds_per_image", [1.5, 1.5])
    )
    overhead = relative_overhead(scores)
    assert overhead[["variant", "method"]].values.tolist() == [[EXCITE, "attend_and_excite"]]
    assert overhead.iloc[0][["overhead", "ci_low", "ci_high"]].tolist() == pytest.approx([0.5, 0.5, 0.5])


def test_a_paper_table_that_is_not_available_says_so(tmp_path):
    scores = pd.DataFrame(score_rows(VANILLA, "clip", [0.2, 0.3]))
    records = pd.DataFrame([{"model": "tiny", "method": "vanilla", "variant": VANILLA, "dataset": "toy",
                             "prompt_id": "p0", "seed": 0, "status": "ok", "failed_step": None, "prompt": "a cat"}])
    paper = PaperTable("AR Table 2 (FID)", None, "Our copy has the caption only.")
    write_report(tmp_path, "t", scores, records, [], pd.DataFrame(columns=["model", "method", "variant", "dataset",
                 "prompt_id", "seed", "path"]), None, {"clip": True}, paper)
    assert "AR Table 2 (FID): not available. Our copy has the caption only." in (tmp_path / "README.md").read_text()


def test_failures_counts_failed_records_per_variant():
    records = pd.DataFrame(
        {
            "model": "tiny",
            "method": ["vanilla", "attend_and_excite", "attend_and_excite"],
            "variant": [VANILLA, EXCITE, EXCITE],
            "status": ["ok", "failed", "ok"],
        }
    )
    counts = failures(records).set_index("variant")
    assert counts.loc[EXCITE, ["n_records", "n_failed"]].tolist() == [2, 1]
    assert counts.loc[VANILLA, "n_failed"] == 0


def test_write_report_escapes_user_text_and_writes_plots_and_grids(tmp_path):
    scores = pd.DataFrame(
        score_rows(VANILLA, "clip", [0.2, 0.3])
        + score_rows(EXCITE, "clip", [0.4, 0.5])
        + score_rows(VANILLA, "seconds_per_image", [1.0, 1.2])
        + score_rows(EXCITE, "seconds_per_image", [1.5, 1.7])
        + score_rows(VANILLA, "peak_memory_mb", [100.0, 100.0])
        + score_rows(EXCITE, "peak_memory_mb", [120.0, 120.0])
    )
    keys = [("vanilla", VANILLA, seed) for seed in (0, 1)] + [("attend_and_excite", EXCITE, seed) for seed in (0, 1)]
    records = pd.DataFrame(
        [
            {"model": "tiny", "method": method, "variant": variant, "dataset": "toy", "prompt_id": "p0",
             "seed": seed, "status": "ok", "failed_step": None, "prompt": SCRIPT_PROMPT}
            for method, variant, seed in keys
        ]
    )
    image_rows = []
    for method, variant, seed in keys:
        path = tmp_path / f"{method}_{seed}.png"
        Image.new("RGB", (32, 32), (40 * seed, 120, 200)).save(path)
        image_rows.append({"model": "tiny", "method": method, "variant": variant, "dataset": "toy",
                           "prompt_id": "p0", "seed": seed, "path": str(path)})
    paper = PaperTable("Chefer et al. 2023, Table 9", pd.DataFrame([
        {"model": "tiny", "dataset": "toy", "method": "attend_and_excite", "metric": "clip", "value": 0.45,
         "paper_text": "0.450", "source": "p. 9"},
        {"model": "tiny", "dataset": "toy", "method": "vanilla", "metric": "clip", "value": 0.9,
         "paper_text": "0.900", "source": "p. 9"},
        {"model": "sd14", "dataset": "toy", "method": "attend_and_excite", "metric": "clip", "value": 0.45,
         "paper_text": "0.450", "source": "p. 9"},
        {"model": "tiny", "dataset": None, "method": "attend_and_excite", "metric": "overhead", "value": 0.5,
         "paper_text": "50.0%", "source": "p. 9"},
        {"model": "tiny", "dataset": "toy", "method": "conform", "metric": "clip", "value": 0.5,
         "paper_text": "0.500", "source": "p. 9"},
    ]))
    out_dir = tmp_path / "report"

    index = write_report(
        out_dir,
        title="Toy <run>",
        scores=scores,
        records=records,
        manifests=[{"variant": EXCITE, "config": {"note": SCRIPT_PROMPT}}],
        image_paths=pd.DataFrame(image_rows),
        notice="Made with tiny random-weight models: these numbers mean nothing",
        metric_info={"clip": True, "seconds_per_image": False},
        paper=paper,
    )

    page = index.read_text(encoding="utf-8")
    assert index == out_dir / "index.html"
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;" in page
    assert page.index("these numbers mean nothing") < page.index("<h1>")
    assert "0.450 [0.400, 0.500]" in page  # attend_and_excite's clip mean and its interval
    published = page[page.index("Published values"):page.index("Failures per method")]
    assert "Chefer et al. 2023, Table 9. Source: p. 9." in published
    # the paper's value inside our interval, outside it, on another model, the overhead (no dataset: every
    # dataset), and a method we did not run
    assert "<td>toy</td><td>attend_and_excite</td><td>clip</td><td>0.450</td><td>0.450 [0.400, 0.500]</td><td>yes</td>" in published
    assert "<td>toy</td><td>vanilla</td><td>clip</td><td>0.900</td><td>0.250 [0.200, 0.300]</td><td>no</td>" in published
    assert "<td>– (ours on tiny, the paper&#x27;s on sd14)</td>" in published
    assert "<td>toy</td><td>attend_and_excite</td><td>overhead</td><td>50.0%</td><td>45.5 [" in published
    assert "<td>toy</td><td>conform</td><td>clip</td><td>0.500</td><td>–</td><td>–</td>" in published
    assert "+45.5 [" in page  # overhead in %: mean 1.6 s against 1.1 s
    assert json.dumps(SCRIPT_PROMPT)[1:-1].replace("<", "&lt;").replace(">", "&gt;") in page
    readme = (out_dir / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("> **⚠ Made with tiny random-weight models")
    assert "[toy / p0: &lt;script&gt;alert(1)&lt;/script&gt; a cat](grids/toy__p0.png)" in readme
    assert {path.name for path in (out_dir / "plots").iterdir()} == {
        "clip.png", "seconds_per_image.png", "peak_memory_mb.png"
    }
    with Image.open(out_dir / "grids" / "toy__p0.png") as grid:
        assert grid.width > 2 * 192 and grid.height > 2 * 192  # two variant columns, two seed rows


def test_compute_section_gives_the_batch_times_were_taken_at_and_what_a_method_skipped(tmp_path):
    scores = pd.DataFrame(score_rows(VANILLA, "seconds_per_image", [1.0, 1.0]) + score_rows(EXCITE, "seconds_per_image", [1.5, 1.5]))
    skipped = "no modifier-noun pair: sampled as plain Stable Diffusion"
    records = pd.DataFrame([
        {"model": "tiny", "method": method, "variant": variant, "dataset": "toy", "prompt_id": "p0", "seed": seed,
         "status": "ok", "failed_step": None, "prompt": "a cat", "batch_size": 10,
         "method_notes": [skipped] if (method, seed) == ("attend_and_excite", 1) else []}
        for method, variant in (("vanilla", VANILLA), ("attend_and_excite", EXCITE)) for seed in (0, 1)
    ])
    write_report(tmp_path, "t", scores, records, [], pd.DataFrame(columns=["model", "method", "variant", "dataset",
                 "prompt_id", "seed", "path"]), None, {}, timing_note="ten seeds per call, as the official script")
    text = (tmp_path / "README.md").read_text()
    assert "Timing protocol: ten seeds per call, as the official script" in text
    assert "images per sampling call" in text and f"1 of 2 images: {skipped}" in text
