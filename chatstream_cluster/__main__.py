import sys

from chatstream_cluster.cli import main

sys.exit(main())
