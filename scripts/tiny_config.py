"""Write the tests' tiny 7-node synthetic tree and its config to OUT/config.toml (for the Flower scripts).

    python scripts/tiny_config.py OUT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny import make_prepared, tiny_config

out = Path(sys.argv[1])
tiny_config(out, make_prepared(out / "data"), "worldlm").rename(out / "config.toml")
