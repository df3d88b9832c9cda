"""The models shipped inside the package: `weights/NAME.safetensors`, each with its card
`weights/NAME.json` (how it was trained, on what, its accuracy, the file's sha256).

A shipped model is named wherever a model file is accepted (`load_model("best")`,
`miniresnet predict best cat.jpg`). Its bytes are checked against the card's sha256 before it is
loaded: a file that was changed is refused, not used. `scripts/ship_model.py` writes both files.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MiniResNetError
from .files import hexdigest

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "best"  # what `serve` and torch.hub load when no model is named


def shipped_cards() -> dict[str, dict]:
    """Every shipped model's card, by name, in name order."""
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(WEIGHTS_DIR.glob("*.json"))}


def sha256_of(path: Path) -> str:
    return hexdigest(path, "sha256")


def shipped_weights(name: str) -> Path:
    """The checked path of the shipped model `name`; an unknown name lists the shipped ones."""
    cards = shipped_cards()
    if name not in cards:
        names = ", ".join(cards) or "none in this installation"
        raise MiniResNetError(
            f"{name!r} is neither a file nor a shipped model (shipped: {names}; `miniresnet models` lists them)"
        )
    path = WEIGHTS_DIR / cards[name]["file"]
    if not path.is_file():
        raise MiniResNetError(f"the shipped model {name!r} is missing its weights {path}; reinstall miniresnet")
    actual = sha256_of(path)
    if actual != cards[name]["sha256"]:
        raise MiniResNetError(
            f"the shipped model {name!r} was changed: {path} has sha256 {actual}, its card says "
            f"{cards[name]['sha256']}; it was not loaded (reinstall miniresnet)"
        )
    return path
