"""``rwkvtune data prepare IN.jsonl --out PREFIX``: tokenize jsonl into binidx (RWKV-LM's format)."""

from __future__ import annotations

import argparse
import os

from rwkvtune.cli import set_handler
from rwkvtune.cli.common import add_data_options
from rwkvtune.errors import ConfigError
from rwkvtune.bounds import THREADS_PER_CORE, Bound, check_flag, cpu_cores, max_threads
from rwkvtune.utils import plural


BAD_RECORD_ADVICE = "fix the record, or pass --on-data-error skip to skip bad records"


def add_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    prep = actions.add_parser("prepare", help="tokenize jsonl into binidx (RWKV-LM's format)",
                              description="Tokenize IN.jsonl (text, chat or prompt/response) into PREFIX.bin/.idx "
                                          "(uint16 tokens, documents ending with 0), in parallel.")
    prep.add_argument("input", metavar="IN.jsonl",
                      help="the data to tokenize: jsonl (or a .json array) of text, chat or prompt/response records")
    prep.add_argument("--out", required=True, metavar="PREFIX", help="output prefix (writes PREFIX.bin, PREFIX.idx)")
    prep.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                      help="tokenizer processes (default: the number of CPUs)")
    add_data_options(p=prep)
    set_handler(prep, "rwkvtune.cli.data:run_prepare")


def run_prepare(args: argparse.Namespace) -> int:
    """Tokenize, then print one summary line; exit status 0 on success."""
    from rwkvtune.data.prepare import prepare_binidx  # numpy: not at the CLI's startup


    check_flag("--workers", args.workers, Bound(int, 1, max_threads, note=f"at most {THREADS_PER_CORE}x the "
                                                f"{cpu_cores()} CPU cores here"), ConfigError)
    if not args.out or args.out.endswith(("/", os.sep)) or os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out!r}: expected a file prefix such as data/corpus (writes data/corpus.bin "
                          f"and data/corpus.idx), not a directory")
    stats = prepare_binidx(args.input, args.out, workers=args.workers, fmt=args.data_format,
                           on_error=args.on_data_error)
    rate = stats.tokens / max(stats.seconds, 1e-9)
    line = (f"wrote {args.out}.bin and {args.out}.idx: {plural(stats.samples, 'document')}, "
            f"{plural(stats.tokens, 'token')} "
            f"in {stats.seconds:.1f} s ({rate:,.0f} tokens/s)")
    if stats.skipped:
        line += f"; skipped {plural(stats.skipped, 'bad record')} (first: {stats.skipped_examples[0]})"
    print(line)
    return 0
