"""The paper's Figure 1 setting: one categorical student trained on-policy against a fixed teacher distribution.

The student is a single logits vector over `--vocab` tokens. At every step it samples `--samples` tokens from itself,
and those samples are the positions of a `(1, S, V)` batch given to `trl_eopd.eopd_loss`, with the same student and
teacher logits at every position and the samples as labels. Two teachers are used: a low-entropy one (a single
dominant mode) and a high-entropy multi-modal one. Each is distilled twice from the same initial student and the same
random stream: with plain reverse KL (OPD, `entropy_threshold=inf`) and with EOPD (threshold 0.8 nats).

The base term defaults to the `"sampled"` estimator, the paper's OPD: a policy gradient on the student's own samples
whose noise is what makes reverse KL keep flipping the student's top tokens. `--estimator analytic` uses the exact
reverse KL instead (then only the mode-seeking dynamics remain, not the sampling noise). Since the teacher's entropy is
the same at every position, the gate is all-or-nothing here: on the low-entropy teacher (below 0.8 nats) EOPD *is*
OPD, and the two runs coincide exactly, which the output shows.

Outputs, in `--output-dir` (default `./toy-experiment`): `toy_experiment.png` (top-1 and top-10 change rate between
steps, student entropy, mass on each teacher mode) and `toy_experiment.json` (every curve and the final numbers).

    python scripts/toy_experiment.py --steps 400 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

METHODS = {"reverse_kl": float("inf"), "eopd": 0.8}
DEFAULT_OUTPUT_DIR = "toy-experiment"


def make_teachers(vocab: int, seed: int) -> dict[str, dict]:
    """Teacher logits with the ids of their modes: one dominant mode, and four modes sharing 90% of the mass."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    modes = torch.randperm(vocab, generator=generator)[:4].tolist()

    def logits_for(mode_mass: list[float]) -> torch.Tensor:
        rest = (1.0 - sum(mode_mass)) / (vocab - len(mode_mass))
        probs = torch.full((vocab,), rest)
        probs[modes[: len(mode_mass)]] = torch.tensor(mode_mass)
        return probs.log()

    return {
        "low_entropy": {"logits": logits_for([0.92]), "modes": modes[:1]},
        "high_entropy": {"logits": logits_for([0.3, 0.25, 0.2, 0.15]), "modes": modes},
    }


def entropy(logits: torch.Tensor) -> float:
    log_probs = logits.log_softmax(-1)
    return float(-(log_probs.exp() * log_probs).sum())


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum())


