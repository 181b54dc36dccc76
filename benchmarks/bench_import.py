"""How long `depmatch` takes to show its help, per command: the import cost a user waits for.

    python benchmarks/bench_import.py             # 5 runs per command, median and max wall time
    python benchmarks/bench_import.py --runs 10

Each run is a fresh `python -m depmatch ... --help` process, timed from start to exit, so the
interpreter's own start is included (shown once as `python -c pass`). It also reports whether
the command imported torch. docs/cli.md has the numbers and the machine they came from.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from depmatch.cli import COMMANDS  # noqa: E402

PROBE = (
    "import sys\nfrom depmatch.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    "sys.stderr.write('torch' in sys.modules and 'TORCH' or 'no torch')"
)


def timed(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO)
    return time.perf_counter() - start, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="processes per command (median and max reported)")
    args = parser.parse_args(argv)
    rows = [("python -c pass", ["-c", "pass"])]
    rows += [
        (f"depmatch {' '.join(words)} --help".replace("  ", " "), ["-c", PROBE, *words, "--help"])
        for words in ([], *([name] for name in COMMANDS), ["shards", "build"])
    ]
    print("| command | median s | max s | torch imported |\n| --- | --- | --- | --- |")
    for label, command in rows:
        times, torch_seen = [], ""
        for _ in range(args.runs):
            seconds, torch_seen = timed(command)
            times.append(seconds)
        imported = "" if label.startswith("python") else ("yes" if torch_seen == "TORCH" else "no")
        print(f"| `{label}` | {statistics.median(times):.2f} | {max(times):.2f} | {imported} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
