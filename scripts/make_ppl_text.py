#!/usr/bin/env python
"""Write tests/data/devils_dictionary.txt, the public-domain text the perplexity tests and
bench/accuracy_table.py score.

    apt-get download dict-devil        # Debian's package of the text (dictd format)
    python scripts/make_ppl_text.py dict-devil_*.deb [--chars 120000]

The source is Ambrose Bierce's *The Devil's Dictionary* (1911; the Internet Wiretap edition,
"A Public Domain Text, Copyright Expired", as Debian's dict-devil ships it under
/usr/share/dictd/devil.dict.dz). This keeps the text from its title on, drops dictfmt's
``00-database-*`` header lines and its ``{cross-reference}`` braces, and cuts at the last
blank line before ``--chars`` characters (an entry boundary).
"""
from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "devils_dictionary.txt"


def read_dict(src: Path) -> str:
    if src.suffix == ".deb":
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["dpkg-deb", "-x", str(src), tmp], check=True)
            return read_dict(Path(tmp) / "usr/share/dictd/devil.dict.dz")
    data = src.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8")


def clean(text: str, chars: int) -> str:
    lines = [ln.rstrip() for ln in text.splitlines()]
    start = next(i for i, ln in enumerate(lines) if "The Internet Wiretap" in ln)
    body = "\n".join(lines[start:]).replace("{", "").replace("}", "").strip() + "\n"
    if len(body) > chars:
        cut = body.rfind("\n\n", 0, chars)
        body = body[: cut + 1]
    return body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="dict-devil .deb or devil.dict(.dz)")
    ap.add_argument("--chars", type=int, default=120_000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    body = clean(read_dict(args.source), args.chars)
    args.out.write_text(body, encoding="utf-8")
    print(f"wrote {args.out} ({len(body)} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