def train(
    teacher: dict,
    init_logits: torch.Tensor,
    *,
    entropy_threshold: float,
    steps: int,
    samples: int,
    learning_rate: float,
    estimator: str,
    seed: int,
) -> dict:
    """Distil one student vector on-policy and record its trajectory."""
    from trl_eopd import eopd_loss

    generator = torch.Generator().manual_seed(seed)
    student = torch.nn.Parameter(init_logits.clone())
    optimizer = torch.optim.Adam([student], lr=learning_rate)
    teacher_logits = teacher["logits"]
    vocab = teacher_logits.numel()
    previous_top10 = set(student.detach().topk(10).indices.tolist())
    previous_top1 = int(student.detach().argmax())
    history = {"top1_change": [], "top10_change": [], "entropy": [entropy(student.detach())], "mode_mass": []}
    history["mode_mass"].append(student.detach().softmax(-1)[teacher["modes"]].tolist())
    for _ in range(steps):
        with torch.no_grad():
            tokens = torch.multinomial(student.softmax(-1), samples, replacement=True, generator=generator)
        loss = eopd_loss(
            student.view(1, 1, vocab).expand(1, samples, vocab),
            teacher_logits.view(1, 1, vocab).expand(1, samples, vocab),
            tokens.view(1, samples),
            entropy_threshold=entropy_threshold,
            reverse_kl_estimator=estimator,
            # The paper's Figure 1 compares against the whole teacher distribution: its mode coverage is the point.
            forward_kl_top_k=None,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        current = student.detach()
        top1, top10 = int(current.argmax()), set(current.topk(10).indices.tolist())
        history["top1_change"].append(float(top1 != previous_top1))
        history["top10_change"].append(1.0 - len(top10 & previous_top10) / 10.0)
        history["entropy"].append(entropy(current))
        history["mode_mass"].append(current.softmax(-1)[teacher["modes"]].tolist())
        previous_top1, previous_top10 = top1, top10
    final = student.detach()
    half = steps // 2
    history["final"] = {
        "entropy": entropy(final),
        "teacher_entropy": entropy(teacher_logits),
        "mode_mass": history["mode_mass"][-1],
        "total_mode_mass": sum(history["mode_mass"][-1]),
        "modes_covered": sum(mass > 0.05 for mass in history["mode_mass"][-1]),
        "top1_change_rate_second_half": sum(history["top1_change"][half:]) / max(steps - half, 1),
        "top10_change_rate_second_half": sum(history["top10_change"][half:]) / max(steps - half, 1),
        "reverse_kl": kl(final, teacher_logits),
        "forward_kl": kl(teacher_logits, final),
    }
    return history


def run(
    *,
    steps: int = 400,
    seed: int = 0,
    vocab: int = 100,
    samples: int = 16,
    learning_rate: float = 0.05,
    estimator: str = "sampled",
    init_scale: float = 2.0,
) -> dict:
    """Both teachers, both methods, one seed. The two methods share the initial student and the sampling seed."""
    # Vectors of 100 logits: a second thread only adds synchronisation, which is ruinous on a busy machine.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(steps, seed, vocab, samples, learning_rate, estimator, init_scale)
    finally:
        torch.set_num_threads(previous_threads)


def _run(steps, seed, vocab, samples, learning_rate, estimator, init_scale) -> dict:
    teachers = make_teachers(vocab, seed)
    init_logits = init_scale * torch.randn(vocab, generator=torch.Generator().manual_seed(seed))
    results = {
        "config": {
            "steps": steps,
            "seed": seed,
            "vocab": vocab,
            "samples": samples,
            "learning_rate": learning_rate,
            "estimator": estimator,
            "init_scale": init_scale,
            "thresholds": {k: str(v) for k, v in METHODS.items()},
        },
        "teachers": {
            name: {
                "modes": t["modes"],
                "entropy": entropy(t["logits"]),
                "mode_mass": t["logits"].softmax(-1)[t["modes"]].tolist(),
            }
            for name, t in teachers.items()
        },
        "runs": {},
    }
    for teacher_name, teacher in teachers.items():
        for method, threshold in METHODS.items():
            results["runs"][f"{teacher_name}/{method}"] = train(
                teacher,
                init_logits,
                entropy_threshold=threshold,
                steps=steps,
                samples=samples,
                learning_rate=learning_rate,
                estimator=estimator,
                seed=seed,
            )
    return results


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


MODE_COLORS = ["tab:green", "tab:orange", "tab:purple", "tab:brown"]
METHOD_COLORS = {"reverse_kl": "tab:red", "eopd": "tab:blue"}
METHOD_LABELS = {"reverse_kl": "reverse KL (OPD)", "eopd": "EOPD"}


def plot(results: dict, path: Path) -> None:
    """One row per teacher: how often the student's top tokens change, its entropy, and, one panel per method, the
    probability it puts on each of the teacher's modes (one colour per mode, the teacher's own mass dotted), so that a
    mode the student dropped shows as a line falling to 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = results["config"]
    steps = config["steps"]
    window = max(steps // 20, 1)
    teachers = list(results["teachers"])
    fig, axes = plt.subplots(len(teachers), 5, figsize=(22, 4.6 * len(teachers)), squeeze=False)
    for row, teacher_name in enumerate(teachers):
        teacher = results["teachers"][teacher_name]
        gated = teacher["entropy"] > METHODS["eopd"]
        for method in METHODS:
            run = results["runs"][f"{teacher_name}/{method}"]
            style = {"color": METHOD_COLORS[method], "label": METHOD_LABELS[method], "alpha": 0.85}
            if method == "eopd" and not gated:
                # Identical to reverse KL here (the gate never opens): dashed, so that both stay visible.
                style.update(linestyle="--", label="EOPD (= reverse KL: gate closed)")
            axes[row, 0].plot(_moving_average(run["top1_change"], window), **style)
            axes[row, 1].plot(_moving_average(run["top10_change"], window), **style)
            axes[row, 2].plot(run["entropy"], **style)
            ax = axes[row, 3 if method == "reverse_kl" else 4]
            for i, mass in enumerate(zip(*run["mode_mass"])):
                color = MODE_COLORS[i % len(MODE_COLORS)]
                ax.plot(mass, color=color, label=f"mode {i}")
                if "mode_mass" in teacher:
                    ax.axhline(teacher["mode_mass"][i], color=color, linestyle=":", linewidth=1.2)
            ax.set_ylim(0, 1)
            ax.set_title(f"{METHOD_LABELS[method]}: mass on each teacher mode", fontsize=10)
            ax.set_ylabel("student probability of the mode")
            ax.legend(fontsize=8, loc="upper right", title="dotted: teacher", title_fontsize=8, ncol=2)
        axes[row, 2].axhline(teacher["entropy"], color="gray", linestyle=":", label="teacher")
        axes[row, 0].set_title(f"top-1 token changed (moving average of {window} steps)", fontsize=10)
        axes[row, 1].set_title(f"top-10 set changed (moving average of {window} steps)", fontsize=10)
        axes[row, 2].set_title("student entropy", fontsize=10)
        axes[row, 0].set_ylabel(
            f"{teacher_name.replace('_', '-')} teacher, H = {teacher['entropy']:.2f} nats\n\nshare of steps",
            fontsize=10,
        )
        axes[row, 1].set_ylabel("share of the top 10 replaced per step")
        axes[row, 2].set_ylabel("entropy (nats)")
        for col in range(3):
            axes[row, col].legend(fontsize=8, loc="best")
        for ax in axes[row]:
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
    fig.suptitle(
        f"Toy experiment (the paper's Figure 1 setting): one categorical student over {config['vocab']} tokens "
        f"trained on its own samples ({config['estimator']} reverse-KL estimator, seed {config['seed']}) against a fixed "
        f"teacher\nTop row: low-entropy teacher, EOPD's gate stays closed. Bottom row: high-entropy teacher with four "
        f"modes, where reverse KL can drop a mode and EOPD keeps all four.",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(results: dict) -> str:
    lines = [
        f"{'teacher':<13} {'method':<11} {'H student':>9} {'H teacher':>9} {'top1 chg':>8} {'top10 chg':>9} "
        f"{'KL(q||p)':>8} {'KL(p||q)':>8} {'modes>5%':>8}  mass on modes"
    ]
    for key, run in results["runs"].items():
        teacher_name, method = key.split("/")
        final = run["final"]
        lines.append(
            f"{teacher_name:<13} {method:<11} {final['entropy']:9.3f} {final['teacher_entropy']:9.3f} "
            f"{final['top1_change_rate_second_half']:8.3f} {final['top10_change_rate_second_half']:9.3f} "
            f"{final['reverse_kl']:8.3f} {final['forward_kl']:8.3f} "
            f"{final['modes_covered']:>4}/{len(final['mode_mass']):<3}  "
            + " ".join(f"{m:.3f}" for m in final["mode_mass"])
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        help="Where to write the PNG and the JSON (default: %(default)s, ignored by git).",
    )
    parser.add_argument("--steps", type=int, default=400, help="On-policy updates per run.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initial student, the modes and the samples.")
    parser.add_argument("--vocab", type=int, default=100, help="Size of the categorical distribution.")
    parser.add_argument("--samples", type=int, default=16, help="Student samples (loss positions) per step.")
    parser.add_argument("--learning-rate", type=float, default=0.05, help="Adam learning rate on the logits.")
    parser.add_argument(
        "--estimator",
        choices=["sampled", "analytic"],
        default="sampled",
        help="Base reverse-KL term: the paper's sampled policy gradient, or the exact divergence.",
    )
    args = parser.parse_args(argv)

    results = run(
        steps=args.steps,
        seed=args.seed,
        vocab=args.vocab,
        samples=args.samples,
        learning_rate=args.learning_rate,
        estimator=args.estimator,
    )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "toy_experiment.json").write_text(json.dumps(results, indent=1))
    plot(results, output_dir / "toy_experiment.png")
    print(
        f"Toy experiment: {args.steps} steps, seed {args.seed}, estimator {args.estimator!r}, "
        f"change rates averaged over the second half"
    )
    print(format_table(results))
    print(f"Wrote {output_dir / 'toy_experiment.png'} and {output_dir / 'toy_experiment.json'}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
