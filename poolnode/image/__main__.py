"""Run the image builder CLI: ``python -m poolnode.image build --out DIR``."""

from __future__ import annotations

from ._cli import main

raise SystemExit(main())
