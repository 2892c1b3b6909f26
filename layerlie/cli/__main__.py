from layerlie.cli.main import main

raise SystemExit(main())
