"""How often the served-teacher gate agrees with the exact one: the teacher's entropy estimated from its top-k.

A vLLM server returns the teacher's top-k log-probabilities, not its entropy. `trl_eopd.loss.served` bounds
the entropy with the tail mass m outside the top-k (lower: H_topk - m log m; upper: H_topk - m log(m / (V - k))) and
gates on an estimate. This script samples completions from each teacher the tests use, computes the exact entropy of
every completion token locally, and reports, for each fetch count k, the share of tokens where the gate
(entropy > threshold) taken at each estimate equals the exact gate. No server is needed: the server returns these same
top-k values (checked to 1e-4 in tests/vllm_engine/test_teacher_server.py).

    python scripts/teacher_gate_agreement.py
    python scripts/teacher_gate_agreement.py --rows 128 --ks 16 20 32 64 --temperatures 1 2

With `--synthetic`, the teachers are instead synthetic distributions over a Qwen3-sized vocabulary (V = 151,936) of
several tail shapes, each swept over exact entropies in [0.3, 1.5] nats (see `SHAPES` and `synthetic_main`):

    python scripts/teacher_gate_agreement.py --synthetic
    python scripts/teacher_gate_agreement.py --synthetic --points 61 --draws 4 --shapes zipf-1.0 gauss-2.0

Teachers: `servable` (trl_eopd.tiny.build_servable_tiny_teacher, the one the vLLM tests serve), `tiny` (the
`tiny://teacher` of the tiny-cpu recipe, untrained and nearly uniform) and `demo` (the trained teacher of `trl-eopd
demo`, sharply peaked; its vocabulary of 37 makes k >= 37 exact). Sampling at temperature 2 gives a hotter token set.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from trl_eopd.loss.served import DEFAULT_ENTROPY_ESTIMATE, ENTROPY_ESTIMATES, estimate_teacher_entropy

ESTIMATES = ENTROPY_ESTIMATES


def _teachers(names):
    from trl_eopd import tiny

    for name in names:
        if name == "servable":
            tokenizer = tiny.build_tiny_tokenizer()
            prompts = [row["messages"][:1] for row in tiny.toy_arithmetic_conversations(512, seed=7)]
            yield name, tiny.build_servable_tiny_teacher(tokenizer).eval(), tokenizer, prompts
        elif name == "tiny":
            tokenizer = tiny.build_tiny_tokenizer()
            prompts = [row["messages"][:1] for row in tiny.toy_arithmetic_conversations(512, seed=7)]
            teacher = tiny.build_tiny_model(tokenizer, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                            num_key_value_heads=1, head_dim=32, seed=0)  # fmt: skip
            yield name, teacher.eval(), tokenizer, prompts
        elif name == "demo":
            from trl_eopd.demo import task
            from trl_eopd.demo.teacher import ASSETS_TEACHER, load_model

            tokenizer = task.build_tokenizer()
            prompts = [problem.messages() for problem in task.eval_problems(512)]
            yield name, load_model(ASSETS_TEACHER), tokenizer, prompts
        else:
            raise SystemExit(f"unknown teacher {name!r}; use servable, tiny or demo")


def sampled_token_log_probs(teacher, tokenizer, prompts, *, rows, max_new_tokens, temperature, seed):
    """The teacher's full log-softmax `(N, V)` (float64) at every token of completions it sampled itself."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[:rows]]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    eos = teacher.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    torch.manual_seed(seed)
    with torch.no_grad():
        output = teacher.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=True, top_k=0, top_p=1.0,
                                  temperature=temperature, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        completion = output[:, encoded["input_ids"].size(1) :]
        is_end = torch.isin(completion, torch.tensor(eos))
        # A completion's tokens run up to and including its first end token.
        keep = (torch.cumsum(is_end.int(), 1) - is_end.int()) == 0
        attention = torch.cat([encoded["attention_mask"], keep.long()], 1)
        logits = teacher(input_ids=output, attention_mask=attention).logits[:, encoded["input_ids"].size(1) - 1 : -1]
    return logits[keep].double().log_softmax(-1)


