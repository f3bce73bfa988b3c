"""Result verification: how far honest servers' outputs differ (the tolerance's margin and false-positive
rate), and what checking costs a decode.

    python benchmarks/verification.py tolerance --model tiny --dtypes float32 bfloat16 --generations 30
    python benchmarks/verification.py cost --model mid --fractions 0 0.05 1.0 --plot verification.png

Both run a swarm with two holders of every span (--servers spans, each served twice), so every hop has a
witness. ``tolerance``: for each dtype, with server batching on and off, --generations greedy generations
from --clients concurrent threads (so servers batch their sessions) with ``verify_fraction`` 1.0 and 0.2 (below 1 a
witness catches up several positions at once, a prefill against the hop's decode steps); one
JSON line per case with the checks made, the worst relative error any check saw, its 99.9th percentile,
the tolerance, and how many checks disputed (false positives: every server is honest). ``cost``: one
client, decode tokens/s at each ``verify_fraction``, and the ratio to ``verify_fraction=0`` measured in
the same run.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

import harness

from shardnet import ShardedModel
from shardnet.client.verification import tolerance
from shardnet.launch import LocalSwarm, even_spans
from shardnet.models import load_config

logger = logging.getLogger("benchmarks.verification")
GREEDY = dict(do_sample=False, eos_token_id=None)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["tolerance", "cost"])
    harness.add_common_args(parser)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="tolerance: dtypes")
    parser.add_argument("--servers", type=int, default=2, help="spans; each is served twice")
    parser.add_argument("--generations", type=int, default=30, help="tolerance: generations per case")
    parser.add_argument("--clients", type=int, default=3, help="tolerance: concurrent client threads")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.05, 1.0], help="cost")
    parser.add_argument(
        "--check-fractions",
        type=float,
        nargs="+",
        default=[1.0, 0.2],
        help="tolerance: verify_fraction of each case (below 1 a witness catches up several positions in "
        "one prefill-like step, against the hop's decode steps)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="cost: generations per fraction")
    return parser.parse_args()


def start_swarm(args: argparse.Namespace, model_path, dtype: str, batching: bool, name: str) -> LocalSwarm:
    spans = even_spans(harness.num_blocks(model_path), args.servers)
    swarm = LocalSwarm(
        model_path,
        [span for span in spans for _ in range(2)],
        dtype=dtype,
        log_dir=harness.swarm_log_dir(args.log_dir, name),
        torch_threads=args.server_threads,
        extra_args=[] if batching else ["--no-batching"],
    )
    swarm.start(timeout_s=600)
    return swarm


def tolerance_case(args: argparse.Namespace, model_path, dtype: str, batching: bool, fraction: float) -> dict:
    vocab = load_config(model_path).vocab_size
    swarm = start_swarm(args, model_path, dtype, batching, f"verification-{dtype}-{batching}")
    try:
        with ShardedModel.from_pretrained(
            model_path, swarm.initial_peers, dtype=harness.torch_dtype(dtype), verify_fraction=fraction
        ) as model:
            counts_before = model.health.counts()
            errors_before = len(model.health.check_errors())
            seeds = iter(range(args.generations))
            lock = threading.Lock()

            def client() -> None:
                while True:
                    with lock:
                        seed = next(seeds, None)
                    if seed is None:
                        return
                    ids = harness.random_prompt(vocab, 1, args.prompt_tokens, seed=seed)
                    model.generate(ids, max_new_tokens=args.new_tokens, **GREEDY)

            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            counts = model.health.counts()
            errors = model.health.check_errors()[errors_before:]
            suspected = sorted(model.suspected_servers)
    finally:
        swarm.stop()
    delta = {key: counts.get(key, 0) - counts_before.get(key, 0) for key in ("checks", "disputes")}
    return harness.record(
        "verification.tolerance",
        model=args.model,
        dtype=dtype,
        batching=batching,
        verify_fraction=fraction,
        generations=args.generations,
        clients=args.clients,
        new_tokens=args.new_tokens,
        checks=delta["checks"],
        disputes=delta["disputes"],
        false_positive_rate=delta["disputes"] / max(delta["checks"], 1),
        suspected=len(suspected),
        worst_error=max(errors, default=0.0),
        p999_error=harness.percentile(errors, 99.9) if errors else 0.0,
        tolerance=tolerance(harness.torch_dtype(dtype)),
        margin=tolerance(harness.torch_dtype(dtype)) / max(max(errors, default=0.0), 1e-30),
        errors=errors,
    )


def cost(args: argparse.Namespace, model_path) -> list[dict]:
    vocab = load_config(model_path).vocab_size
    swarm = start_swarm(args, model_path, args.dtype, True, "verification-cost")
    lines, speeds = [], {}
    try:
        for fraction in args.fractions:
            with ShardedModel.from_pretrained(
                model_path,
                swarm.initial_peers,
                dtype=harness.torch_dtype(args.dtype),
                verify_fraction=fraction,
            ) as model:
                model.generate(harness.random_prompt(vocab, 1, 8, seed=99), max_new_tokens=4, **GREEDY)
                rates = []
                for repeat in range(args.repeats):
                    ids = harness.random_prompt(vocab, 1, args.prompt_tokens, seed=repeat)
                    clock = harness.TokenClock()
                    began = time.perf_counter()
                    model.generate(ids, max_new_tokens=args.new_tokens, streamer=clock, **GREEDY)
                    summary = clock.summary()
                    rates.append(1.0 / summary["decode_step_s"])
                    logger.info("fraction %g: %.2fs", fraction, time.perf_counter() - began)
            speeds[fraction] = harness.median(rates)
    finally:
        swarm.stop()
    base = speeds.get(0.0)
    for fraction, speed in speeds.items():
        lines.append(
            harness.record(
                "verification.cost",
                model=args.model,
                dtype=args.dtype,
                servers=2 * args.servers,
                verify_fraction=fraction,
                decode_tokens_per_s=round(speed, 2),
                speed_vs_unverified=round(speed / base, 3) if base else None,
                new_tokens=args.new_tokens,
                repeats=args.repeats,
                server_torch_threads=harness.threads_label(args.server_threads),
            )
        )
    return lines


def plot(cases: list[dict], path) -> None:
    fig, axes = harness.new_figure(len(cases), width_in=4.0)
    for axis, case in zip(axes, cases, strict=True):
        errors = [max(error, 1e-12) for error in case["errors"]]
        axis.hist(errors, bins=[10 ** (k / 4) for k in range(-48, 1)], color="tab:blue")
        axis.axvline(case["tolerance"], color="tab:red", label="tolerance")
        axis.set_xscale("log")
        batching = "on" if case["batching"] else "off"
        axis.set_title(f"{case['dtype']}, batching {batching}, F={case['verify_fraction']:g}", fontsize=9)
        axis.set_xlabel("worst relative error of a check")
        axis.legend()
    harness.save_figure(fig, path, "honest servers against their witnesses")


def main() -> None:
    args = parse_args()
    harness.setup(args)
    model_path = harness.resolve_model(args.model)
    with harness.time_limit(args.time_limit_s):
        if args.what == "cost":
            for line in cost(args, model_path):
                harness.emit(line)
            return
        cases = []
        for dtype in args.dtypes:
            for batching in (True, False):
                for fraction in args.check_fractions:
                    case = tolerance_case(args, model_path, dtype, batching, fraction)
                    harness.emit({key: value for key, value in case.items() if key != "errors"})
                    cases.append(case)
    if args.plot:
        plot(cases, args.plot)


if __name__ == "__main__":
    main()
