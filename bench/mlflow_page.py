"""What a person sees first in MLflow's UI after a sweep, rendered in a real browser.

Runs a small sweep of README's quick start in a folder, starts ``squeeze ui`` there on a free
port, renders the two links it prints in headless Chromium (Debian's ``chromium``) and checks
the page's text: the runs table (every trial listed, not collapsed under the study's run), the
metric columns (val_acc, size_bytes, compression_ratio, speedup), and no GenAI overview (traces,
token usage); the front's link lists only the Pareto front. Writes a screenshot of the first page.

    python bench/mlflow_page.py [--trials 6] [--screenshot docs/mlflow-first-page.png]
                                [--workdir DIR] [--control] [override ...]

Exit status 0 when every check holds, 1 otherwise (each failed check is printed).
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Column headers the first page must show.
COLUMNS = ("val_acc", "size_bytes", "compression_ratio", "speedup")
#: Text of MLflow's GenAI overview, which must not be the first page.
GENAI = ("Overview", "Token usage", "Detect issues", "Trace count")
#: Chromium, as Debian names it (``chromium-browser``, ``google-chrome`` elsewhere).
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str | None:
    """The path of a Chromium found on PATH, or None."""
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def render(url: str, *, dump: bool, out: Path | None = None, budget_ms: int = 15000) -> str:
    """The page's DOM after ``budget_ms`` of virtual time (``dump``), or "" after writing a
    1600x1000 screenshot to ``out``."""
    with tempfile.TemporaryDirectory(prefix="squeeze-chromium-") as profile:
        command = [
            browser() or "chromium",
            "--headless",
            "--no-sandbox",  # root in a container
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",  # a first visit: no view state remembered
            "--window-size=1600,1000",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom" if dump else f"--screenshot={out}",
            url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    return done.stdout if dump else ""


def page_text(dom: str) -> str:
    """The visible words of a DOM dump (styles and scripts left out)."""
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def check_page(text: str, *, runs: list[str], absent: list[str] = ()) -> list[str]:
    """What is wrong with a page: runs missing, columns missing, GenAI text, runs that should
    not be there. Empty when it is right."""
    wrong = [f"run {r} not listed" for r in runs if not re.search(rf"\b{r}\b", text)]
    wrong += [f"column {c} not shown" for c in COLUMNS if c not in text]
    wrong += [f"GenAI page text {g!r} shown" for g in GENAI if g in text]
    wrong += [f"run {r} listed" for r in absent if re.search(rf"\b{r}\b", text)]
    return wrong


def _squeeze(*args: str) -> list[str]:
    return [sys.executable, "-m", "search.cli", *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary one")
    parser.add_argument(
        "--control",
        action="store_true",
        help="also render the experiment's plain link (what `mlflow ui` gives) and show that "
        "the check fails there",
    )
    parser.add_argument("overrides", nargs="*", help="more overrides of the sweep")
    args = parser.parse_args(argv)
    if browser() is None:
        print("no chromium on PATH: apt-get install -y chromium", file=sys.stderr)
        return 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="squeeze-mlflow-page-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.perf_counter()
    sweep = ["sweep", "task=digits_mlp", f"search.n_trials={args.trials}", "--quiet"]
    subprocess.run(_squeeze(*sweep, *args.overrides), cwd=work, env=env, check=True)
    print(f"sweep: {time.perf_counter() - start:.0f} s", flush=True)

    import optuna  # (after the sweep: its journal is in the folder)

    from search.config.storage import open_storage

    study = optuna.load_study(
        study_name="digits_mlp", storage=open_storage(str(work / "optuna.journal"))
    )
    names = {t.number: f"digits_mlp-t{t.number:04d}" for t in study.trials}
    complete = [names[t.number] for t in study.trials if t.state.name == "COMPLETE"]
    front = [names[t.number] for t in study.best_trials]

    ui = subprocess.Popen(
        _squeeze("ui", "--port", "0"), cwd=work, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        urls = [line.strip() for line in _lines(ui, 2, timeout=300) if "://" in line]
        print(f"squeeze ui answered after {time.perf_counter() - start:.0f} s:", *urls, sep="\n  ")
        started = time.perf_counter()
        first = page_text(render(urls[0], dump=True))
        wrong = check_page(first, runs=complete)
        print(f"first page rendered in {time.perf_counter() - started:.0f} s", flush=True)
        pareto = page_text(render(urls[1], dump=True))
        rest = [n for n in complete if n not in front]
        wrong += [f"front: {w}" for w in check_page(pareto, runs=front, absent=rest)]
        if args.control:  # the check can fail: the plain experiment link opens the GenAI page
            plain = urls[0].split("/runs?")[0]
            failed = check_page(page_text(render(plain, dump=True)), runs=complete)
            print(f"control {plain}: {'; '.join(failed) or 'no check failed'}")
            if failed:
                print("control: the plain experiment link fails the check")
            else:
                wrong.append("control: the plain experiment link passed the check")
        if args.screenshot is not None:
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            render(urls[0], dump=False, out=args.screenshot.resolve())
            print(f"screenshot {args.screenshot} ({args.screenshot.stat().st_size:,} bytes)")
    finally:
        ui.send_signal(signal.SIGINT)
        try:
            ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            ui.kill()
    print(f"{len(complete)} complete trials, {len(front)} on the front")
    for line in wrong:
        print(f"WRONG: {line}")
    print("page ok" if not wrong else f"{len(wrong)} check(s) failed")
    return 1 if wrong else 0


def _lines(process: subprocess.Popen, count: int, *, timeout: float) -> list[str]:
    """The first lines holding a URL that ``process`` prints, ``count`` of them."""
    found: list[str] = []
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"squeeze ui ended (exit {process.wait()}) before its links")
        if "://" in line:
            found.append(line)
    if len(found) < count:
        raise RuntimeError(f"squeeze ui printed no links in {timeout:.0f} s")
    return found


if __name__ == "__main__":
    sys.exit(main())
