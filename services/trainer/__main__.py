from services.trainer.server import main

raise SystemExit(main())
