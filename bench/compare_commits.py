"""One benchmark command at two commits, runs interleaved, medians side by side.

    python bench/compare_commits.py BEFORE AFTER [--runs 3] [--save F] -- python bench/x.py --json

BEFORE and AFTER are commits (a detached worktree of each is made in a temp dir and removed
afterwards) or existing checkout directories. The command runs with the checkout as working
directory and PYTHONPATH, so each side uses its own code, in the order before, after, after,
before, ... (a drift of the machine's load falls on both sides alike). Figures: the wall and
CPU time (user + system, children included) of the whole command, and every number the command
prints as JSON on stdout (nested keys joined by "."; a list of objects keyed by each object's
first string field). A figure that is the same in every run of a side is deterministic: if it
differs between the sides the row says DIFF, and the script exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

Figures = dict[str, float | str]
# figures that measure time or speed: never expected equal, so never DIFF
TIMING = re.compile(r"(_s|_ms|_us|seconds|/s|_p\d+|wall|cpu|median|best)$|per_s\b|per_second")


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, float | str]]:
    """Every leaf of a JSON value with its dotted path; numbers as floats."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}{key}.")
    elif isinstance(value, list):
        seen: set[str] = set()
        for index, item in enumerate(value):
            label = str(index)
            if isinstance(item, dict):
                label = next((v for v in item.values() if isinstance(v, str)), label)
            # rows that share their first string (a design at several sizes) keep their place
            label = f"{label}#{index}" if label in seen else label
            seen.add(label)
            yield from flatten(item, f"{prefix}{label}.")
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        yield prefix.rstrip("."), str(value)
    elif isinstance(value, int | float):
        yield prefix.rstrip("."), float(value)


def checkout(stack: ExitStack, repo: Path, rev: str) -> Path:
    """The directory of a checkout of rev: itself if it is one, else a temporary worktree."""
    if Path(rev).is_dir():
        return Path(rev).resolve()
    path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "tree"
    git = ["git", "-C", str(repo), "worktree"]
    subprocess.run([*git, "add", "--detach", str(path), rev], check=True, capture_output=True)
    stack.callback(subprocess.run, [*git, "remove", "--force", str(path)], check=False)
    return path


def run(tree: Path, command: list[str]) -> Figures:
    """One run of the command in a checkout: its timings and the numbers it printed."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cpu = os.times()
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=tree, env=env, stdout=subprocess.PIPE, check=False)
    figures: Figures = {"wall_s": time.perf_counter() - started}
    # the children's totals grow by what this run's process tree used (waited-for processes)
    usage = os.times()
    figures["cpu_s"] = sum(usage[2:4]) - sum(cpu[2:4])
    # a bench may exit 1 for a missed goal and still print its figures: the code is one more
    figures["exit"] = proc.returncode
    if proc.returncode != 0:
        print(f"exit {proc.returncode} in {tree}", file=sys.stderr)
    printed = printed_json(proc.stdout.decode())
    if printed is None:
        print(f"no JSON on stdout in {tree}", file=sys.stderr)
    else:
        figures.update(flatten(printed))
    return figures


def printed_json(text: str) -> Any:
    """The JSON object a command printed: its last line that is one (log lines may come
    first), or everything from the first "{" (an indented dump)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    try:
        return json.loads(text[text.index("{") :])
    except ValueError:
        return None


def spread(values: list[float]) -> str:
    """The range of the values around their median, in percent."""
    middle = statistics.median(values)
    if middle == 0:
        return f"{min(values):.4g}..{max(values):.4g}"
    return f"{100 * (min(values) / middle - 1):+.1f}%/{100 * (max(values) / middle - 1):+.1f}%"


def table(before: list[Figures], after: list[Figures]) -> tuple[list[str], int]:
    """Markdown rows (figure, medians, ratio, spreads, note) and the count of DIFF rows."""
    rows = ["| figure | before | after | ratio | spread before | spread after | note |"]
    rows.append("|---|---|---|---|---|---|---|")
    diffs = 0
    names = dict.fromkeys(k for figures in before + after for k in figures)
    for name in names:
        old = [f[name] for f in before if name in f]
        new = [f[name] for f in after if name in f]
        fixed = len(set(old)) == 1 and len(set(new)) == 1 and not TIMING.search(name)
        note = ("same" if old[0] == new[0] else "DIFF") if fixed and old and new else ""
        diffs += note == "DIFF"
        if not old or not new or isinstance(old[0], str) or isinstance(new[0], str):
            rows.append(f"| {name} | {old[:1]} | {new[:1]} | | | | {note or 'varies'} |")
            continue
        xs, ys = [float(v) for v in old], [float(v) for v in new]
        a, b = statistics.median(xs), statistics.median(ys)
        ratio = f"{b / a:.3f}" if a else ""
        rows.append(
            f"| {name} | {a:.6g} | {b:.6g} | {ratio} | {spread(xs)} | {spread(ys)} | {note} |"
        )
    return rows, diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--runs", type=int, default=3, help="runs per side")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--save", type=Path, help="write every run's figures there as JSON")
    # The command is everything after "--": argparse's REMAINDER after the positionals
    # swallowed the options written between them and "--", as the usage line writes them.
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    command = argv[cut + 1 :]
    if not command:
        parser.error("no command after --")
    results: dict[str, list[Figures]] = {"before": [], "after": []}
    with ExitStack() as stack:
        trees = {side: checkout(stack, args.repo, getattr(args, side)) for side in results}
        for index in range(args.runs):
            order = ("before", "after") if index % 2 == 0 else ("after", "before")
            for side in order:
                results[side].append(run(trees[side], command))
    if args.save:
        args.save.write_text(json.dumps(results))
    rows, diffs = table(results["before"], results["after"])
    print(f"{' '.join(command)}: {args.before} -> {args.after}, {args.runs} runs each")
    print("\n".join(rows))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
