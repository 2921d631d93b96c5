from chatrl.services.feedback.server import main

raise SystemExit(main())
