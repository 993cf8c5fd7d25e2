"""The job API's OpenAPI document, committed as ``docs/openapi.json``.

``python -m services.api.openapi`` rewrites that file; a test checks it matches the app.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def schema() -> dict[str, Any]:
    """The document of an app built with throwaway settings (they do not show in it)."""
    from services.api.app import create_app
    from services.api.settings import ApiSettings

    with tempfile.TemporaryDirectory() as tmp:
        settings = ApiSettings(token="x" * 32, state_dir=Path(tmp), dry=True)
        app = create_app(settings)
        document = app.openapi()
        app.state.store.close()
    return document


def render() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    target = Path(argv[0]) if argv else DOC
    target.write_text(render())
    print(f"wrote {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