def agreement_table(log_probs, ks, threshold):
    exact = -(log_probs.exp() * log_probs).sum(-1)
    exact_gate = exact > threshold
    vocab_size = log_probs.size(-1)
    rows = []
    for k in ks:
        k_used = min(k, vocab_size)
        top = log_probs.topk(k_used, dim=-1).values
        row = {"k": k_used, "requested": k}
        for estimate in ESTIMATES:
            gate = estimate_teacher_entropy(top, vocab_size, estimate) > threshold
            row[estimate] = int((gate != exact_gate).sum())
        rows.append(row)
    return exact, rows


# ----------------------------------------------------------------------------------------------- synthetic teachers

QWEN3_VOCAB_SIZE = 151_936
SWEEP = (0.3, 1.5)
# The realistic entropy histogram: log-normal, with the median and the share above 0.8 nats that the paper reports for
# Qwen3-8B's tokens (0.07 nats, 18%). Its density at 0.8 nats is 0.12 per nat, so a gate error band of width w near
# the threshold costs about 0.12 w of the weighted agreement.
HISTOGRAM_MEDIAN, HISTOGRAM_SHARE_ABOVE = 0.07, 0.18


def _zipf(exponent, vocab_size, head_gap=None, tail_drop=4.0):
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    logits = -exponent * ranks.log()
    if head_gap is not None:  # two strong head tokens, head_gap nats apart, over a Zipf tail tail_drop nats lower
        logits[1] = logits[0] - head_gap
        logits[2:] = -exponent * torch.arange(1, vocab_size - 1, dtype=torch.float64).log() - tail_drop
    return logits


def _laplace(scale, vocab_size, generator):
    """Laplace logits: exp(logit) has a Pareto tail of index 1 / scale, so the probabilities fall like a random Zipf"""
    uniform = torch.rand(vocab_size, generator=generator, dtype=torch.float64) - 0.5
    return -scale * uniform.sign() * torch.log1p(-2 * uniform.abs())


def _steep_over_flat(head, slope, flat_share, vocab_size):
    """`head` tokens falling `slope` nats per rank, over a flat tail holding `flat_share` of the non-top mass."""
    logits = torch.empty(vocab_size, dtype=torch.float64)
    logits[:head] = -slope * torch.arange(head, dtype=torch.float64)
    head_rest = torch.logsumexp(logits[1:head], 0)
    flat = head_rest + math.log(flat_share / (1 - flat_share)) - math.log(vocab_size - head)
    logits[head:] = flat
    return logits


# name -> (base logits builder (generator, V) -> logits, head tokens whose logits the sweep raises, tuned on).
# The sweep keeps each shape's tail and raises the head's logits until the exact entropy reaches each target. Random
# shapes draw a fresh teacher for every point. Shapes marked False were held out while the "decay" estimate was
# designed: its model and its fitted ranks (K/2..K) were chosen on the four tuned shapes only.
SHAPES = {
    "zipf-1.0": (lambda g, v: _zipf(1.0, v), 1, True),
    "zipf-1.1": (lambda g, v: _zipf(1.1, v), 1, False),
    "zipf-1.2": (lambda g, v: _zipf(1.2, v), 1, False),
    "zipf-1.3": (lambda g, v: _zipf(1.3, v), 1, True),
    "zipf-1.0-two-heads": (lambda g, v: _zipf(1.0, v, head_gap=1.0), 2, False),
    "zipf-1.2-two-heads": (lambda g, v: _zipf(1.2, v, head_gap=0.5, tail_drop=1.0), 2, False),
    "gauss-2.0": (lambda g, v: torch.randn(v, generator=g, dtype=torch.float64) * 2.0, 1, True),
    "gauss-2.25": (lambda g, v: torch.randn(v, generator=g, dtype=torch.float64) * 2.25, 1, False),
    "gauss-2.5": (lambda g, v: torch.randn(v, generator=g, dtype=torch.float64) * 2.5, 1, False),
    "laplace-0.7": (lambda g, v: _laplace(0.7, v, g), 1, False),
    "steep-64-over-flat": (lambda g, v: _steep_over_flat(64, 0.15, 0.5, v), 1, True),
    "steep-128-over-flat": (lambda g, v: _steep_over_flat(128, 0.1, 0.3, v), 1, False),
    "steep-32-over-flat": (lambda g, v: _steep_over_flat(32, 0.3, 0.7, v), 1, False),
}
_RANDOM_SHAPES = ("gauss", "laplace")


