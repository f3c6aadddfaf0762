from cryodask.cli import main

raise SystemExit(main())
