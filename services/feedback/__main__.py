from services.feedback.server import main

raise SystemExit(main())
