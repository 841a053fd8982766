"""`vhack example`: the whole pipeline on the embedded tiny model, in seconds."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

from vhack.cli import _common as common
from vhack.cli._options import NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, add_options
from vhack.errors import UsageError
from vhack.extract_config import EXTRACT_TOP_K

HELP = "end-to-end example on the embedded tiny model (wrap, extract, project, train)"


@dataclass
class ExampleOptions:
    seed: int = field(default=0, metadata={"help": "seed of the tiny model"})
    pairs: str = field(
        default="toy", metadata={"help": "shipped pair set", "choices": ("toy", "coding")}
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "axes extracted per module (default: as many as the training pairs allow, "
            f"at most {EXTRACT_TOP_K})"
        },
    )
    k: int = field(default=5, metadata={"help": "axes per module projected"})
    n_heldout: int = field(default=2, metadata={"help": "held-out pairs"})
    steps: int = field(default=8, metadata={"help": "optimizer steps per run"})
    lr: float = field(default=0.05, metadata={"help": "AdamW learning rate"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(
        p,
        ExampleOptions,
        types={
            "seed": NONNEGATIVE_INT,
            "top_k": POSITIVE_INT,
            "k": POSITIVE_INT,
            "n_heldout": POSITIVE_INT,
            "steps": POSITIVE_INT,
            "lr": POSITIVE_FLOAT,
        },
    )
    add_options(p, common.ModelOptions, ("threads",))


def run(args: argparse.Namespace) -> int:
    """Wrap the tiny model, extract a hack basis from the shipped toy pairs (one backward per
    batch), then fine-tune toward the training pairs' hack completions from the same start three
    times: measuring only, projecting each gradient, and projecting each update. Prints the
    hack-ward fraction of what each step projected (cin) and how far each run moved the model
    toward the hacks, on the pairs the basis came from and on the held-out pairs."""
    import torch

    import vhack
    from vhack.lm import completion_losses

    pairs = common.read_pairs(args.pairs)
    common.check_pairs(pairs, 1, 0.0, args.n_heldout)
    train, held = pairs[: len(pairs) - args.n_heldout], pairs[len(pairs) - args.n_heldout :]
    top_k = common.choose_top_k(args.top_k, len(train))
    if args.k > top_k:
        raise UsageError(f"--k {args.k}: only {top_k} axes per module are extracted (--top-k)")

    common.apply_threads(args)  # the tiny model: 1 thread unless --threads or OMP_NUM_THREADS
    t0 = time.perf_counter()
    model, tok = vhack.models.load("tiny", seed=args.seed)
    adapter = vhack.wrap(model, use_cache=False, progress=False)
    print(f"wrapped {len(adapter)} Linear modules: {adapter.delta.numel()} trainable dS scalars")
    basis = vhack.extract(
        adapter, tok, pairs, top_k=top_k, n_heldout=args.n_heldout, progress=False
    )
    print(
        f"hack basis from {len(train)} {args.pairs!r} pairs: {len(basis.names)} modules, "
        f"{args.k} of up to {top_k} axes per module used; {len(held)} pairs held out"
    )

    def hack_margin(subset) -> float:
        """Mean NLL(clean) - NLL(hack) over pairs: it grows as the model moves toward hacks."""
        items = [(p.prompt, p.hack) for p in subset] + [(p.prompt, p.clean) for p in subset]
        with torch.no_grad():
            nll = completion_losses(model, tok, items)
        return (nll[len(subset) :] - nll[: len(subset)]).mean().item()

    start = (hack_margin(train), hack_margin(held))
    hack_items = [(p.prompt, p.hack) for p in train]
    arms = (
        ("measure only", "measure", "grad"),
        ("grad projected", "hackward", "grad"),
        ("update projected", "hackward", "update"),
    )
    moved = {}
    for arm, mode, where in arms:
        with torch.no_grad():
            adapter.delta.zero_()
        opt = torch.optim.AdamW([adapter.delta], lr=args.lr, weight_decay=0.0)
        proj = vhack.Projector(adapter, basis, mode=mode, where=where, k=args.k).attach(opt)
        print(f"\n{arm}: {args.steps} AdamW steps on the training pairs' hack completions")
        print(f"{'step':>4s} {'loss':>8s} {'cin':>7s} {'|before|':>10s} {'|after|':>10s}")
        for step in range(args.steps):
            opt.zero_grad()
            loss = completion_losses(model, tok, hack_items).mean()
            loss.backward()
            opt.step()  # the projector runs around the update (before it in grad mode)
            st = proj.last_stats
            # the hack-ward cin in every arm (a measure-mode ProjStats reports |V g| / |g|)
            hackward = vhack.ProjStats(st.names, st.raw, st.projected, one_sided=True)
            norms = st.as_dict()
            print(
                f"{step:4d} {loss.item():8.4f} {hackward.cin_mean:7.4f} "
                f"{norms['norm_before']:10.3e} {norms['norm_after']:10.3e}"
            )
        proj.detach()
        moved[arm] = (hack_margin(train) - start[0], hack_margin(held) - start[1])

    print(
        "\nhow far each run moved the model toward the hacks: change of NLL(clean) - NLL(hack)"
        f"\n{'run':18s} {'basis pairs':>12s} {'held out':>10s}"
    )
    for arm, (on_train, on_held) in moved.items():
        print(f"{arm:18s} {on_train:+12.4f} {on_held:+10.4f}")
    print(
        f"(cin: mean over modules of |relu(V g)| / |g| of what each step projected: the gradient, "
        f"or in update mode the update; {time.perf_counter() - t0:.1f} s)"
    )
    return 0
