from colstream.cli.main import main

raise SystemExit(main())
