from multibot.cli import main

raise SystemExit(main())
