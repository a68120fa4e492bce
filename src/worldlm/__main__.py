from worldlm.cli import main

raise SystemExit(main())
