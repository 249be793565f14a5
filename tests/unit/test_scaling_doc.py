"""docs/scaling.md shows the chart values the chart tests render and install, word for word."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_scaling_page_quotes_the_tested_values_file() -> None:
    page = (REPO / "docs" / "scaling.md").read_text()
    values = (REPO / "charts" / "datamesh" / "ci" / "scale-values.yaml").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", page, flags=re.DOTALL)
    assert values in blocks, "docs/scaling.md must quote charts/datamesh/ci/scale-values.yaml as it is"
