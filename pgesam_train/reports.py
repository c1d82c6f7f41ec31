"""Every evaluation and benchmark writes its numbers twice: JSON for machines, Markdown for the report."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> Path:
    """Write `text` to `path` via a temporary file beside it, so an interrupted write leaves no half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_markdown(out_dir: Path, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write `<name>.json` and `<name>.md` (newline-terminated) into out_dir (created); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(data, indent=1, default=float))
    md.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return js, md
