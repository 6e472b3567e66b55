from pcd_ray.cli import main

raise SystemExit(main())
