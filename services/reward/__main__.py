from chatrl.services.reward.server import main

raise SystemExit(main())
