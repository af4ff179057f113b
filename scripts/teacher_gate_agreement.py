"""How often the served-teacher gate agrees with the exact one: the teacher's entropy estimated from its top-k.

A vLLM server returns the teacher's top-k log-probabilities, not its entropy. `trl_eopd.loss.served` bounds
the entropy with the tail mass m outside the top-k (lower: H_topk - m log m; upper: H_topk - m log(m / (V - k))) and
gates on an estimate. This script samples completions from each teacher the tests use, computes the exact entropy of
every completion token locally, and reports, for each fetch count k, the share of tokens where the gate
(entropy > threshold) taken at each estimate equals the exact gate. No server is needed: the server returns these same
top-k values (checked to 1e-4 in tests/vllm_engine/test_teacher_server.py).

    python scripts/teacher_gate_agreement.py
    python scripts/teacher_gate_agreement.py --rows 128 --ks 16 20 32 64 --temperatures 1 2

Teachers: `servable` (trl_eopd.tiny.build_servable_tiny_teacher, the one the vLLM tests serve), `tiny` (the
`tiny://teacher` of the tiny-cpu recipe, untrained and nearly uniform) and `demo` (the trained teacher of `trl-eopd
demo`, sharply peaked; its vocabulary of 37 makes k >= 37 exact). Sampling at temperature 2 gives a hotter token set.
"""

from __future__ import annotations

import argparse
import platform

import torch

from trl_eopd.loss.served import estimate_teacher_entropy

ESTIMATES = ("midpoint", "lower", "upper", "top_k")


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
        completion = output[:, encoded["input_ids"].size(1):]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", nargs="+", default=["servable", "tiny", "demo"])
    parser.add_argument("--ks", nargs="+", type=int, default=[16, 20, 32, 64])
    parser.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 2.0])
    parser.add_argument("--rows", type=int, default=256, help="Prompts per teacher and temperature.")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

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