def _head_raised(base, head, max_k):
    """The entropy and top-`max_k` log-probabilities of `base` with its `head` first tokens raised by `lift`."""
    base, _ = base.sort(descending=True)
    head_logits, rest = base[:head], base[head:]
    rest_log_z = torch.logsumexp(rest, 0)
    rest_mean = (rest - rest_log_z).exp().mul(rest).sum()  # sum of p * logit over the rest, normalised
    candidates = base[: max_k + head]

    def at(lift):
        lifted = head_logits + lift[:, None]
        log_z = torch.logsumexp(torch.cat([lifted, rest_log_z.expand(lift.size(0), 1)], 1), 1)
        head_p = (lifted - log_z[:, None]).exp()
        rest_p = (rest_log_z - log_z).exp()
        entropy = log_z - (head_p * lifted).sum(1) - rest_p * rest_mean
        top = torch.cat([lifted, candidates[head:].expand(lift.size(0), -1)], 1) - log_z[:, None]
        return entropy, top.sort(-1, descending=True).values[:, :max_k]

    return at


def _teachers_at(shape, targets, vocab_size, max_k, generator):
    """Exact entropies `(P,)` and top-`max_k` log-probabilities `(P, max_k)` (float64) at each target entropy."""
    build, head, _ = SHAPES[shape]
    fresh = shape.startswith(_RANDOM_SHAPES)
    entropies, tops = [], []
    shared = None if fresh else _head_raised(build(generator, vocab_size), head, max_k)
    for target in targets:
        at = _head_raised(build(generator, vocab_size), head, max_k) if fresh else shared
        low, high = torch.zeros(1, dtype=torch.float64), torch.full((1,), 80.0, dtype=torch.float64)
        if at(low)[0].item() <= target:
            raise SystemExit(f"{shape}: its tail alone has entropy {at(low)[0].item():.3f} <= target {target}")
        for _ in range(80):  # bisection on the head's lift: entropy falls as the head rises
            middle = (low + high) / 2
            above = at(middle)[0] > target
            low, high = torch.where(above, middle, low), torch.where(above, high, middle)
        entropy, top = at((low + high) / 2)
        entropies.append(entropy)
        tops.append(top)
    return torch.cat(entropies), torch.cat(tops)


def histogram_density(entropy):
    """Density (per nat) of the realistic token-entropy histogram: log-normal, see HISTOGRAM_MEDIAN."""
    normal = torch.distributions.Normal(0.0, 1.0)
    sigma = (math.log(0.8) - math.log(HISTOGRAM_MEDIAN)) / normal.icdf(torch.tensor(1 - HISTOGRAM_SHARE_ABOVE)).item()
    z = (entropy.log() - math.log(HISTOGRAM_MEDIAN)) / sigma
    return normal.log_prob(z).exp() / (entropy * sigma)


