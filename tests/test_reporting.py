"""Aggregation numbers against hand-checkable answers, and a small report written end to end."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from evalkit.reporting import render
from evalkit.reporting.aggregate import (
    bootstrap_ci,
    failures,
    paired_difference,
    relative_overhead,
    summarize,
)
from evalkit.reporting.document import interval_text
from evalkit.reporting.paper_table import PaperTable
from evalkit.reporting.render import write_report

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
    assert "![toy / p0: &lt;script&gt;alert(1)&lt;/script&gt; a cat (clip range over methods: 0.200)](grids/toy__p0.png)" in readme
    assert {path.name for path in (out_dir / "plots").iterdir()} == {"toy__paired_differences.png", "toy__quality_vs_compute.png"}
    assert (out_dir / "grids" / "toy.html").is_file() and "[All 1 grids of toy, in that order](grids/toy.md)" in readme
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


BEST_OF_4 = "best_of_n@4444000000"


def _three_methods(tmp_path):
    """Scores, records and images of vanilla, attend_and_excite and best_of_n on two prompts of two subsets, two
    seeds each: on p1 the methods disagree on clip far more than on p0."""
    values = {  # (variant, prompt) -> clip of seeds 0 and 1
        (VANILLA, "p0"): [0.30, 0.32], (EXCITE, "p0"): [0.31, 0.33], (BEST_OF_4, "p0"): [0.30, 0.33],
        (VANILLA, "p1"): [0.10, 0.12], (EXCITE, "p1"): [0.50, 0.52], (BEST_OF_4, "p1"): [0.30, 0.31],
    }
    seconds = {VANILLA: 1.0, EXCITE: 5.0, BEST_OF_4: 4.0}
    rows, records, images = [], [], []
    for (variant, prompt_id), clip in values.items():
        for seed, value in enumerate(clip):
            key = {"model": "tiny", "method": variant.split("@")[0], "variant": variant, "dataset": "toy",
                   "prompt_id": prompt_id, "seed": seed}
            rows += [dict(key, metric="clip", value=value, scorer="clip-scorer"),
                     dict(key, metric="clip_min", value=value / 2, scorer="clip-scorer"),
                     dict(key, metric="detection/cat", value=float(value > 0.2), scorer="det"),
                     dict(key, metric="detection_rate", value=float(value > 0.2), scorer="det"),
                     dict(key, metric="seconds_per_image", value=seconds[variant] + seed / 10, scorer="timer")]
            verifier = ({"verifier_metric": "detection_rate", "verifier_scorer": "det"} if variant == BEST_OF_4 else
                        {"verifier_metric": None, "verifier_scorer": None})
            records.append(dict(key, status="ok", failed_step=None, prompt=f"prompt {prompt_id}",
                                subset={"p0": "animals", "p1": "objects"}[prompt_id], **verifier))
            path = tmp_path / f"{variant.split('@')[0]}_{prompt_id}_{seed}.png"
            Image.new("RGB", (16, 16), (int(value * 255), 0, 0)).save(path)
            images.append(dict(key, path=str(path)))
    return pd.DataFrame(rows), pd.DataFrame(records), pd.DataFrame(images)


METRIC_INFO = {"clip": True, "clip_min": True, "detection_rate": True, "detection/": True, "seconds_per_image": False}


def test_headline_table_comes_first_with_the_papers_values_beside_and_the_best_in_bold(tmp_path):
    scores, records, images = _three_methods(tmp_path)
    paper = PaperTable("A paper, Table 1", pd.DataFrame([
        {"model": "tiny", "dataset": "toy", "method": "attend_and_excite", "metric": "clip", "value": 0.41,
         "paper_text": "0.410", "source": "p. 1"},
        {"model": "tiny", "dataset": None, "method": "attend_and_excite", "metric": "overhead", "value": 3.0,
         "paper_text": "300.0%", "source": "p. 1"},
    ]))
    write_report(tmp_path / "r", "t", scores, records, [], images, None, METRIC_INFO, paper,
                 headline_metrics=["clip", "detection_rate", "overhead"])
    readme = (tmp_path / "r" / "README.md").read_text()
    assert readme.index("## Results: toy") < readme.index("## Image grids") < readme.index("## Plots")
    headline = readme[readme.index("| method |"):readme.index("## Image grids")]
    assert headline.splitlines()[0] == (
        "| method | clip ↑ | clip in the paper | detection_rate ↑ | overhead % vs vanilla ↓ | overhead in the paper |")
    excite = next(line for line in headline.splitlines() if line.startswith("| attend_and_excite |"))
    # attend_and_excite has the best clip (bold), the paper's 0.410 beside it; vanilla the lowest overhead (none)
    # and best_of_n a lower one than attend_and_excite's, so best_of_n's is bold
    assert excite.startswith("| attend_and_excite | **0.415 \\[0.320, 0.510\\]** |") and "| 0.410 |" in excite and "| 300.0% |" in excite
    best_of_n = next(line for line in headline.splitlines() if line.startswith("| best_of_n |"))
    assert "| **+" in best_of_n and "| – |" in best_of_n  # no paper value for best_of_n
    assert "clip_min" not in headline and "detection/cat" not in headline


@pytest.fixture
def clip_and_detection_report(tmp_path):
    """The folder of `_three_methods`' report with clip and detection_rate as its headline metrics."""
    scores, records, images = _three_methods(tmp_path)
    write_report(tmp_path / "r", "t", scores, records, [], images, None, METRIC_INFO,
                 headline_metrics=["clip", "detection_rate"])
    return tmp_path / "r"


