from metaham.cli import main

raise SystemExit(main())
