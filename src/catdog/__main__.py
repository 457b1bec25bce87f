from catdog.cli import main

raise SystemExit(main())
