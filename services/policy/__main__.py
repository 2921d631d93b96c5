"""``python -m chatrl.services.policy --checkpoint DIR --port P`` (same flags as ``chatrl serve policy``)."""

from chatrl.services.policy.server import main

raise SystemExit(main())
