"""What the JSON gate costs: api.gate.loads against plain json.loads on hostile bodies of max_spec_bytes.

    python bench/json_gate.py [--size 1048576]

The gate counts nesting before parsing (no recursion), parses with hooks that note a value breaking
I-JSON's rules, and walks the value for paths only when one did. Each row is one body of ``--size`` bytes
built to be slow for one of those steps; the ratio is the gate's time over json.loads's on the same text
(the best of three runs each). A body json.loads can't parse (too deep: RecursionError) or refuses
(unterminated) still gets timed: the time to that answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.gate import JsonRefused, loads  # noqa: E402


def bodies(size: int) -> dict[str, str]:
    """Hostile JSON texts of about ``size`` characters."""
    return {
        "empty arrays, flat": "[" + "[]," * (size // 3 - 2) + "[]]",
        "small objects": "[" + '{"a":1},' * (size // 8 - 2) + "{}]",
        "integers at depth 32": "[" * 32 + "1," * (size // 2 - 40) + "1" + "]" * 32,
        "floats": "[" + "1.5," * (size // 4 - 2) + "1]",
        "short strings": "[" + '"a",' * (size // 4 - 2) + '"a"]',
        "one long string": json.dumps("x" * (size - 10)),
        "escaped quotes, never closed": '"' + '\\"' * (size // 2 - 1),
        "quote, letter, quote, ...": '"a' * (size // 2),
        "nested 100000 deep": "[" * 100_000 + "]" * 100_000,
        "NaN at the end of a flat array": "[" + "1," * (size // 2 - 4) + "NaN]",
    }


def best_of_three(parse, text: str) -> tuple[float, str]:
    """The fastest of three runs, and how the last one ended."""
    times, outcome = [], ""
    for _ in range(3):
        start = time.perf_counter()
        try:
            parse(text)
            outcome = "parsed"
        except JsonRefused as exc:
            outcome = f"refused {exc.status}"
        except (ValueError, RecursionError) as exc:
            outcome = type(exc).__name__
        times.append(time.perf_counter() - start)
    return min(times), outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024 * 1024, help="bytes of each body (max_spec_bytes)")
    args = parser.parse_args()
    print(f"{'body':32} {'gate ms':>9} {'json.loads ms':>14} {'ratio':>7}  gate's answer / json.loads's")
    for name, text in bodies(args.size).items():
        gate, gate_outcome = best_of_three(lambda t: loads(t, max_depth=32), text)
        plain, plain_outcome = best_of_three(json.loads, text)
        ratio = gate / plain if plain > 1e-4 else float("inf")
        print(f"{name:32} {gate * 1000:9.1f} {plain * 1000:14.1f} {ratio:7.1f}  {gate_outcome} / {plain_outcome}")


if __name__ == "__main__":
    main()
