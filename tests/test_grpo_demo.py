"""`vhack demo`: the quick run end to end (files and fields the README promises; the warm start
is shortened to keep CI fast: docs/demo/ holds a full run), the summary's statistics and the
verdict computed from them, worker planning and the warm-start cache key, and the README's demo
section generated from the committed docs/demo/summary.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vhack.cli import main
from vhack.grpo.demo import (
    DemoSettings,
    format_table,
    plan_workers,
    readme_section,
    summarize,
    verdict,
    wilson_interval,
)

ROOT = Path(__file__).resolve().parents[1]

STEP_FIELDS = {
    "step",
    "arm",
    "seed",
    "reward",
    "reward_std",
    "hack_rate",
    "solve_rate",
    "env/hack_known",
    "env/hack_heldout",
    "frac_reward_zero_std",
    "completions/mean_length",
    "num_sequences",
    "skipped",
    "seconds",
}
UPDATE_FIELDS = {
    "loss",
    "clip_ratio/region_mean",
    "vhack/cin_mean",
    "vhack/cin_mean_two_sided",
    "vhack/fired",
    "vhack/energy_removed",
    "vhack/energy_hackward",
    "vhack/skipped_steps",
    "cin_hack",
    "grad_norm",
    "learning_rate",
}


def test_demo_quick_writes_its_files(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--out", str(out), "--quiet", "--warm-steps", "60", "--workers", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Known loophole" in printed and "Held-out loophole" in printed
    assert "vanilla" in printed and "projected" in printed and "Over 1 seed" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"vanilla", "projected"}
    for arm, entry in summary["arms"].items():
        assert entry["seeds"] == [0], arm
        for key in ("hack", "known", "heldout", "solve"):
            for end in ("start", "end"):
                values = entry[f"{key}_{end}"]
                assert len(values) == 1 and 0.0 <= values[0] <= 1.0, (arm, key)
        assert entry["held"]["known"]["n"] == 1
        for kind in ("greedy", "sampled"):
            assert set(entry["eval"][kind]) == {"solve", "hack", "hack_known", "hack_heldout"}
    assert summary["settings"]["steps"] == 30 and summary["end_window"] == 5
    assert summary["wall_seconds"] > 0 and summary["machine"]["torch_threads_per_process"] == 1
    assert summary["machine"]["workers"] <= 2 and "load_average_before" in summary["machine"]
    assert "0" in summary["warm_start"] and set(summary["eval_start"]) == {"greedy", "sampled"}
    assert summary["verdict"].startswith("Over 1 seed")

    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 30
    assert {(r["arm"], r["step"]) for r in records} == {
        (a, s) for a in ("vanilla", "projected") for s in range(30)
    }
    for r in records:
        assert set(r) >= STEP_FIELDS, STEP_FIELDS - set(r)
        if not r["skipped"]:
            assert set(r) >= UPDATE_FIELDS, UPDATE_FIELDS - set(r)
    updated = [r for r in records if not r["skipped"]]
    assert updated, "no step had a group with differing rewards"
    for r in updated:  # vanilla only measures; projected removes the hack-ward part
        if r["arm"] == "vanilla":
            assert abs(r["vhack/energy_removed"]) < 1e-5
        else:
            assert r["cin_hack"] < 1e-4

    for png in ("hack_rate.png", "tradeoff.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert report.splitlines()[2] == summary["verdict"]  # the report opens with the verdict
    assert "| arm | held (end < 0.2) | 95% CI |" in report and "tradeoff.png" in report


def _history(arm: str, seed: int, known: float, heldout: float, steps: int = 10) -> list[dict]:
    """Synthetic step records: rates 0 at step 0, then constant."""
    rows = []
    for step in range(steps):
        k, h = (0.0, 0.0) if step == 0 else (known, heldout)
        rows.append(
            {
                "arm": arm,
                "seed": seed,
                "step": step,
                "hack_rate": k + h,
                "env/hack_known": k,
                "env/hack_heldout": h,
                "solve_rate": 1 - k - h,
                "skipped": False,
                "vhack/energy_removed": 0.25 if arm != "vanilla" else 0.0,
                "clip_ratio/region_mean": 0.0,
            }
        )
    return rows


def test_wilson_interval_known_values():
    assert wilson_interval(0, 8) == pytest.approx((0.0, 0.3244), abs=1e-4)
    assert wilson_interval(8, 8) == pytest.approx((0.6756, 1.0), abs=1e-4)
    low, high = wilson_interval(5, 12)
    assert (low, high) == pytest.approx((0.1933, 0.6805), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_summary_counts_held_runs_and_the_verdict_follows_the_numbers():
    settings = DemoSettings(
        seeds=tuple(range(8)), arms=("vanilla", "projected", "random-matched"), steps=10
    )
    history = []
    for seed in range(8):
        history += _history("vanilla", seed, 0.9, 0.05)
        history += _history("projected", seed, 0.0 if seed < 6 else 0.5, 0.6)  # held 6/8 known
        history += _history("random-matched", seed, 0.8, 0.1)
    summary = summarize(history, settings)
    held = summary["arms"]["projected"]["held"]
    assert (held["known"]["k"], held["known"]["n"]) == (6, 8)
    assert held["heldout"]["k"] == 0 and held["hack"]["k"] == 0
    assert (held["known"]["low"], held["known"]["high"]) == pytest.approx(wilson_interval(6, 8))
    assert summary["arms"]["vanilla"]["held"]["known"]["k"] == 0
    assert summary["arms"]["vanilla"]["held"]["heldout"]["k"] == 8
    summary["settings"]["kl_beta"] = 1.0
    text = verdict(summary)
    assert "Projected held the known loophole in 6/8 runs (95 % CI 0.41-0.93)" in text
    assert "more often than every control (best: random-matched, 0/8)" in text
    assert "intervals do not overlap" in text
    assert "the held-out loophole in 0/8 runs" in text
    assert "random-matched removed 0.25 of the gradient energy against projected's 0.25" in text

    # the same numbers with the control holding as often: the verdict says so
    for r in history:
        if r["arm"] == "random-matched" and r["step"] > 0:
            r["env/hack_known"] = 0.0 if r["seed"] < 6 else 0.5
    text = verdict(summarize(history, settings) | {"settings": {"kl_beta": 1.0}})
    assert "as often as the best control (random-matched, 6/8)" in text

    table = format_table(summary, markdown=True)
    assert "| projected | 6/8 | 0.41-0.93 |" in table


def test_workers_never_exceed_cores_and_every_process_uses_one_thread():
    assert plan_workers(DemoSettings(workers=8), cores=2) == 2
    assert plan_workers(DemoSettings(workers=0), cores=2) == 2
    assert plan_workers(DemoSettings(workers=1), cores=16) == 1
    assert plan_workers(DemoSettings(seeds=(0,), arms=("vanilla",)), cores=16) == 1


def test_warm_start_runs_with_fixed_threads_and_the_cache_key_holds_them(monkeypatch):
    import torch

    import vhack
    from vhack.grpo import warmstart
    from vhack.grpo.envs.toy import ToyEnv

    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        warmstart.warm_start(
            warmstart.toy_model(0),
            vhack.models.byte_tokenizer(),
            ToyEnv(),
            steps=2,
            batch_size=4,
            callback=lambda step, loss: seen.append(torch.get_num_threads()),
        )
        assert seen == [warmstart.WARM_THREADS] * 2
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    settings = DemoSettings()
    key = settings.warm_key(0)
    monkeypatch.setattr(warmstart, "WARM_THREADS", 2)
    assert settings.warm_key(0) != key
    monkeypatch.setattr(warmstart, "WARM_THREADS", 1)
    assert DemoSettings(heldout_share=0.0).warm_key(0) != key


def test_readme_demo_section_is_generated_from_the_committed_summary():
    summary = json.loads((ROOT / "docs" / "demo" / "summary.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert readme_section(summary) in readme, (
        "README's demo section differs from docs/demo/summary.json; regenerate it with "
        "vhack.grpo.demo.update_readme('README.md', summary)"
    )
    report = (ROOT / "docs" / "demo" / "report.md").read_text()
    assert summary["verdict"] in report
    assert not math.isnan(summary["wall_seconds"])
