"""Analytic scoring cost of a retrieval budget (paper §5, Table 3): FLOPs and index memory.

For one query against ``N`` candidates at budget ``(r_q, r_c)`` (Eq. 4), scoring computes
``r_q * r_c`` dot products of length ``D`` per candidate:

    FLOPs  = 2 * r_q * r_c * D * N          (multiply + add; the max/sum epilogue is ignored)
    memory = N * r_c * D * bytes(dtype)     (the index prefix that must be resident)

With the paper's D = 3584 (Qwen2.5-VL-7B), N = 100,000 and bf16 this gives Table 3 to the
printed precision except three cells: FLOPs (1,1) = 0.72 G (paper 0.71), FLOPs (16,64) =
734.00 G (paper 733.89) and memory (1,1) = 0.67 GiB (paper 0.68; exactly 0.6676).  The paper
does not state its counting convention; no single one (``2D`` or ``2D - 1`` flops per dot,
rounding or truncation) reproduces all five FLOPs cells, so we keep the plain formula and
record the paper's numbers in :data:`PAPER_TABLE3`.

§5's "encoding an image query of 1024 tokens requires 42.72 TFLOPs" repeats the (16, 64) index
size (42.72 GiB).  :func:`metaembed.backbones.published.size_report` counts 13.5 GFLOPs per token
for the 7B language model (forward, attention over 1,024 tokens included): about 13.8 TFLOPs for
that query's language-model pass, the vision tower aside.  The printed figure is not an encoding
cost to compare scoring with.

CLI: ``metaembed flops --D 3584 --N 100000 --budgets "1,1 2,4 4,8 8,16 16,64" [--json PATH]``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .config import DEFAULT_GROUPS, check_int
from .groups import format_budget, parse_budget

__all__ = [
    "DTYPE_BYTES",
    "PAPER_D",
    "PAPER_N",
    "PAPER_BATCH",
    "PAPER_TABLE3",
    "add_arguments",
    "efficiency_table",
    "fixed_or_sig",
    "index_memory_bytes",
    "markdown_table",
    "parse_budgets",
    "run",
    "scoring_flops",
    "sig_figures",
]

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int8": 1}
GIB = 2**30

#: Table 3 setting: MetaEmbed-7B (Qwen2.5-VL-7B hidden size), 100k candidates, scoring batch 1,000.
PAPER_D = 3584
PAPER_N = 100_000
PAPER_BATCH = 1_000
#: Table 3 as printed (A100, bf16 index): GFLOPs, latency mean/std (ms), index GiB, MMEB accuracy (%).
PAPER_TABLE3: dict[tuple[int, int], dict[str, float]] = {
    (1, 1): {"gflops": 0.71, "latency_ms": 1.67, "latency_std_ms": 0.13, "memory_gib": 0.68, "mmeb": 71.3},
    (2, 4): {"gflops": 5.73, "latency_ms": 1.66, "latency_std_ms": 0.12, "memory_gib": 2.67, "mmeb": 72.0},
    (4, 8): {"gflops": 22.94, "latency_ms": 1.67, "latency_std_ms": 0.12, "memory_gib": 5.34, "mmeb": 72.9},
    (8, 16): {"gflops": 91.75, "latency_ms": 1.92, "latency_std_ms": 0.12, "memory_gib": 10.68, "mmeb": 74.3},
    (16, 64): {"gflops": 733.89, "latency_ms": 6.25, "latency_std_ms": 0.07, "memory_gib": 42.72, "mmeb": 76.6},
}


def scoring_flops(r_q: int, r_c: int, D: int, N: int) -> int:
    """FLOPs to score one query against ``N`` candidates at budget ``(r_q, r_c)``: ``2 r_q r_c D N`` (Eq. 4)."""
    return 2 * check_int(r_q, "r_q", 1) * check_int(r_c, "r_c", 1) * check_int(D, "D", 1) * check_int(N, "N")


def index_memory_bytes(r_c: int, D: int, N: int, dtype_bytes: int = 2) -> int:
    """Bytes of an index holding ``r_c`` vectors of dim ``D`` per candidate: ``N r_c D bytes``."""
    nbytes = check_int(dtype_bytes, "dtype_bytes", 1)
    return check_int(N, "N") * check_int(r_c, "r_c", 1) * check_int(D, "D", 1) * nbytes


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name (``"bfloat16"``, ``"torch.float32"``, ...)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}; expected one of {tuple(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def parse_budgets(texts: str | Iterable[str]) -> list[tuple[int, int]]:
    """``"1,1 2,4 16,64"`` (or a list of such strings) -> ``[(1, 1), (2, 4), (16, 64)]``."""
    if isinstance(texts, str):
        texts = [texts]
    out = [parse_budget(tok) for text in texts for tok in text.replace(";", " ").split()]
    if not out:
        raise ValueError("no budgets given; expected e.g. '1,1 2,4 16,64'")
    return out


def efficiency_table(D: int = PAPER_D, N: int = PAPER_N, budgets: Sequence[Sequence[int]] = DEFAULT_GROUPS,
                     dtype: str = "bfloat16") -> pd.DataFrame:
    """Table 3's analytic columns: one row per budget with ``FLOPs (G)`` (1e9) and ``index memory (GiB)``."""
    nbytes = dtype_bytes(dtype)
    rows = []
    for b in budgets:
        r_q, r_c = parse_budget(format_budget(b))
        rows.append({
            "budget": format_budget((r_q, r_c)),
            "r_q": r_q,
            "r_c": r_c,
            "FLOPs (G)": scoring_flops(r_q, r_c, D, N) / 1e9,
            "index memory (GiB)": index_memory_bytes(r_c, D, N, nbytes) / GIB,
        })
    return pd.DataFrame(rows, columns=["budget", "r_q", "r_c", "FLOPs (G)", "index memory (GiB)"])


