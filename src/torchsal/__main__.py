from torchsal.cli import main

raise SystemExit(main())
