"""A trial's phases at scale (default), or packing and loading alone (``--packing``).

Default: the ladder of `bench._scale_phases` (an MLP, a ResNet-like CNN and a BERT-like
encoder at about 0.1 M, 1 M, 10 M and 30 M parameters; 110 M with ``--big``), each phase of a
trial as a multiple of one training step of the same model (wall and CPU time) and its peak RSS
over the model's bytes, as a markdown table:

    python bench/scale.py --kinds mlp cnn bert --rungs 0.1M 1M 10M 30M --json phases.json
    python bench/scale.py --big --rungs 110M --kinds bert     # the 110 M rung, once

``--packing``: the `.sqz` writer and reader against a `safetensors` file. For an MLP of about
1 M and 10 M parameters and a BERT-like encoder of about 28 M (``--large``: also BERT-base,
110 M), each fp32, pruned (50% unstructured, global) and 4-bit quantized
(``quant`` with ``bits=4``), random init (seed 0), one child process per case measures:

- ``pack_s``: `compressors.save_packed`; ``estimate_s``: `compressors.packing.packed_size`
  (the early-stop size estimate, which writes no file);
- ``reload_s``: `compressors.load_packed` into a freshly built model (built before timing);
- the same fp32 model saved with `safetensors.torch.save_file` and loaded with ``load_file``
  plus ``load_state_dict`` (``st_save_s``, ``st_load_s``), and the ratios ``pack_x`` /
  ``reload_x`` to them (the goal: pack at most 5x, reload at most 3x); with ``--repeats N``,
  both saves and both loads are timed N times, taking turns, and the fastest of each kept (on
  a shared, loaded machine a single timing of a few milliseconds is mostly the others' noise;
  the safetensors file of 40 MB was written in 0.03 s and 0.20 s by two runs); also in
  CPU-seconds of the process (``st_save_cpu_s``, ``pack_cpu_s``, ``pack_cpu_x``,
  ``st_load_cpu_s``, ``reload_cpu_s``, ``reload_cpu_x``: the ratios that wait least on the
  other load, though a pack's or reload's threads count each); the table's ``x`` columns are
  wall-time ratios, ``cpu x`` CPU-time ratios, and ``threads`` squeeze's pool / torch's
  intra-op threads / safetensors' (one: it saves and loads in the calling thread) of the
  machine's CPUs; both files are read once before any load is timed (both in the page cache);
- ``pack_mem`` / ``reload_mem``: the peak resident memory during the call over the resident
  memory before it (sampled every 2 ms from ``/proc/self/statm`` after ``malloc_trim``), divided
  by the fp32 model's bytes (the goal: at most 2);
- ``bytes``, the file's size, and ``estimate_bytes``; with ``--before old.json`` (a ``--json``
  written by another version of squeeze, e.g. before a change) the ratio ``new/old`` per case.

The reloaded model's outputs are checked to equal the packed model's (``exact``).

    python bench/scale.py --packing                # about 2 minutes on a quiet 2-core machine
    python bench/scale.py --packing --large --json new.json --before old.json
    python bench/scale.py --packing --cases mlp-10m --repeats 7   # ratios on a loaded machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {"mlp-1m": False, "mlp-10m": False, "bert-28m": False, "bert-110m": True}
VARIANTS = ("fp32", "pruned", "4bit")


def _build(case: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if case.startswith("mlp"):
        widths = [784, 1024, 256, 10] if case == "mlp-1m" else [1024, 2048, 2048, 2048, 10]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers[:-1]), torch.randn(4, widths[0])
    from transformers import BertConfig, BertModel

    if case == "bert-28m":
        config = BertConfig(
            hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048
        )
    else:
        config = BertConfig()  # BERT-base
    model = BertModel(config, add_pooling_layer=False).eval()
    return model, torch.randint(0, config.vocab_size, (2, 16))


def _outputs(model, x):
    out = model(x)
    return out if not hasattr(out, "last_hidden_state") else out.last_hidden_state


def _compress(model, variant: str):
    from compressors import CompressionContext, get_compressor

    if variant == "pruned":
        return get_compressor("prune")(amount=0.5).compress(model, CompressionContext())
    if variant == "4bit":
        return get_compressor("quant")(bits=4).compress(model, CompressionContext())
    return model


def _fastest(loads: dict, case: str, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """``(wall, cpu)``: seconds and CPU-seconds (this process's, all its threads) of the fastest
    of ``repeats`` calls of each of ``loads`` (``{name: load}``), on a freshly built model each
    (built before timing), the loads taking turns: on a loaded machine, the least disturbed call
    of each, and both seeing the same spells of load."""
    wall, cpu = dict.fromkeys(loads, float("inf")), dict.fromkeys(loads, float("inf"))
    for _ in range(repeats):
        for name, load in loads.items():
            fresh, _ = _build(case)
            t0, c0 = time.perf_counter(), time.process_time()
            load(fresh)
            wall[name] = min(wall[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    return wall, cpu


def _child(case: str, variant: str, repeats: int = 1) -> dict:
    import torch
    from _scale_phases import PeakRss
    from safetensors.torch import load_file, save_file

    from compressors import load_packed, packing, save_packed
    from compressors.packing import packed_size

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model, x = _build(case)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() for p in model.parameters())
    row: dict = {"case": case, "variant": variant, "params": params, "model_bytes": model_bytes}
    # Threads each side may use: squeeze's pool (`packing.WORKERS`) and torch's intra-op
    # threads; safetensors saves and loads in the calling thread (its load_state_dict copies
    # with torch's threads).
    row["threads"] = {
        "squeeze": packing.WORKERS,
        "torch": torch.get_num_threads(),
        "safetensors": 1,
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="squeeze-scale-") as tmp:
        st = Path(tmp) / "m.safetensors"
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        t0, c0 = time.perf_counter(), time.process_time()
        save_file(state, st)
        row["st_save_s"] = time.perf_counter() - t0
        row["st_save_cpu_s"] = time.process_time() - c0
        del state
        row["st_bytes"] = st.stat().st_size
        model = _compress(model, variant)
        with torch.no_grad():
            expected = _outputs(model, x)
        path = Path(tmp) / "m.sqz"
        with PeakRss() as peak:
            t0, c0 = time.perf_counter(), time.process_time()
            row["bytes"] = save_packed(model, path)
            row["pack_s"] = time.perf_counter() - t0
            row["pack_cpu_s"] = time.process_time() - c0  # (with the sampler's: once)
        row["pack_mem"] = peak.over / model_bytes
        t0 = time.perf_counter()
        row["estimate_bytes"] = packed_size(model)
        row["estimate_s"] = time.perf_counter() - t0
        for _ in range(repeats - 1):  # (the saves taking turns too, the fastest of each kept)
            state = {k: v.contiguous() for k, v in _build(case)[0].state_dict().items()}
            t0, c0 = time.perf_counter(), time.process_time()
            save_file(state, st)
            row["st_save_s"] = min(row["st_save_s"], time.perf_counter() - t0)
            row["st_save_cpu_s"] = min(row["st_save_cpu_s"], time.process_time() - c0)
            del state
            t0, c0 = time.perf_counter(), time.process_time()
            save_packed(model, path)
            row["pack_s"] = min(row["pack_s"], time.perf_counter() - t0)
            row["pack_cpu_s"] = min(row["pack_cpu_s"], time.process_time() - c0)
        del model
        for warm in (st, path):  # (both files in the page cache before any load is timed)
            warm.read_bytes()
        fresh, _ = _build(case)
        with PeakRss() as peak:
            t0 = time.perf_counter()
            reloaded = load_packed(path, fresh)
            row["reload_s"] = time.perf_counter() - t0
        row["reload_mem"] = peak.over / model_bytes
        loads = {
            "st_load_s": lambda fresh: fresh.load_state_dict(load_file(st), strict=False),
            "reload_s": lambda fresh: load_packed(path, fresh),
        }
        best, cpu = _fastest(loads, case, repeats)
        row["st_load_s"] = best["st_load_s"]
        row["reload_s"] = min(row["reload_s"], best["reload_s"])
        row["st_load_cpu_s"], row["reload_cpu_s"] = cpu["st_load_s"], cpu["reload_s"]
        with torch.no_grad():
            row["exact"] = bool(torch.equal(_outputs(reloaded, x), expected))
    row["pack_x"] = row["pack_s"] / row["st_save_s"]
    row["pack_cpu_x"] = row["pack_cpu_s"] / row["st_save_cpu_s"]
    row["reload_x"] = row["reload_s"] / row["st_load_s"]
    row["reload_cpu_x"] = row["reload_cpu_s"] / row["st_load_cpu_s"]
    return row


def _table(rows: list[dict], before: dict[tuple[str, str], dict]) -> str:
    head = (
        f"{'case':<10} {'variant':<7} {'st save':>8} {'pack s':>8} {'x':>6} {'cpu x':>5} "
        f"{'st load':>8} "
        f"{'reload s':>8} {'x':>5} {'cpu x':>5} {'est s':>6} {'pack mem':>8} {'load mem':>8} "
        f"{'bytes':>12} {'est/file':>9} {'new/old':>8} exact threads"
    )
    lines = [head]
    for r in rows:
        old = before.get((r["case"], r["variant"]))
        ratio = f"{r['bytes'] / old['bytes']:.4f}" if old else "-"
        lines.append(
            f"{r['case']:<10} {r['variant']:<7} {r['st_save_s']:>8.3f} {r['pack_s']:>8.2f} "
            f"{r['pack_x']:>6.1f} {r['pack_cpu_x']:>5.2f} {r['st_load_s']:>8.3f} "
            f"{r['reload_s']:>8.2f} "
            f"{r['reload_x']:>5.1f} {r['reload_cpu_x']:>5.2f} {r['estimate_s']:>6.2f} "
            f"{r['pack_mem']:>8.2f} {r['reload_mem']:>8.2f} {r['bytes']:>12,} "
            f"{r['estimate_bytes'] / r['bytes']:>9.4f} {ratio:>8} {r['exact']} "
            f"{_threads(r.get('threads'))}"
        )
    return "\n".join(lines)


def _threads(threads: dict | None) -> str:
    """``squeeze/torch/safetensors of cpus`` threads, e.g. ``2/2/1 of 2``."""
    if not threads:
        return "-"
    return f"{threads['squeeze']}/{threads['torch']}/{threads['safetensors']} of {threads['cpus']}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", action="store_true", help="also BERT-base (110 M)")
    parser.add_argument("--cases", nargs="*", help="only these cases (e.g. mlp-10m bert-28m)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--before", type=Path, help="rows of another version, for new/old bytes")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="loads timed this many times each (the fastest kept: a loaded machine's noise)",
    )
    parser.add_argument("--child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--packing", action="store_true", help="packing and loading alone")
    parser.add_argument("--kinds", nargs="*", default=["mlp", "cnn", "bert"])
    parser.add_argument("--rungs", nargs="*", help="default: 0.1M 1M 10M 30M (and 110M: --big)")
    parser.add_argument("--big", action="store_true", help="also the 110 M rung")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export phase")
    parser.add_argument("--skip", nargs="*", default=[], help="compressors not timed")
    parser.add_argument("--phase-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(_child(*args.child, repeats=args.repeats)) + "\n")
        return
    if args.phase_child:
        from _scale_phases import run_case

        row = run_case(*args.phase_child, onnx=not args.no_onnx, skip=tuple(args.skip))
        sys.stdout.write(json.dumps(row) + "\n")
        return
    if not args.packing:
        _phases(args)
        return
    cases = args.cases or [c for c, large in CASES.items() if args.large or not large]
    before = {}
    if args.before:
        before = {(r["case"], r["variant"]): r for r in json.loads(args.before.read_text())}
    rows = []
    for case in cases:
        for variant in args.variants:
            done = subprocess.run(
                [sys.executable, __file__, "--child", case, variant, f"--repeats={args.repeats}"],
                check=True,
                stdout=subprocess.PIPE,
                text=True,
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(_table(rows[-1:], before).splitlines()[1], flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(_table(rows, before))


def _phases(args) -> None:
    from _scale_phases import RUNGS

    rungs = args.rungs or [r for r in RUNGS if r != "110M" or args.big]
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    done = {(r["kind"], r["rung"]) for r in rows}
    for rung in rungs:
        for kind in args.kinds:
            if (kind, rung) in done:
                continue
            command = [sys.executable, __file__, "--phase-child", kind, rung]
            child = subprocess.run(
                command + (["--no-onnx"] if args.no_onnx else []) + ["--skip", *args.skip],
                stdout=subprocess.PIPE,
                text=True,
            )
            if child.returncode:
                rows.append({"kind": kind, "rung": rung, "failed": child.returncode})
            else:
                rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1) + "\n")
            print(_phase_table(rows[-1:]), flush=True)
    print(_phase_table(rows))


def _phase_table(rows: list[dict]) -> str:
    """Markdown: a row per phase, a column per (model, rung): wall steps / CPU steps / RSS x."""
    rows = [r for r in rows if "phases" in r]
    if not rows:
        return "(no finished case)"
    head = ["phase"] + [f"{r['kind']} {r['rung']} ({r['params'] / 1e6:.2g} M)" for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    step = ["one training step (s, CPU s)"] + [
        f"{r['step_s']:.3g} s ({r['step_cpu_s']:.3g})" for r in rows
    ]
    lines.append("| " + " | ".join(step) + " |")
    names = list(dict.fromkeys(n for r in rows for n in r["phases"]))
    for name in names:
        cells = [name]
        for r in rows:
            p = r["phases"].get(name)
            if p is None:
                cells.append("-")
            elif "error" in p:
                cells.append(f"error: {p['error'][:60]}")
            else:
                cells.append(f"{p['steps']:.3g} / {p['cpu_steps']:.3g} / {p['mem']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
