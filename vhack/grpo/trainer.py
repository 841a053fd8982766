"""The reference GRPO loop on an SVD adapter: sample, grade, advantages, clipped loss, projection,
AdamW on dS; statistics read once per step; checkpoints that resume identically.

    trainer = GRPOTrainer(adapter, tok, env, GRPOConfig(arm="projected"), hack_basis=basis)
    for record in trainer.train():   # one dict per step (also appended to log_path as JSONL)
        ...

Sampler, learner and grader are separate parts: `sample_rollouts` (generate on the merged dense
weights), `token_logprobs` + `policy_loss` (the learner, through the adapter) and the
environment's `score_batch` (the grader). The KL reference is the same model with dS bypassed.

Each record holds the projection's statistics under the names VHackCallback logs
(`vhack.projstats`: `vhack/cin_mean`, `vhack/cin_mean_two_sided`, `vhack/fired`,
`vhack/energy_removed`, `vhack/energy_hackward`, `vhack/norm_before`, `vhack/norm_after`, averaged
over the step's iterations that had a gradient, and `vhack/skipped_steps`), plus the trainer's
probes: `cin_hack` (hack-ward cin, on the extracted basis, of the gradient the optimizer got;
averaged like them), `cin_s` / `cin_t` (students' and teacher's, first iteration; NaN for a
segment without gradient), `grad_norm`, `loss`. A step where no iteration had a gradient logs
only `vhack/skipped_steps` of these.
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

import vhack
from vhack.errors import UsageError
from vhack.grpo.arms import (
    MatchedRandomBasis,
    basis_overlap,
    make_projector,
    random_basis,
    shuffled_basis,
    subspace,
)
from vhack.grpo.checkpoint import (
    CheckpointError,
    history_writer,
    latest_checkpoint,
    read_checkpoint,
    read_latest,
    remove_stale,
    truncate_history,
    write_checkpoint,
)
from vhack.grpo.config import GRPOConfig
from vhack.grpo.envs.base import Environment, Task
from vhack.grpo.loss import group_advantages, policy_loss
from vhack.grpo.rollout import Rollouts, encode_prompts, sample_rollouts, token_logprobs
from vhack.pairs import Pair
from vhack.projstats import METRIC_PREFIX, STAT_FIELDS, mean_over_steps_with_gradient

__all__ = ["GRPOTrainer", "arm_basis", "check_fits", "latest_checkpoint"]

# Fields that may differ between a checkpoint's config and the resuming run's.
RESUMABLE_CHANGES = ("steps", "checkpoint_every")


def arm_basis(
    arm: str,
    adapter,
    tok,
    hack_basis,
    config: GRPOConfig,
    nonhack_pairs: Sequence[Pair] | None = None,
) -> dict[str, torch.Tensor]:
    """The basis an arm projects with ({module name: V [k, r]}): the hack basis for vanilla, kl,
    projected, projected-update and refresh; a control basis for random-v, shuffled-v, nonhack-v
    (nonhack-v extracts one from nonhack_pairs at the current dS). random-matched starts from
    random-v's and is re-chosen for every gradient by the trainer (MatchedRandomBasis)."""
    V = {n: v[: config.k] for n, v in subspace(hack_basis).items()}
    if arm in ("random-v", "random-matched"):
        return random_basis(V, seed=config.basis_seed)
    if arm == "shuffled-v":
        return shuffled_basis(V)
    if arm == "nonhack-v":
        if not nonhack_pairs:
            raise UsageError(
                "arm nonhack-v needs control pairs that differ in something other than hacking "
                "(the toy environment ships them; otherwise pass a pairs file)"
            )
        basis = vhack.extract(
            adapter, tok, list(nonhack_pairs), top_k=config.top_k, n_heldout=0, progress=False
        )
        return {n: v[: config.k] for n, v in subspace(basis).items()}
    return V


