"""Write README.md's recipe-key table from the recipe keys' metadata (dpo_xpu.recipes.options_table).

python scripts/sync_readme.py           # rewrite the table in place
python scripts/sync_readme.py --check   # exit 1 when the README's table is stale (run by the tests)
"""

from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| key | default | unit / values | default from |"


def synced(text: str) -> str:
    """The README text with its recipe-key table replaced by the generated one."""
    from dpo_xpu.recipes import options_table

    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| key | default |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return "\n".join(lines[:start] + options_table(full=False).split("\n") + lines[end:])


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    new = synced(text)
    if "--check" in argv:
        if new != text:
            print("README.md's recipe-key table is stale: run python scripts/sync_readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