def synthetic_rows(shape, ks, estimates, *, points, draws, repeats, threshold, vocab_size, seed):
    """Per K and estimate: sweep agreement, histogram-weighted agreement, signed error at the threshold (mean, s.d. and
    worst over `draws` teachers for random shapes, whose top ranks scatter from draw to draw).

    The weighted agreement is 1 - integral over the sweep of density(H) * [estimated gate != exact gate] dH
    (midpoint rule on the sweep's cells); tokens outside the sweep count as agreeing, which `ends_agree` checks. Random
    shapes sweep `repeats` times, a fresh teacher at every point, and average.
    """
    generator = torch.Generator().manual_seed(seed)
    # Cell midpoints: no point falls exactly on the threshold, where the exact gate itself is a rounding coin flip.
    step = (SWEEP[1] - SWEEP[0]) / points
    grid = (SWEEP[0] + step * (torch.arange(points, dtype=torch.float64) + 0.5)).tolist()
    repeats = repeats if shape.startswith(_RANDOM_SHAPES) else 1
    exact, top = _teachers_at(shape, grid * repeats, vocab_size, max(ks), generator)
    at_threshold = [threshold] * (draws if shape.startswith(_RANDOM_SHAPES) else 1)
    exact_t, top_t = _teachers_at(shape, at_threshold, vocab_size, max(ks), generator)
    weights = histogram_density(exact) * step / repeats
    rows = []
    for k in ks:
        row = {"k": k}
        for estimate in estimates:
            gate = estimate_teacher_entropy(top[:, :k].float(), vocab_size, estimate) > threshold
            wrong = gate != (exact > threshold)
            error = estimate_teacher_entropy(top_t[:, :k].float(), vocab_size, estimate) - exact_t
            row[estimate] = {
                "sweep": 1 - wrong.double().mean().item(),
                "weighted": 1 - (weights * wrong).sum().item(),
                "error": error.mean().item(),
                "error_sd": error.std().item() if error.numel() > 1 else 0.0,
                "worst_error": error[error.abs().argmax()].item(),
                "ends_agree": not wrong.view(repeats, points)[:, [0, -1]].any(),
            }
        rows.append(row)
    return rows


TARGETS = {"weighted": 0.997, "sweep": 0.97, "error": 0.03}


