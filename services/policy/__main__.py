"""``python -m services.policy --checkpoint DIR --port P`` (same flags as ``chatrl serve policy``)."""

from services.policy.server import main

raise SystemExit(main())
