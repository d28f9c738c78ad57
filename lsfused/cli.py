"""Command line: ``lsfused demo`` (also ``python -m lsfused demo``)."""

from __future__ import annotations

import argparse
import logging
import sys


def _demo(args: argparse.Namespace) -> int:
    optimizers = tuple(o.strip().lower() for o in args.optimizers.split(",") if o.strip())
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    seeds = tuple(range(args.seed, args.seed + args.seeds))
    sweep = tuple(float(x) for x in args.sweep_lrs.split(",")) if args.sweep_lrs else None
    if args.task == "digits":
        from lsfused.apps import demo

        epochs, batch = args.epochs or 15, args.batch_size or 64
        out = args.out or "lsfused_out/demo-digits"
        _, table = demo.run_digits(
            optimizers, epochs, batch, seeds, not args.no_progress, sweep or demo.SWEEP_LRS, out=out
        )
        print(f"\ndigits (scikit-learn, 8x8 images, 10 classes), {epochs} epochs, batch {batch}, seeds {seeds}")
        print(table)
        print(f"wrote {out}/table.txt and {out}/demo.png")
    else:
        from lsfused.apps import finetune

        out = args.out or "lsfused_out/demo"
        _, table = finetune.run(
            optimizers,
            epochs=args.epochs or 5,
            seeds=seeds,
            out=out,
            data_csv=args.data,
            quick=args.quick,
            n_train=args.n_train,
            n_test=args.n_test,
            batch_size=args.batch_size or 32,
            max_length=args.max_length,
            progress=not args.no_progress,
            sweep_lrs=sweep or finetune.SWEEP_LRS,
            resume=args.resume,
        )
        print()
        print(table)
        print(f"wrote {out}/table.txt and {out}/demo.png")
    if args.seeds < 3:
        cost = "under a minute" if args.task == "digits" else "about 25 minutes on 2 CPU cores; make demo runs it"
        print(
            f"{args.seeds} seed{'s' if args.seeds > 1 else ''}: differences between optimizers may be within what "
            f"another seed moves; the full comparison ({cost}) is "
            f"`lsfused demo{' --task digits' if args.task == 'digits' else ''} --seeds 3`"
        )
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lsfused import diagnostics
    from lsfused.apps import diagnose

    out = Path(args.out)
    if args.from_file:
        rows = diagnostics.Recorder.load(args.from_file)
        title = f"recorded: {args.from_file}"
    else:
        rows = diagnose.run(
            optimizer=args.optimizer,
            armijo=args.armijo,
            epochs=args.epochs,
            model=args.model,
            script=args.script,
            seed=args.seed,
            record_path=out / "diagnostics.jsonl",
            backtracking=args.backtracking,
            skip_trials={"off": False, "on": True, "measure": "measure"}[args.skip_trials],
        ).rows
        title = f"{args.optimizer}, armijo={args.armijo}, backtracking={args.backtracking}, {args.epochs} epochs"
        if args.skip_trials != "off":
            title += f", skip_trials={args.skip_trials}"
    print(diagnostics.report(rows, out, title))
    print(f"wrote {out / 'diagnostics.png'} and {out / 'summary.txt'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lsfused.apps import bench

    if args.memory:
        return _bench_memory(args)
    csv_path = Path(args.csv or "benchmarks/results/results.csv")
    if not args.plot_only:
        progress = logging.StreamHandler(sys.stderr)
        progress.setFormatter(logging.Formatter("  %(message)s"))
        bench.log.addHandler(progress)
        bench.log.setLevel(logging.INFO)
        rows = bench.run(quick=args.quick, csv_path=csv_path, device=args.device)
        print(f"machine: {bench.machine()}")
        print(bench.format_rows(rows))
        print(f"appended {len(rows)} rows to {csv_path}")
    if args.plot or args.plot_only:
        for path in bench.plot(csv_path, Path(args.plot_dir)):
            print(f"wrote {path}")
    return 0


def _bench_memory(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lsfused.apps import bench, memory

    numel = 2**20 if args.quick else 32 * 2**20
    rows = []
    for dtype in ("float32", "bfloat16"):
        rows += memory.run(numel=numel, dtype=dtype, repeats=args.repeats)
    print(f"machine: {bench.machine()}; {numel} parameters in 8 tensors, 3 steps, each optimizer in its own process")
    print(memory.format_rows(rows))
    path = memory.append_csv(rows, Path(args.csv or "benchmarks/results/memory.csv"), bench.machine())
    print(f"appended {len(rows)} rows to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from lsfused.apps import registry

    parser = argparse.ArgumentParser(prog="lsfused", description="Fused stochastic line-search optimizers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train a network with Adam and the line-search optimizers, side by side")
    p.add_argument("--task", choices=["text", "digits"], default="text", help="text: MiniLM fine-tuning (default)")
    p.add_argument(
        "--optimizers",
        default="adam,adam-tuned,adamsls,plasls,salsa",
        help=f"comma-separated, from: {', '.join(registry.names())} (adam-tuned: the best lr of a sweep)",
    )
    p.add_argument("--epochs", type=int, help="default 5 (text) or 15 (digits)")
    p.add_argument("--batch-size", type=int, help="default 32 (text) or 64 (digits)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (mean and spread over them); default 1")
    p.add_argument(
        "--sweep-lrs", help="adam-tuned: comma-separated lrs (text: 3e-5,1e-4,3e-4; digits: 3e-4,1e-3,3e-3,1e-2)"
    )
    p.add_argument("--quick", action="store_true", help="text: 160 examples, 2 epochs, short sequences (~3 min)")
    p.add_argument("--data", help="text: your own CSV with text,label columns")
    p.add_argument("--n-train", type=int, default=500, help="text: training examples (WordNet)")
    p.add_argument("--n-test", type=int, default=400, help="text: test examples (WordNet)")
    p.add_argument("--max-length", type=int, default=48, help="text: tokens per example")
    p.add_argument("--out", help="where table.txt and demo.png go (lsfused_out/demo, digits: lsfused_out/demo-digits)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true", help="text: keep the runs already in OUT/runs.jsonl")
    p.set_defaults(func=_demo)
    d = sub.add_parser("diagnose", help="record every line-search decision of a short training and report precision")
    d.add_argument("--optimizer", default="plasls", help="plasls (one component per tensor), adamsls, sgdsls, salsa")
    d.add_argument("--armijo", choices=["noise_aware", "classic"], default="noise_aware")
    d.add_argument("--backtracking", choices=["geometric", "interpolate"], default="geometric")
    d.add_argument(
        "--skip-trials", choices=["off", "on", "measure"], default="off", help="skip_trials (measure: evaluate skipped)"
    )
    d.add_argument("--epochs", type=int, default=5)
    d.add_argument("--model", choices=["mlp", "linear"], default="mlp", help="the digits model (default data)")
    d.add_argument("--script", help="a Python file defining setup() -> (model, batches, loss_fn)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="lsfused_out/diagnose", help="directory for the report")
    d.add_argument("--from", dest="from_file", help="redraw the report from a recorded diagnostics.jsonl")
    d.set_defaults(func=_diagnose)
    b = sub.add_parser("bench", help="time the fused ops and optimizer steps against baselines, in one run")
    b.add_argument("--quick", action="store_true", help="small sizes only (under 2 minutes on 2 cores)")
    b.add_argument(
        "--csv", help="CSV the rows are appended to (benchmarks/results/results.csv; --memory: .../memory.csv)"
    )
    b.add_argument("--memory", action="store_true", help="optimizer memory (bytes/param), each in its own process")
    b.add_argument("--repeats", type=int, default=3, help="--memory: runs of each optimizer (default 3)")
    b.add_argument("--plot", action="store_true", help="also draw the figures from the CSV")
    b.add_argument("--plot-only", action="store_true", help="only draw the figures from the CSV")
    b.add_argument("--plot-dir", default="benchmarks/results", help="where the figures go")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        parser.exit(2, f"lsfused: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
