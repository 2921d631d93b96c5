from services.reference.server import main

raise SystemExit(main())
