from chatrl.services.trainer.server import main

raise SystemExit(main())