def test_paired_differences_are_a_method_by_metric_table_and_breakdowns_collapse(clip_and_detection_report):
    page = (clip_and_detection_report / "index.html").read_text()
    paired = page[page.index("<h2>Paired differences vs vanilla</h2>"):page.index("<h2>Compute overhead</h2>")]
    assert "<th>method</th><th>clip ↑</th><th>detection_rate ↑</th>" in paired
    assert "<td>attend_and_excite</td><td><strong>+0.205 [+0.010, +0.400]</strong></td>" in paired  # excludes 0
    assert "<td>clip_min ↑</td><td><strong>+0.103 [" in paired  # the other metrics, collapsed
    breakdowns = page[page.index("<h2>Breakdowns</h2>"):page.index("<h2>Failures per method</h2>")]
    assert "<details><summary>toy: clip in detail, 1 more metrics of its scorer (clip_min)</summary>" in breakdowns
    assert "<summary>toy: detection_rate in detail, 1 more metrics of its scorer (detection/cat)</summary>" in breakdowns
    # per subset: the methods tie on p0 (animals) and attend_and_excite leads on p1 (objects)
    subsets = breakdowns[breakdowns.index("per prompt subset"):]
    assert "<td>objects</td><td>clip ↑</td><td>0.110 [0.100, 0.120]</td><td><strong>0.510 [" in subsets


def test_a_metric_that_is_best_of_ns_verifier_is_flagged_wherever_best_of_n_reports_it(clip_and_detection_report):
    readme = (clip_and_detection_report / "README.md").read_text()
    headline = readme[readme.index("| method |"):readme.index("## Image grids")]
    best_of_n = next(line for line in headline.splitlines() if line.startswith("| best_of_n |"))
    clip_cell, detection_cell = best_of_n.split(" | ")[1:3]
    assert "\\] †" in detection_cell and "†" not in clip_cell  # it selected by detection, not by clip
    excite = next(line for line in headline.splitlines() if line.startswith("| attend_and_excite |"))
    assert "†" not in excite and "†: the metric this method chose its images by" in readme
    paired = readme[readme.index("## Paired differences vs vanilla"):readme.index("## Compute overhead")]
    assert next(line for line in paired.splitlines() if line.startswith("| best_of_n |")).count("†") == 1


def test_grid_page_shows_the_prompts_where_methods_disagree_most_first(tmp_path):
    scores, records, images = _three_methods(tmp_path)
    write_report(tmp_path / "r", "t", scores, records, [], images, "stand-ins", METRIC_INFO,
                 headline_metrics=["clip"])
    grid_page = (tmp_path / "r" / "grids" / "toy.md").read_text()
    assert grid_page.startswith("> **⚠ stand-ins**")
    assert grid_page.index("(toy__p1.png)") < grid_page.index("(toy__p0.png)")
    assert "clip range over methods: 0.400" in grid_page and "[Back to the report](../README.md)" in grid_page


