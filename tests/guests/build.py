"""Moved to :mod:`virtbus.guests.build` (``virtbus demo`` needs it); kept for old imports."""

from __future__ import annotations

from virtbus.guests.build import *  # noqa: F403
from virtbus.guests.build import (  # noqa: F401  # private names some tests use
    INIT_SCRIPT,
    cache_key,
    collect_modules,
    main,
)

if __name__ == "__main__":
    raise SystemExit(main())