def sig_figures(x: float) -> str:
    """Compact number with ~3 significant digits."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    rounded = float(f"{x:.2e}")  # the exponent after rounding: 0.09999 is 0.100, not 0.1000; 99.96 is 100, not 100.0
    digits = max(0, 2 - int(math.floor(math.log10(abs(rounded)))))
    return f"{x:.{digits}f}"


def fixed_or_sig(x: float) -> str:
    """Two decimals (as in Table 3) for values >= 1, else ~3 significant digits (never a bare ``0.00``)."""
    return f"{x:.2f}" if x >= 1 else sig_figures(x)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], floatfmt: str = ".2f") -> str:
    """A GitHub markdown table (no extra dependency); floats formatted with ``floatfmt``."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(obj: Any, path: str) -> None:
    """Write a benchmark result as indented JSON (``-`` prints it)."""
    text = json.dumps(obj, indent=2) + "\n"
    if path == "-":
        print(text, end="")
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # as metaembed eval --json does
    with open(path, "w") as fh:
        fh.write(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``metaembed flops``."""
    parser.add_argument("--D", type=int, default=PAPER_D, help=f"embedding dim (default {PAPER_D})")
    parser.add_argument("--N", type=int, default=PAPER_N, help=f"number of candidates (default {PAPER_N})")
    parser.add_argument("--budgets", nargs="+", default=None, metavar="RQ,RC",
                        help='budgets, e.g. "1,1 2,4 4,8 8,16 16,64" (default: the paper\'s groups)')
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="index dtype")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="also write the table as JSON to PATH ('-' or no value: stdout)")


def run(args: argparse.Namespace) -> int:
    """Print Table 3's FLOPs / memory columns as markdown (and JSON with ``--json``)."""
    try:
        budgets = parse_budgets(args.budgets) if args.budgets else list(DEFAULT_GROUPS)
        table = efficiency_table(args.D, args.N, budgets, args.dtype)
    except (ValueError, TypeError) as e:
        print(f"metaembed flops: {e}", file=sys.stderr)
        return 2
    records = table.to_dict(orient="records")
    print(f"Scoring cost per query: D={args.D}, N={args.N:,}, {args.dtype} index (FLOPs = 2 r_q r_c D N)\n")
    cols = ["FLOPs (G)", "index memory (GiB)"]  # .2f printed 0.00 below 0.005 (the JSON has the values)
    print(markdown_table([{**r, **{c: fixed_or_sig(r[c]) for c in cols}} for r in records], ["budget", *cols]))
    if args.json is not None:
        write_json({"D": args.D, "N": args.N, "dtype": args.dtype, "rows": records}, args.json)
    return 0


if __name__ == "__main__":  # python -m metaembed.efficiency == metaembed flops
    from .cli import main

    raise SystemExit(main(["flops", *sys.argv[1:]]))