def test_quality_against_compute_puts_best_of_n_on_the_curve_of_spending_compute_on_seeds(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(render, "compute_plot", lambda path, seconds, panels, colours, seed_spending: drawn.update(
        seconds=seconds, panels=panels, seed_spending=seed_spending))
    scores, records, images = _three_methods(tmp_path)
    write_report(tmp_path / "r", "t", scores, records, [], images, None, METRIC_INFO, headline_metrics=["clip"])
    assert drawn["seconds"]["best_of_n"].mean == pytest.approx(4.05)
    assert drawn["seed_spending"] == [["vanilla", "best_of_n"]]
    assert [panel.title for panel in drawn["panels"]] == ["clip ↑"]
    assert drawn["panels"][0].estimates["attend_and_excite"].mean == pytest.approx(0.415)


def test_narrow_intervals_print_with_enough_decimals_to_tell_their_ends_apart():
    assert interval_text(0.00047, 0.00044, 0.00050, "+") == "+0.000470 [+0.000440, +0.000500]"
    assert interval_text(0.5, 0.4, 0.6) == "0.500 [0.400, 0.600]"
    assert interval_text(443.9, 428.0, 459.4, "+", decimals=1) == "+443.9 [+428.0, +459.4]"


def _manifests(dataset_source=None):
    config = {"sampling": {"scheduler": "dpm_solver", "scheduler_options": {"final_sigmas_type": "sigma_min"},
                           "num_inference_steps": 50, "guidance_scale": 7.5},
              "batch_size": 10, "dataset": {"source_sha256": dataset_source}}
    return [
        {"stage": "generate", "model_source": "stabilityai/stable-diffusion-2-base", "seeds": list(range(10)),
         "model": "sd2_base", "variant": VANILLA, "dataset": "coco", "config": config},
        {"stage": "score", "scorer_key": "owlv2", "scorer": "owlv2", "config": {"name": "owlv2", "hub_id": "google/owlv2-base-patch16-ensemble",
                                      "threshold": 0.1, "tiny": False}},
    ]


def test_protocol_beside_the_papers_flags_every_difference():
    from evalkit.reporting.protocol import (
        DIFFERS,
        NOT_PUBLISHED,
        SAME,
        compare_protocol,
    )

    protocol = {
        "source": "the paper",
        "model": {"paper": "stabilityai/stable-diffusion-2-base"},
        "scheduler": {"paper": "dpm_solver, final_sigmas_type=sigma_min", "note": "diffusers 0.23"},
        "steps": {"paper": 50}, "guidance": {"paper": 5.0, "note": "section 4"},
        "images_per_prompt": {"paper": 10}, "seeds": {"paper": None, "note": "not given"},
        "timing_batch": {"paper": 1}, "detection_threshold": {"paper": 0.3},
        "prompt_set_source_sha256": {"paper": {"coco": "ab12"}},
    }
    rows = {row.label: row for row in compare_protocol(protocol, _manifests(dataset_source="ab12"))}
    assert [rows[label].status for label in ("model", "scheduler (with options)", "denoising steps",
                                             "images per prompt", "sha256 of the prompt set's source file")] == [SAME] * 5
    assert rows["guidance scale"].status == DIFFERS and rows["guidance scale"].ours == "7.5"
    assert rows["guidance scale"].note == "section 4"
    assert rows["seeds"].status == NOT_PUBLISHED and rows["seeds"].ours == "0-9 (one CPU generator per image)"
    assert rows["images per sampling call when timed"].status == DIFFERS  # ours 10, the paper's 1
    assert rows["detection threshold"].ours == "0.1" and rows["detection threshold"].status == DIFFERS
    other_source = {row.label: row for row in compare_protocol(protocol, _manifests(dataset_source="cd34"))}
    assert other_source["sha256 of the prompt set's source file"].status == DIFFERS


def test_the_report_prints_the_protocol_and_points_to_it_from_the_headline(tmp_path):
    scores, records, images = _three_methods(tmp_path)
    paper = PaperTable("A paper", None, "no cells", {"guidance": {"paper": 5.0, "note": "section 4"}})
    write_report(tmp_path / "r", "t", scores, records, _manifests(), images, None, METRIC_INFO, paper)
    readme = (tmp_path / "r" / "README.md").read_text()
    assert "Our protocol differs from the paper's in 1 of 1 items (guidance scale)" in readme
    assert "| guidance scale | 7.5 | 5.0 | **⚠ differs** | section 4 |" in readme


@pytest.mark.parametrize("protocol, message", [
    ({"stepz": {"paper": 50}}, "unknown item 'stepz'"),
    ({"steps": 50}, "paper_table.protocol.steps: write it as {paper: <value or null>, note: <text>}"),
    ({"prompt_set_source_sha256": {"paper": "ab12"}}, "paper must map our dataset names"),
])
def test_a_protocol_the_report_cannot_compare_is_a_one_line_error(protocol, message):
    from evalkit.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        PaperTable("A paper", None, "no cells", protocol)
