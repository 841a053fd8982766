"""End to end: `vhack demo --quick` writes summary.json, history.jsonl, hack_rate.png and
report.md with the fields the README promises. The warm start is shortened to keep CI fast (the
files and fields are the point here, not the learning; docs/demo/ holds a full run)."""

from __future__ import annotations

import json

from vhack.cli import main

STEP_FIELDS = {
    "step",
    "arm",
    "seed",
    "reward",
    "reward_std",
    "hack_rate",
    "solve_rate",
    "frac_reward_zero_std",
    "completions/mean_length",
    "num_sequences",
    "skipped",
    "seconds",
}
UPDATE_FIELDS = {
    "loss",
    "kl",
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
    assert "hack start" in printed and "vanilla" in printed and "projected" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"vanilla", "projected"}
    for arm, entry in summary["arms"].items():
        assert entry["seeds"] == [0], arm
        for key in ("hack_start", "hack_end", "solve_start", "solve_end"):
            assert len(entry[key]) == 1 and 0.0 <= entry[key][0] <= 1.0, (arm, key)
        assert len(entry["energy_removed"]) == 1
    assert summary["settings"]["steps"] == 30 and summary["end_window"] == 5
    assert summary["wall_seconds"] > 0 and summary["machine"]["torch_threads_per_process"] == 1
    assert "0" in summary["warm_start"]

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
            assert r["vhack/energy_removed"] == 0.0 or abs(r["vhack/energy_removed"]) < 1e-5
        else:
            assert r["cin_hack"] < 1e-4

    assert (out / "hack_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| arm | hack start | hack end |" in report and "hack_rate.png" in report