def synthetic_main(args):
    vocab_size = args.vocab_size
    shapes = args.shapes or list(SHAPES)
    print(f"Synthetic teachers over V = {vocab_size}, exact entropy swept over {SWEEP} in {args.points} points "
          f"({args.repeats} sweeps of fresh teachers for random shapes); "
          f"top-K as float32 log-probabilities; gate at {args.threshold} nats. Per estimate: sweep agreement, "
          "agreement weighted by the realistic histogram (log-normal, median "
          f"{HISTOGRAM_MEDIAN}, {HISTOGRAM_SHARE_ABOVE:.0%} above 0.8), signed error at H = {args.threshold} (mean "
          f"over {args.draws} draws for random shapes; worst draw in brackets when it differs).")  # fmt: skip
    summary = []
    for shape in shapes:
        started = time.perf_counter()
        rows = synthetic_rows(shape, args.ks, ESTIMATES, points=args.points, draws=args.draws, repeats=args.repeats,
                              threshold=args.threshold, vocab_size=vocab_size, seed=args.seed)  # fmt: skip
        tuned = "tuned" if SHAPES[shape][2] else "held out"
        print(f"\n{shape} ({tuned}, {time.perf_counter() - started:.1f} s)")
        for row in rows:
            cells = []
            for estimate in ESTIMATES:
                r = row[estimate]
                worst = "" if abs(r["worst_error"] - r["error"]) < 5e-4 else f" [{r['worst_error']:+.3f}]"
                ends = "" if r["ends_agree"] else " (ends disagree)"
                cells.append(f"{estimate} {r['sweep']:.1%}/{r['weighted']:.2%}/{r['error']:+.3f}{worst}{ends}")
            print(f"  K={row['k']:>3}: " + " | ".join(cells))
            if row["k"] == 32:
                summary.append((shape, tuned, row[DEFAULT_ENTROPY_ESTIMATE]))
    if summary:
        print(f"\nTargets at K = 32 for the default estimate {DEFAULT_ENTROPY_ESTIMATE!r} (weighted >= "
              f"{TARGETS['weighted']:.1%}, sweep >= {TARGETS['sweep']:.0%}, |mean error at {args.threshold}| <= "
              f"{TARGETS['error']}; random shapes: then the s.d. and worst of the error over the draws):")  # fmt: skip
        for shape, tuned, r in summary:
            met = (r["weighted"] >= TARGETS["weighted"] and r["sweep"] >= TARGETS["sweep"]
                   and abs(r["error"]) <= TARGETS["error"])  # fmt: skip
            spread = f"  (s.d. {r['error_sd']:.3f}, worst {r['worst_error']:+.3f})" if r["error_sd"] else ""
            print(f"  {shape:<20} {tuned:<8} weighted {r['weighted']:.2%}  sweep {r['sweep']:.1%}  error "
                  f"{r['error']:+.3f}  {'met' if met else 'NOT MET'}{spread}")  # fmt: skip
    tokens = 8192
    top = _teachers_at("gauss-2.0", [args.threshold], vocab_size, 32, torch.Generator().manual_seed(0))[1]
    top = top.float().expand(tokens, -1).contiguous()
    started = time.perf_counter()
    estimate_teacher_entropy(top, vocab_size)
    print(f"\nCost of the default estimate: {time.perf_counter() - started:.3f} s for {tokens} tokens at K = 32 "
          f"({torch.get_num_threads()} thread).")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", action="store_true", help="Synthetic teachers over V = 151,936 instead.")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="With --synthetic: the tail shapes.")
    parser.add_argument("--points", type=int, default=120, help="With --synthetic: entropies in the sweep.")
    parser.add_argument("--draws", type=int, default=16, help="With --synthetic: random teachers at the threshold.")
    parser.add_argument("--repeats", type=int, default=4, help="With --synthetic: sweeps of each random shape.")
    parser.add_argument("--vocab-size", type=int, default=QWEN3_VOCAB_SIZE, help="With --synthetic.")
    parser.add_argument("--teachers", nargs="+", default=["servable", "tiny", "demo"])
    parser.add_argument("--ks", nargs="+", type=int, help="Fetch counts (default 16 20 32 64; 16 32 64 synthetic).")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 2.0])
    parser.add_argument("--rows", type=int, default=256, help="Prompts per teacher and temperature.")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.synthetic:
        args.ks = args.ks or [16, 32, 64]
        print(f"torch {torch.__version__}, {platform.processor() or 'cpu'}")
        return synthetic_main(args)
    args.ks = args.ks or [16, 20, 32, 64]

    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or 'cpu'}")
    print("Tokens where the estimated gate differs from the exact one (entropy > "
          f"{args.threshold} nats), per fetch count k:")  # fmt: skip
    print(f"{'teacher':<9} {'T':>4} {'tokens':>7} {'above':>6} {'k':>4} " + " ".join(f"{e:>9}" for e in ESTIMATES))
    worst = {}
    for name, teacher, tokenizer, prompts in _teachers(args.teachers):
        for temperature in args.temperatures:
            log_probs = sampled_token_log_probs(teacher, tokenizer, prompts, rows=args.rows,
                                                max_new_tokens=args.max_new_tokens, temperature=temperature,
                                                seed=args.seed)  # fmt: skip
            exact, rows = agreement_table(log_probs, args.ks, args.threshold)
            above = (exact > args.threshold).double().mean().item()
            for row in rows:
                print(f"{name:<9} {temperature:>4g} {exact.numel():>7} {above:>6.1%} {row['k']:>4} "
                      + " ".join(f"{row[e]:>9}" for e in ESTIMATES))  # fmt: skip
                for estimate in ESTIMATES:
                    key = (row["requested"], estimate)
                    misses, total = worst.get(key, (0, 0))
                    worst[key] = (misses + row[estimate], total + exact.numel())
    print("\nAll teachers and temperatures together: agreement per k and estimate")
    for k in args.ks:
        cells = []
        for estimate in ESTIMATES:
            misses, total = worst.get((k, estimate), (0, 0))
            cells.append(f"{estimate} {1 - misses / max(total, 1):.4%}")
        print(f"k={k:>3}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