def _info_means(scores, own: list[bool]) -> dict[str, float]:
    """{"env/<key>": mean} of the numeric and boolean Score.info fields over the policy's own
    rollouts (e.g. a code environment's visible-pass rate)."""
    sums: dict[str, list[float]] = {}
    for score, mine in zip(scores, own, strict=True):
        if not mine:
            continue
        for key, value in score.info.items():
            if isinstance(value, (bool, int, float)):
                sums.setdefault(f"env/{key}", []).append(float(value))
    return {key: statistics.fmean(values) for key, values in sums.items()}


def check_fits(config: GRPOConfig, env: Environment, tok, model) -> int:
    """The new-token budget (config.max_new_tokens or the environment's), after checking that 16
    sample prompts plus it fit the model's positions (UsageError otherwise)."""
    probe = env.sample(16, random.Random(config.seed ^ 0x5EED))
    ids, _ = encode_prompts(tok, [t.prompt for t in probe])
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return config.check_fits(ids.shape[1], positions, env.max_new_tokens)


class GRPOTrainer:
    """GRPO on `adapter.delta` with the arm's projector.

    adapter: a vhack.Adapter of the policy; tok: its tokenizer; env: an Environment; config: a
    GRPOConfig. hack_basis: the extracted hack basis (HackBasis or {name: V}); every arm logs the
    hack-ward cin of its gradient on it (cin_hack). nonhack_pairs: pairs for arm nonhack-v;
    refresh_pairs: the pairs re-extracted from in arm "refresh" (default env.hack_pairs()).
    out_dir: where history.jsonl and checkpoints go (None: nothing written). teacher: task ->
    completion text, the cached rollouts mixed in when config.teacher_per_group > 0. Seeds torch's
    global RNG with config.seed (generation samples from it), unless resuming.
    """

    def __init__(
        self,
        adapter,
        tok,
        env: Environment,
        config: GRPOConfig,
        *,
        hack_basis,
        nonhack_pairs: Sequence[Pair] | None = None,
        refresh_pairs: Sequence[Pair] | None = None,
        out_dir: str | os.PathLike | None = None,
        log_fields: dict | None = None,
        teacher: Callable[[Task], str] | None = None,
    ) -> None:
        if not isinstance(config, GRPOConfig):
            raise TypeError(f"config must be a GRPOConfig, got {type(config).__name__}")
        config.validate()
        if not isinstance(adapter, vhack.Adapter):
            raise TypeError("adapter must be a vhack.Adapter (from vhack.wrap)")
        self.adapter, self.tok, self.env, self.config = adapter, tok, env, config
        self.model = adapter.model
        self.device = adapter.delta.device
        self.max_new_tokens = check_fits(config, env, tok, self.model)
        self.hack_basis = {n: v[: config.k] for n, v in subspace(hack_basis).items()}
        self.refresh_pairs = list(refresh_pairs or env.hack_pairs())
        if config.arm == "refresh" and not self.refresh_pairs:
            raise UsageError(f"arm refresh needs hack pairs; environment {env.name!r} has none")
        self.basis = arm_basis(config.arm, adapter, tok, hack_basis, config, nonhack_pairs)
        self.projector = make_projector(config.arm, adapter, self.basis)
        self.matched = None
        if config.arm == "random-matched":
            self.matched = MatchedRandomBasis(adapter, self.hack_basis, seed=config.basis_seed)
        self.probe = vhack.Projector(
            adapter, self.hack_basis, mode="measure", on_nonfinite="ignore"
        )
        self.optimizer = torch.optim.AdamW(
            [adapter.delta], lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.global_step = 0
        self.rng = random.Random(config.seed)
        if config.teacher_per_group and teacher is None:
            raise UsageError("teacher_per_group > 0 needs a teacher (task -> completion text)")
        self.teacher = teacher
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.log_fields = dict(log_fields or {})
        torch.manual_seed(config.seed)

    # ---- one step ----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """Sample, grade and update once; returns the step's record (host floats)."""
        cfg, G = self.config, self.config.num_generations
        t0 = time.perf_counter()
        tasks = self.env.sample(cfg.prompts_per_step, self.rng)
        ro = sample_rollouts(
            self.adapter,
            self.tok,
            [t.prompt for t in tasks],
            G,
            self.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
        )
        sources = torch.zeros(len(ro.texts), dtype=torch.int64)  # 0 student, 1 teacher
        if cfg.teacher_per_group:
            sources = self._mix_teacher(ro, tasks)
        scores = self.env.score_batch([t for t in tasks for _ in range(G)], ro.texts)
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)
        adv, informative = group_advantages(rewards, G, cfg.scale_rewards)
        lengths = ro.completion_mask.sum(1)
        own = (sources == 0).tolist()
        record: dict = {
            "step": self.global_step,
            "arm": cfg.arm,
            "seed": cfg.seed,
            **self.log_fields,
            "reward": rewards.mean().item(),
            "reward_std": rewards.view(-1, G).std(1).mean().item(),
            # the policy's own rollouts only (teacher rows are not the policy's behaviour)
            "hack_rate": statistics.fmean(
                s.hacked for s, src in zip(scores, own, strict=True) if src
            ),
            "solve_rate": statistics.fmean(
                s.solved for s, src in zip(scores, own, strict=True) if src
            ),
            "frac_reward_zero_std": 1 - informative.float().mean().item(),
            "completions/mean_length": lengths.float().mean().item(),
        }
        record.update(_info_means(scores, own))
        # rows of zero-variance groups have A = 0: with beta = 0 their gradient is exactly 0 and
        # they are left out; with beta > 0 they stay for the KL term (as in TRL)
        rows = informative.repeat_interleave(G) | (cfg.beta > 0)
        keep = rows.nonzero().flatten()
        record["num_sequences"] = int(keep.numel())
        if not bool(informative.any()) and cfg.beta == 0:  # no signal at all: no update
            record.update(skipped=True)
            self.global_step += 1
            self._maybe_refresh(record)
            record["seconds"] = time.perf_counter() - t0
            return record
        device_stats = self._update(
            ro.select(keep), adv[keep].to(self.device), sources[keep], num_rows=len(ro.texts)
        )
        names = list(device_stats)
        values = torch.stack([device_stats[n].float().reshape(()) for n in names]).tolist()
        record.update(zip(names, values, strict=True))  # the one host read of the step
        skipped = METRIC_PREFIX + "skipped_steps"
        record[skipped] = int(record[skipped])
        if record[skipped] == cfg.num_iterations:  # no iteration had a gradient: no NaN logged
            for field in STAT_FIELDS:
                del record[METRIC_PREFIX + field]
            del record["cin_hack"]
        record["skipped"] = False
        record["learning_rate"] = self.optimizer.param_groups[0]["lr"]
        self.global_step += 1
        self._maybe_refresh(record)
        record["seconds"] = time.perf_counter() - t0
        return record

    def _maybe_refresh(self, record: dict) -> None:
        """Arm refresh: re-extract the basis every refresh_every steps, whether or not the step
        updated (a step without reward variance must not postpone it); logs basis_overlap."""
        cfg = self.config
        if cfg.arm == "refresh" and self.global_step % cfg.refresh_every == 0:
            record["basis_overlap"] = self._refresh()

    def _mix_teacher(self, ro: Rollouts, tasks: Sequence[Task]) -> torch.Tensor:
        """Replace the last teacher_per_group completions of every group by the teacher's, in
        place; returns the source of every row [B] int64 (0 student, 1 teacher)."""
        G, n = self.config.num_generations, self.config.teacher_per_group
        T, P = ro.completion_mask.shape[1], ro.prompt_len
        eos = self.tok.eos_token_id
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else eos
        sources = torch.zeros(len(ro.texts), dtype=torch.int64)
        for g, task in enumerate(tasks):
            text = self.teacher(task)
            ids = (self.tok(text, add_special_tokens=False)["input_ids"] + [eos])[:T]
            row = torch.full((T,), pad, dtype=torch.int64)
            row[: len(ids)] = torch.tensor(ids)
            for b in range(g * G + G - n, g * G + G):
                ro.input_ids[b, P:] = row
                ro.completion_mask[b] = 0.0
                ro.completion_mask[b, : len(ids)] = 1.0
                ro.attention_mask[b, P:] = ro.completion_mask[b].long()
                ro.texts[b] = self.tok.decode(ids, skip_special_tokens=True)
                sources[b] = 1
        return sources

    def _update(
        self,
        ro,
        adv: torch.Tensor,
        sources: torch.Tensor | None = None,
        num_rows: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """num_iterations clipped-objective steps on the selected rollouts; device statistics
        averaged over the iterations. num_rows: the loss normaliser's sequence count (all rows
        sampled in the step; default the selected ones). When teacher rows are present (sources == 1), the first
        iteration's backward also yields the students' and the teacher's dS gradients
        separately (per-segment reduction, no extra backward): cin_s and cin_t."""
        cfg, model, delta = self.config, self.model, self.adapter.delta
        ro.input_ids = ro.input_ids.to(self.device)
        ro.attention_mask = ro.attention_mask.to(self.device)
        mask = ro.completion_mask.to(self.device)
        ref_logp = old_logp = None
        with torch.no_grad():
            if cfg.beta > 0 or cfg.log_kl:
                with self.adapter.base():  # dS bypassed: the exact reference, no copy
                    ref_logp = token_logprobs(model, ro, cfg.temperature)
            if cfg.num_iterations > 1:
                old_logp = token_logprobs(model, ro, cfg.temperature)
        per_iter: list[dict[str, torch.Tensor]] = []
        summaries: list[torch.Tensor] = []  # ProjStats.summary() of the projection, per iteration
        probes: list[torch.Tensor] = []  # ... and of the hack-basis probe
        mixed = sources is not None and bool((sources == 1).any()) and bool((sources == 0).any())
        for it in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            capture = contextlib.nullcontext()
            if mixed and it == 0:
                L = ro.input_ids.shape[1]
                ids = sources.to(self.device).repeat_interleave(L)
                capture = self.adapter.segment_grads(ids, 2)
            with capture as cap:
                logp = token_logprobs(model, ro, cfg.temperature)
            loss, st = policy_loss(
                logp,
                old_logp if old_logp is not None else logp.detach(),
                adv,
                mask,
                self.max_new_tokens,
                epsilon=cfg.epsilon,
                epsilon_high=cfg.epsilon_high,
                beta=cfg.beta,
                ref_logp=ref_logp,
                kl_clamp=cfg.kl_clamp,
                num_rows=num_rows,
            )
            loss.backward()
            if cap is not None:  # per-source hack-ward cin from the captured segments
                for name, src in (("cin_s", 0), ("cin_t", 1)):
                    st[name] = self.probe.measure(cap.packed[src].clone()).summary()[0]
            if self.matched is not None:  # random-matched: axes matched to this gradient
                self.basis = self.matched.choose(delta.grad, cfg.matched_energy)
                self.projector = make_projector(cfg.arm, self.adapter, self.basis)
            stats = self.projector.pre_step()  # where="grad": projected; "update": snapshot
            # the hack-ward cin (on the extracted basis) of the gradient the optimizer gets
            probes.append(self.probe.measure().summary())
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([delta], cfg.max_grad_norm)
            grad_norm = delta.grad.norm()
            self.optimizer.step()
            stats = self.projector.post_step() or stats
            summaries.append(stats.summary())
            per_iter.append({"loss": loss.detach(), **st, "grad_norm": grad_norm})
        out = {k: torch.stack([d[k] for d in per_iter if k in d]).mean() for k in per_iter[-1]}
        for k in ("cin_s", "cin_t"):
            if k in per_iter[0]:
                out[k] = per_iter[0][k]
        # the projection's statistics (vhack.projstats), over the iterations with a gradient
        means, skipped = mean_over_steps_with_gradient(torch.stack(summaries))
        out.update({METRIC_PREFIX + f: v for f, v in zip(STAT_FIELDS, means, strict=True)})
        out[METRIC_PREFIX + "skipped_steps"] = skipped
        out["cin_hack"] = mean_over_steps_with_gradient(torch.stack(probes))[0][0]
        return out

    def _refresh(self) -> float:
        """Re-extract the hack basis at the current dS; returns its overlap with the old one."""
        cfg = self.config
        new = vhack.extract(
            self.adapter, self.tok, self.refresh_pairs, top_k=cfg.top_k, n_heldout=0, progress=False
        )
        new = {n: v[: cfg.k] for n, v in subspace(new).items()}
        overlap = basis_overlap(self.basis, new)
        self.basis = new
        self.projector = make_projector(cfg.arm, self.adapter, new)
        return overlap

    # ---- loop ------------------------------------------------------------------------------------
    def steps(self, until: int | None = None) -> Iterator[dict]:
        """Run steps until global_step == until (default config.steps), yielding each record;
        appends them to out_dir/history.jsonl and checkpoints every checkpoint_every steps."""
        until = self.config.steps if until is None else until
        log = contextlib.nullcontext(None)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale(self.out_dir)  # what a killed run left: temp files, .tmp checkpoints
            log = history_writer(self.out_dir / "history.jsonl")  # a torn last line is cut
        with log as append:
            while self.global_step < until:
                record = self.train_step()
                if append is not None:
                    append(record)
                every = self.config.checkpoint_every
                if self.out_dir is not None and every and self.global_step % every == 0:
                    self.save_checkpoint()
                yield record

    def train(self, until: int | None = None, callback: Callable[[dict], None] | None = None):
        """Run `steps(until)` to the end; callback(record) after each step. Returns the records."""
        records = []
        for record in self.steps(until):
            records.append(record)
            if callback is not None:
                callback(record)
        return records

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, directory: str | os.PathLike | None = None, keep: int = 2) -> Path:
        """Write dS (safetensors), the optimizer state, every RNG state, the arm's basis and the
        step to <directory or out_dir>/checkpoint-<step>, atomically and durably
        (`vhack.grpo.checkpoint.write_checkpoint`); older checkpoints beyond the newest `keep`
        are removed."""
        root = Path(directory) if directory is not None else self.out_dir
        if root is None:
            raise ValueError("save_checkpoint needs a directory (or the trainer's out_dir)")
        state = {
            "step": self.global_step,
            "config": self.config.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "basis": {n: v.cpu() for n, v in self.basis.items()},
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": self.rng.getstate(),
        }
        return write_checkpoint(root, self.global_step, self.adapter.state_dict(), state, keep)

    def load_checkpoint(self, path: str | os.PathLike) -> int:
        """Restore a checkpoint written by save_checkpoint (a checkpoint directory, or a run
        directory whose newest readable checkpoint is used: a truncated or corrupt one, or one
        whose dS is NaN, is skipped with a warning); returns its step. The history after that
        step in out_dir/history.jsonl is dropped, so a resumed run logs each step once."""
        path = Path(path)
        try:
            if (path / "state.pt").exists():
                delta, state = read_checkpoint(path)
            else:  # a run directory: its newest readable checkpoint (warns past broken ones)
                path, delta, state = read_latest(path)
        except CheckpointError as err:
            raise UsageError(f"{err}; start without --resume") from None
        mine, theirs = self.config.to_dict(), dict(state["config"])
        differ = [k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs.get(k)]
        if differ:
            shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine[k]!r}" for k in differ)
            raise UsageError(f"{path} was written with another configuration ({shown})")
        self.adapter.load_state_dict(delta)
        self.optimizer.load_state_dict(state["optimizer"])
        self.basis = {n: v.to(self.device) for n, v in state["basis"].items()}
        self.projector = make_projector(self.config.arm, self.adapter, self.basis)
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.rng.setstate(state["python_rng"])
        self.global_step = int(state["step"])
        if self.out_dir is not None:
            truncate_history(self.out_dir / "history.jsonl", self.global_step)
        return self.global_step
