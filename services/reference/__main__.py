from chatrl.services.reference.server import main

raise SystemExit(main())
